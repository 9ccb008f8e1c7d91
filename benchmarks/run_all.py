#!/usr/bin/env python
"""Run the three benchmarks with shared settings, write `results/summary_<tag>.md` and optionally refresh the README.

    python benchmarks/run_all.py                                   # CPU, ~10 minutes on an idle 2-core machine
    python benchmarks/run_all.py --threads 1 --clock cpu           # on a busy shared machine
    python benchmarks/run_all.py --device cuda --dtype bfloat16 --update-readme

Options given here are passed to every script; anything else keeps each script's default (run a script directly for
its own options, e.g. `bench_inference.py --image-sizes 224 448 896`).
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
from bench_utils import MODEL_PRESETS, RESULTS_DIR  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
SHARED_OPTIONS = ("preset", "device", "dtype", "threads", "clock", "runs", "warmup", "seed", "output_dir", "tag")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=["wall", "cpu"])
    parser.add_argument("--runs", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--tag")
    parser.add_argument("--only", nargs="+", choices=["inference", "training", "scaling"], help="run only these")
    parser.add_argument("--update-readme", action="store_true", help="put the summary into benchmarks/README.md")
    parser.add_argument(
        "--summarize-only", action="store_true", help="run nothing: rebuild the summary (and README) from result files"
    )
    return parser.parse_args(argv)


def shared_argv(args) -> list[str]:
    argv = []
    for name in SHARED_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def update_readme(markdown: str, tag: str, readme: Path = README) -> None:
    """Replace the text between `<!-- results:<tag>:start -->` and `<!-- results:<tag>:end -->` in the README."""
    start, end = f"<!-- results:{tag}:start -->", f"<!-- results:{tag}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers; add them where the {tag} results belong")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), flags=re.DOTALL)
    readme.write_text(pattern.sub(lambda _: f"{start}\n{markdown.strip()}\n{end}", text))


def main(argv=None):
    args = parse_args(argv)
    common = shared_argv(args)
    scripts = {"inference": bench_inference, "training": bench_training, "scaling": bench_scaling}
    results = {}
    for name, module in scripts.items():
        if not args.summarize_only and (args.only is None or name in args.only):
            print(f"\n===== {name} =====", flush=True)
            results[name] = module.main(common)
    tag = args.tag or (args.device or "cpu").split(":")[0]
    output_dir = args.output_dir or RESULTS_DIR
    sections = []
    for name, module in scripts.items():  # re-rendered from the JSON, so the markdown follows the current code
        json_path = output_dir / f"{name}_{tag}.json"
        if json_path.exists():
            markdown = module.to_markdown(json.loads(json_path.read_text())).strip() + "\n"
            json_path.with_suffix(".md").write_text(markdown)
            sections.append(markdown)
    summary = "\n\n".join(section.strip() for section in sections) + "\n"
    summary_path = output_dir / f"summary_{tag}.md"
    summary_path.write_text(summary)
    print(f"wrote {summary_path}")
    if args.update_readme:
        update_readme(summary.replace("### ", "#### "), tag)
        print(f"updated {README}")
    return results


if __name__ == "__main__":
    main()
