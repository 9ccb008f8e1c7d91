#!/usr/bin/env python
"""Run the three benchmarks with shared settings, write `results/summary_<tag>.md` and optionally refresh the README.

    python benchmarks/run_all.py                                   # CPU, small model, ~3 minutes on 2 idle cores
    python benchmarks/run_all.py --threads 1 --clock cpu           # on a busy shared machine
    python benchmarks/run_all.py --preset qwen2-vl-2b --dtype bfloat16 --threads 1 --clock cpu --update-readme
    python benchmarks/run_all.py --preset qwen2-vl-7b --device cuda --dtype bfloat16 --update-readme

A published-architecture preset brings its own plan (`PLANS`: image sizes, batch sizes, runs, teacher, which
benchmarks), sized for the hardware it is meant for: Qwen2-VL-7B on one H100/H200-class GPU in under 10 minutes,
Qwen2-VL-2B's inference on a 2-core CPU in about 15. `--smoke` runs the same plan with a small model at tiny sizes on
the CPU, to check the whole command (the test suite does). Options given here are passed to every script; anything
else keeps the plan's or each script's default (run a script directly for its own options).
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference  # noqa: E402
import bench_scaling  # noqa: E402
import bench_training  # noqa: E402
from bench_utils import MODEL_PRESETS, RESULTS_DIR, is_real_scale, markdown_table, require_device, size_name  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
SHARED_OPTIONS = ("preset", "device", "dtype", "threads", "clock", "runs", "warmup", "seed", "output_dir", "tag")
SCRIPTS = {"inference": bench_inference, "training": bench_training, "scaling": bench_scaling}
REAL_PHOTOS = ["500x375", "1024x768", "4032x3024"]
# One large GPU, bfloat16: every benchmark, the paper's teacher architecture, batch sweep to 32; ~6-8 minutes for the
# 7B (three model builds of ~20 s, reference_256 a few seconds per image).
GPU_PLAN = {
    "inference": {
        "--image-sizes": REAL_PHOTOS,
        "--batch-sizes": ["1", "8"],
        "--runs": "5",
        "--warmup": "2",
        "--long-generation-runs": "3",
    },
    "training": {
        "--num-images": "64",
        "--image-size": "500x375",
        "--teacher": "vit_base_patch16_384",
        "--extract-batch-size": "16",
        "--runs": "3",
        "--warmup": "1",
    },
    "scaling": {
        "--image-size": "500x375",
        "--batch-sizes": ["1", "2", "4", "8", "16", "32"],
        "--class-counts": ["2", "8", "32"],
        "--runs": "5",
        "--warmup": "2",
    },
}
# A 2-core CPU, one thread: inference only (~7 s per 500x375 forward, ~50 s per 1024x768 one in bfloat16), a batch
# of 2 where it fits, three interleaved rounds, one 256-token generation; about 15 minutes.
CPU_PLAN = {
    "inference": {
        "--image-sizes": REAL_PHOTOS,
        "--batch-sizes": ["1", "2"],
        "--max-batch-image-tokens": "600",
        "--runs": "3",
        "--warmup": "0",
        "--long-generation-runs": "1",
    },
}
PLANS = {
    ("qwen2-vl-7b", "cuda"): GPU_PLAN,
    ("qwen2-vl-2b", "cuda"): GPU_PLAN,
    ("qwen2-vl-2b", "cpu"): CPU_PLAN,
}
# `--smoke`: the same plan on a small model at tiny sizes (every option the plan sets keeps its shape).
SMOKE_OPTIONS = {
    "--image-sizes": ["56", "60", "84x56"],  # 56 and 60 px give the same model inputs: timed once
    "--batch-sizes": ["1", "2"],
    "--image-size": "56",
    "--num-images": "3",
    "--teacher": "vit_tiny_patch16_224",
    "--extract-batch-size": "2",
    "--class-counts": ["2", "3"],
    "--max-batch-image-tokens": "200",
    "--runs": "1",
    "--warmup": "0",
    "--long-generation-runs": "1",
}
SMOKE_SCRIPT_OPTIONS = {
    "inference": {"--long-generation-tokens": "3"},
    "training": {"--head-epochs": "1", "--gate-epochs": "1"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(MODEL_PRESETS))
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=["wall", "cpu"])
    parser.add_argument("--runs", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--tag", help="result file suffix (default: the device type, + the preset if published)")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these")
    parser.add_argument("--update-readme", action="store_true", help="put the summary into the benchmarks README")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    parser.add_argument(
        "--summarize-only", action="store_true", help="run nothing: rebuild the summary (and README) from result files"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the command on this machine: the preset's plan with the small cpu model at tiny sizes, on CPU",
    )
    return parser.parse_args(argv)


def default_tag(args) -> str:
    device = (args.device or "cpu").split(":")[0]
    return f"{device}-{args.preset}" if args.preset and is_real_scale(args.preset) else device


def shared_argv(args) -> list[str]:
    argv = []
    for name in SHARED_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def plan_argv(plan: dict, script: str, smoke: bool) -> list[str]:
    options = dict(plan.get(script, {}))
    if smoke:
        options = {key: SMOKE_OPTIONS.get(key, value) for key, value in options.items()}
        options.update(SMOKE_SCRIPT_OPTIONS.get(script, {}))
    argv = []
    for key, value in options.items():
        argv += [key, *value] if isinstance(value, list) else [key, value]
    return argv


def update_readme(markdown: str, tag: str, readme: Path = README) -> None:
    """Replace the text between `<!-- results:<tag>:start -->` and `<!-- results:<tag>:end -->` in the README."""
    start, end = f"<!-- results:{tag}:start -->", f"<!-- results:{tag}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers; add them where the {tag} results belong")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), flags=re.DOTALL)
    readme.write_text(pattern.sub(lambda _: f"{start}\n{markdown.strip()}\n{end}", text))


def headline(results: dict) -> str:
    """The table a reader wants first: absolute throughput, the ratios, peak memory, training and caching cost."""
    inference, training = results.get("inference"), results.get("training")
    if inference is None:
        return ""
    rows = []
    for row in inference["results"]:
        contenders, ratios, memory = row["contenders"], row["ratios"], row.get("memory", {})

        def images_per_s(name, contenders=contenders):
            return f"{contenders[name]['images_per_s']:.2f}" if name in contenders else "–"

        def ratio(key, digits, ratios=ratios):
            return f"{ratios[key]:.{digits}f}" if key in ratios else "–"

        peak = memory.get("emovlm_kd", {}).get("total_mib")
        rows.append(
            [
                size_name(row["image_size"]),
                row["image_tokens"],
                row["batch_size"],
                images_per_s("emovlm_kd"),
                images_per_s("vlm_floor"),
                images_per_s("reference"),
                ratio("emovlm_kd_over_floor", 3),
                ratio("reference_over_emovlm_kd", 1),
                f"{peak / 1024:.2f}" if peak is not None else "–",
                ratio("memory_emovlm_kd_over_floor", 3),
            ]
        )
    lines = [
        "### At a glance",
        markdown_table(
            [
                "image",
                "image tokens",
                "batch",
                "emovlm_kd images/s",
                "floor images/s",
                "reference images/s",
                "emovlm_kd / floor",
                "reference / emovlm_kd",
                "peak GiB (emovlm_kd)",
                "memory emovlm_kd / floor",
            ],
            rows,
        ),
    ]
    if training is not None:
        cached, reference = training["cached"], training["reference"]
        caching = training.get("feature_caching_images_per_s")
        lines.append(
            f"Training stages 3 + 4 on {training['settings']['num_images']} images: cached "
            f"{cached['total_s']:.1f} s vs the reference's per-sample loops {reference['total_s']:.0f} s "
            f"(**{training['ratio_reference_over_cached']:.0f}×**)"
            + (f"; feature caching **{caching:.2f} images/s**." if caching else ".")
        )
    return "\n\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    plan = PLANS.get((args.preset, (args.device or "cpu").split(":")[0]), {})
    if args.smoke:  # the preset's plan, on the small CPU model
        args.tag = args.tag or default_tag(args)
        args.preset, args.device, args.dtype = "cpu", "cpu", "float32"
    else:
        require_device(args.device or "cpu")  # fail fast, before any model is built
    tag = args.tag = args.tag or default_tag(args)
    common = shared_argv(args)
    only = args.only or [script for script in SCRIPTS if not plan or script in plan]
    results = {}
    for name, module in SCRIPTS.items():
        if not args.summarize_only and name in only:
            print(f"\n===== {name} =====", flush=True)
            results[name] = module.main(common + plan_argv(plan, name, args.smoke))
    output_dir = args.output_dir or RESULTS_DIR
    sections = []
    for name, module in SCRIPTS.items():  # re-rendered from the JSON, so the markdown follows the current code
        json_path = output_dir / f"{name}_{tag}.json"
        if json_path.exists():
            results.setdefault(name, json.loads(json_path.read_text()))
            markdown = module.to_markdown(results[name]).strip() + "\n"
            json_path.with_suffix(".md").write_text(markdown)
            sections.append(markdown)
    summary = "\n\n".join(section.strip() for section in [headline(results), *sections] if section) + "\n"
    summary_path = output_dir / f"summary_{tag}.md"
    summary_path.write_text(summary)
    print(f"wrote {summary_path}")
    if args.update_readme:
        update_readme(summary.replace("### ", "#### "), tag, args.readme)
        print(f"updated {args.readme}")
    return results


if __name__ == "__main__":
    main()
