#!/usr/bin/env python
"""Inference cost of EmoVLM-KD against the one-forward floor and the paper's reference pipeline.

Contenders, all on the same weights and the same preprocessed inputs (preprocessing is not timed):
  emovlm_kd      this model's forward: one vision pass, exact scores of all classes (prompt + answer trie in one LM
                 pass), distilled head, gate;
  vlm_floor      a bare VLM forward over the same inputs (one vision pass + one LM pass, logits of the last position
                 only): what any VLM-based classifier must at least spend;
  reference      the paper's public code path, one image at a time: sampled generation (temperature 0.8) of an answer
                 as long as `{'emotion': 'contentment'}`, regex parse to one-hot, a second visual encoder copy for the
                 head, gate;
  reference_256  the same with the reference's own `max_new_tokens=256` (a random-init VLM never stops early).

Times are medians of `--runs` rounds after `--warmup`, the contenders interleaved round-robin. Peak memory is
measured in a fresh subprocess per contender and image size (see `MemoryProbe`).

    python benchmarks/bench_inference.py                                 # CPU defaults
    python benchmarks/bench_inference.py --threads 1 --clock cpu         # on a busy shared machine
    python benchmarks/bench_inference.py --device cuda --dtype bfloat16  # gpu preset
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    MEASURE_MEMORY_ENV,
    MIKELS_LABELS,
    MemoryProbe,
    ModelSpec,
    add_common_arguments,
    build_model,
    check_arguments,
    clock_note,
    count_parameters,
    machine_info,
    machine_line,
    markdown_table,
    model_line,
    module_bytes,
    paired_ratio,
    realistic_answer_length,
    setup,
    spec_dict,
    summarize,
    synthetic_images,
    time_interleaved,
    to_device,
    write_results,
)
from reference_pipeline import ReferencePipeline  # noqa: E402

CONTENDERS = ("emovlm_kd", "vlm_floor", "reference", "reference_256")
MEMORY_CONTENDERS = ("emovlm_kd", "vlm_floor", "reference")
FLOOR_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
TARGETS = {
    "emovlm_kd_over_floor_max": 1.15,
    "reference_over_emovlm_kd_at_batch_1_min": 3.0,
    "memory_emovlm_kd_over_floor_max": 1.05,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 448], help="square image sides (px)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--long-generation-tokens", type=int, default=256, help="max_new_tokens of reference_256 (0: skip it)"
    )
    parser.add_argument(
        "--long-generation-at",
        type=int,
        nargs=2,
        action="append",
        metavar=("IMAGE_SIZE", "BATCH_SIZE"),
        help="where to also time reference_256 (repeatable; default: the first image size at batch 1)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--memory-worker", choices=MEMORY_CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_arguments(
        parser,
        args,
        image_sizes=[("--image-sizes", size) for size in args.image_sizes],
        counts=[("--batch-sizes", size) for size in args.batch_sizes],
    )
    if args.long_generation_at is None:
        args.long_generation_at = [[args.image_sizes[0], 1]]
    return args


class Contenders:
    """The model, the reference pipelines and the callables to time, for one image size."""

    def __init__(self, args, device, dtype, spec, image_size):
        self.device, self.dtype, self.image_size, self.seed = device, dtype, image_size, args.seed
        self.model, self.image_processor, self.vlm_processor = build_model(
            spec, image_size, MIKELS_LABELS, device, dtype, args.seed
        )
        self.answer_tokens = realistic_answer_length(self.model)
        self.reference = ReferencePipeline(self.model, self.vlm_processor, self.answer_tokens, self.answer_tokens)
        tokens = args.long_generation_tokens
        self.reference_long = ReferencePipeline(
            self.model, self.vlm_processor, tokens, tokens, visual_encoder_copy=self.reference.visual_encoder_copy
        )

    def batch(self, batch_size: int) -> dict:
        images = synthetic_images(batch_size, self.image_size, seed=self.seed + batch_size)
        inputs = to_device(self.image_processor(images), self.device, self.dtype)
        return {
            "inputs": inputs,
            "floor_inputs": {key: inputs[key] for key in FLOOR_INPUTS},
            "reference_inputs": self.reference.prepare(images, self.device, self.dtype),
        }

    def callables(self, batch: dict, names) -> dict:
        available = {
            "emovlm_kd": lambda: self.model(**batch["inputs"]),
            "vlm_floor": lambda: self.model.vlm(**batch["floor_inputs"], logits_to_keep=1),
            "reference": lambda: self.reference.predict(batch["reference_inputs"]),
            "reference_256": lambda: self.reference_long.predict(batch["reference_inputs"]),
        }
        return {name: available[name] for name in names}

    def weight_bytes(self, name: str) -> int:
        """The weights a contender must hold: the VLM; + head and gate; + the reference's encoder copy."""
        if name == "vlm_floor":
            return module_bytes(self.model.vlm)
        if name == "emovlm_kd":
            return module_bytes(self.model)
        return module_bytes(*self.reference.modules())

    @staticmethod
    def shapes(batch: dict) -> dict:
        inputs = batch["inputs"]
        return {
            "image_tokens": int(inputs["mm_token_type_ids"][0].sum()),
            "prompt_tokens": int(inputs["attention_mask"][0].sum()),
        }


def contender_names(args, image_size: int, batch_size: int) -> list[str]:
    names = ["emovlm_kd", "vlm_floor", "reference"]
    if args.long_generation_tokens and [image_size, batch_size] in args.long_generation_at:
        names.append("reference_256")
    return names


# ---------------------------------------------------------------------------------------------------- memory
def memory_worker(args) -> None:
    """In a fresh process: peak memory of one contender for each batch size (ascending), printed as one JSON line."""
    device, dtype, spec, _, _ = setup(args)
    (image_size,) = args.image_sizes
    name = args.memory_worker
    contenders = Contenders(args, device, dtype, spec, image_size)
    probe, report = MemoryProbe(device), {}
    with torch.inference_mode():
        for batch_size in sorted(args.batch_sizes):
            batch = contenders.batch(batch_size)
            run = contenders.callables(batch, [name])[name]
            run()  # warm-up: one-time allocations (trie tensors, caches) are not part of a steady-state peak
            before = probe.current_mib()
            probe.reset_peak()
            run()
            inference_peak = max(probe.peak_mib() - before, 0.0)
            weights = contenders.weight_bytes(name) / 2**20
            report[str(batch_size)] = {
                "weights_mib": weights,
                "inference_peak_mib": inference_peak,
                "total_mib": weights + inference_peak,
            }
    print(json.dumps(report))


def measure_memory(args, image_size: int) -> dict:
    """{contender: {batch_size: memory report}}, one subprocess per contender."""
    memory = {}
    for name in MEMORY_CONTENDERS:
        command = [
            sys.executable,
            __file__,
            "--memory-worker",
            name,
            "--image-sizes",
            str(image_size),
            "--batch-sizes",
            *map(str, args.batch_sizes),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--long-generation-tokens",
            "1",
        ]
        if args.preset:
            command += ["--preset", args.preset]
        env = {**os.environ, **MEASURE_MEMORY_ENV}
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"memory worker for {name} at {image_size}px failed:\n{completed.stderr[-3000:]}")
        memory[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    return memory


# ---------------------------------------------------------------------------------------------------- timing
def benchmark_image_size(args, device, dtype, spec, image_size, progress) -> tuple[list[dict], int]:
    contenders = Contenders(args, device, dtype, spec, image_size)
    torch.manual_seed(args.seed)  # the reference samples
    rows = []
    for batch_size in args.batch_sizes:
        batch = contenders.batch(batch_size)
        names = contender_names(args, image_size, batch_size)
        with torch.inference_mode():
            times = time_interleaved(contenders.callables(batch, names), args.runs, args.warmup, device, progress)
        stats = {name: summarize(times[name], batch_size, args.clock) for name in names}
        ratios = {
            "emovlm_kd_over_floor": stats["emovlm_kd"]["median_s"] / stats["vlm_floor"]["median_s"],
            "reference_over_emovlm_kd": stats["reference"]["median_s"] / stats["emovlm_kd"]["median_s"],
            "emovlm_kd_over_floor_paired": paired_ratio(times, "emovlm_kd", "vlm_floor", args.clock),
            "reference_over_emovlm_kd_paired": paired_ratio(times, "reference", "emovlm_kd", args.clock),
        }
        if "reference_256" in stats:
            ratios["reference_256_over_emovlm_kd"] = (
                stats["reference_256"]["median_s"] / stats["emovlm_kd"]["median_s"]
            )
        rows.append(
            {
                "image_size": image_size,
                **contenders.shapes(batch),
                "batch_size": batch_size,
                "reference_generated_tokens": contenders.answer_tokens,
                "trie_nodes": len(contenders.model._trie),
                "contenders": stats,
                "ratios": ratios,
            }
        )
    return rows, count_parameters(contenders.model)


def attach_memory(args, rows, image_size):
    memory = measure_memory(args, image_size)
    for row in rows:
        if row["image_size"] != image_size:
            continue
        row["memory"] = {name: memory[name][str(row["batch_size"])] for name in memory}
        ours, floor = row["memory"]["emovlm_kd"], row["memory"]["vlm_floor"]
        row["ratios"]["memory_emovlm_kd_over_floor"] = ours["total_mib"] / floor["total_mib"]
        row["ratios"]["memory_inference_peak_emovlm_kd_over_floor"] = ours["inference_peak_mib"] / max(
            floor["inference_peak_mib"], 1e-9
        )


def check_targets(rows) -> dict:
    checks = {}
    for row in rows:
        ratios, check = row["ratios"], {}
        check["emovlm_kd_over_floor"] = ratios["emovlm_kd_over_floor"] <= TARGETS["emovlm_kd_over_floor_max"]
        if row["batch_size"] == 1:
            minimum = TARGETS["reference_over_emovlm_kd_at_batch_1_min"]
            check["reference_over_emovlm_kd"] = ratios["reference_over_emovlm_kd"] >= minimum
        if "memory_emovlm_kd_over_floor" in ratios:
            maximum = TARGETS["memory_emovlm_kd_over_floor_max"]
            check["memory_emovlm_kd_over_floor"] = ratios["memory_emovlm_kd_over_floor"] <= maximum
        checks[f"{row['image_size']}px_batch{row['batch_size']}"] = check
    return checks


# ---------------------------------------------------------------------------------------------------- report
def _mark(passed) -> str:
    return "" if passed is None else (" ✓" if passed else " ✗")


def method_note(settings: dict, row: dict) -> str:
    timing = (
        f"Times: {clock_note(settings['clock'], settings['threads'])}, median of {settings['runs']} runs after "
        f"{settings['warmup']} warm-up, contenders interleaved; preprocessing not timed."
    )
    generation = (
        f"`reference` generates {row['reference_generated_tokens']} tokens (`{{'emotion': 'contentment'}}` + end "
        f"of turn), `reference_256` generates {settings['long_generation_tokens']}."
    )
    memory = "Peak memory (MiB) = weights held + peak inference growth of the resident set, a process per contender."
    return f"8 classes (Mikels), trie of {row['trie_nodes']} answer tokens. {timing} {generation} {memory}"


def to_markdown(result: dict) -> str:
    settings, rows = result["settings"], result["results"]
    table = []
    for row in rows:
        ours = row["contenders"]["emovlm_kd"]["median_s"]
        for name, stats in row["contenders"].items():
            memory = row.get("memory", {}).get(name)
            memory_cell = (
                f"{memory['total_mib']:.0f} = {memory['weights_mib']:.0f} + {memory['inference_peak_mib']:.0f}"
                if memory
                else "–"
            )
            table.append(
                [
                    f"{row['image_size']}²",
                    row["image_tokens"],
                    row["batch_size"],
                    name,
                    f"{1000 * stats['median_s']:.0f}",
                    f"{stats['images_per_s']:.2f}",
                    f"{stats['median_s'] / ours:.2f}×",
                    memory_cell,
                ]
            )
    ratio_rows = []
    for row in rows:
        ratios, checks = row["ratios"], result["target_checks"][f"{row['image_size']}px_batch{row['batch_size']}"]
        ratio_rows.append(
            [
                f"{row['image_size']}²",
                row["prompt_tokens"],
                row["batch_size"],
                f"{ratios['emovlm_kd_over_floor']:.2f}{_mark(checks.get('emovlm_kd_over_floor'))}",
                f"{ratios['reference_over_emovlm_kd']:.1f}{_mark(checks.get('reference_over_emovlm_kd'))}",
                f"{ratios['reference_256_over_emovlm_kd']:.0f}" if "reference_256_over_emovlm_kd" in ratios else "–",
                f"{ratios['memory_emovlm_kd_over_floor']:.3f}{_mark(checks.get('memory_emovlm_kd_over_floor'))}"
                if "memory_emovlm_kd_over_floor" in ratios
                else "–",
            ]
        )
    model = dict(result["model"])
    preset, parameters = model.pop("preset"), model.pop("parameters")
    return "\n\n".join(
        [
            "### Inference",
            machine_line(result["machine"]),
            model_line(ModelSpec(**model), preset, parameters, settings["dtype"]),
            method_note(settings, rows[0]),
            markdown_table(
                [
                    "image",
                    "image tokens",
                    "batch",
                    "contender",
                    "ms / batch",
                    "images/s",
                    "time vs emovlm_kd",
                    "peak MiB = weights + inference",
                ],
                table,
            ),
            markdown_table(
                [
                    "image",
                    "prompt tokens",
                    "batch",
                    "emovlm_kd / floor (≤ 1.15)",
                    "reference / emovlm_kd (≥ 3 at batch 1)",
                    "reference_256 / emovlm_kd",
                    "memory emovlm_kd / floor (≤ 1.05)",
                ],
                ratio_rows,
            ),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    device, dtype, spec, preset, tag = setup(args)
    machine = machine_info(device)
    calls = (args.warmup + args.runs) * sum(
        len(contender_names(args, size, batch)) for size in args.image_sizes for batch in args.batch_sizes
    )
    rows = []
    with tqdm(total=calls, desc="inference timing", unit="call") as progress:
        for image_size in args.image_sizes:
            size_rows, parameters = benchmark_image_size(args, device, dtype, spec, image_size, progress)
            rows += size_rows
    if not args.skip_memory:
        for image_size in tqdm(args.image_sizes, desc="inference memory (a process per contender)"):
            attach_memory(args, rows, image_size)
    result = {
        "benchmark": "inference",
        "machine": machine,
        "model": {**spec_dict(spec, preset), "parameters": parameters},
        "settings": {
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "runs": args.runs,
            "warmup": args.warmup,
            "labels": MIKELS_LABELS,
            "long_generation_tokens": args.long_generation_tokens,
            "reference_sampling": {"do_sample": True, "temperature": 0.8, "top_p": 1.0},
            "memory_method": (
                "weights: bytes of the parameters and buffers each contender holds (the reference adds its encoder "
                "copy); inference peak: in a fresh process per contender (glibc mmap threshold fixed at 64 KiB), "
                "after one warm-up call, the growth of the peak resident set (VmHWM, reset through "
                "/proc/self/clear_refs) over the resident set before the call; on CUDA "
                "torch.cuda.max_memory_allocated over memory_allocated"
            ),
        },
        "targets": TARGETS,
        "results": rows,
    }
    result["target_checks"] = check_targets(rows)
    json_path, md_path, markdown = write_results(result, to_markdown, args.output_dir, f"inference_{tag}")
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
