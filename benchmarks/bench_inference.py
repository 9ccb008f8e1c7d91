#!/usr/bin/env python
"""Inference cost of EmoVLM-KD against the one-forward floor and the paper's reference pipeline.

Contenders, all on the same weights and the same preprocessed inputs (preprocessing is timed apart):
  emovlm_kd      this model's forward: one vision pass, exact scores of all classes (prompt + answer trie in one LM
                 pass), distilled head, gate;
  vlm_floor      a bare VLM forward over the same inputs (one vision pass + one LM pass, logits of the last position
                 only): what any VLM-based classifier must at least spend;
  reference      the paper's public code path, one image at a time: sampled generation (temperature 0.8) of an answer
                 as long as `{'emotion': 'contentment'}`, regex parse to one-hot, a second visual encoder copy for the
                 head, gate;
  reference_256  the same with the reference's own `max_new_tokens=256` (a random-init VLM never stops early).

Images are capped at 1024 px on the longest side (the paper's cap) and resized by the Qwen2-VL processor with the
checkpoints' settings; image sizes that give the same model inputs (1024x768 and a 4032x3024 photo, once capped) are
timed once. Times are medians of `--runs` rounds after `--warmup`, the contenders interleaved round-robin. Peak memory:
a fresh subprocess per contender and image size for the small presets on CPU (see `MemoryProbe`), the timed calls
themselves for the published architectures and on CUDA.

    python benchmarks/bench_inference.py                                 # CPU defaults (cpu preset, 224 and 448 px)
    python benchmarks/bench_inference.py --threads 1 --clock cpu         # on a busy shared machine
    python benchmarks/bench_inference.py --preset qwen2-vl-2b --dtype bfloat16 --threads 1 --clock cpu \
        --batch-sizes 1 2 --max-batch-image-tokens 600 --runs 3 --warmup 0 --long-generation-runs 1
    python benchmarks/bench_inference.py --preset qwen2-vl-7b --device cuda --dtype bfloat16
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    MEASURE_MEMORY_ENV,
    MIKELS_LABELS,
    MemoryProbe,
    add_common_arguments,
    build_model,
    cap_images,
    check_arguments,
    clock_note,
    count_parameters,
    is_real_scale,
    machine_info,
    machine_line,
    markdown_table,
    model_line,
    module_bytes,
    paired_ratio,
    parse_image_size,
    realistic_answer_length,
    setup,
    size_key,
    size_name,
    spec_dict,
    summarize,
    synthetic_images,
    time_interleaved,
    to_device,
    vlm_floor_call,
    write_results,
)
from reference_pipeline import ReferencePipeline  # noqa: E402

CONTENDERS = ("emovlm_kd", "vlm_floor", "reference", "reference_256")
TIMED_TOGETHER = ("emovlm_kd", "vlm_floor", "reference")
# Small presets: the targets of the first (tiny-model) results. Published architectures on real photo sizes: the
# targets of the real-scale issue.
TARGETS = {
    "emovlm_kd_over_floor_max": 1.15,
    "reference_over_emovlm_kd_at_batch_1_min": 3.0,
    "memory_emovlm_kd_over_floor_max": 1.05,
}
REAL_SCALE_TARGETS = {**TARGETS, "emovlm_kd_over_floor_max": 1.05}
SMALL_PRESET_SIZES = [(224, 224), (448, 448)]
# FI-like photo, the paper's 1024-px cap, a 12-MP phone photo (capped to 1024x768 before the VLM processor).
REAL_PHOTO_SIZES = [(500, 375), (1024, 768), (4032, 3024)]
PREPROCESSING_RUNS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--image-sizes",
        type=parse_image_size,
        nargs="+",
        default=None,
        help="WIDTHxHEIGHT or SIDE (default: 224 448 for the small presets, 500x375 1024x768 4032x3024 for the "
        "published architectures)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--max-batch-image-tokens",
        type=int,
        default=None,
        help="skip a batch size above 1 whose batch x image tokens exceeds this (keeps large images to batches that "
        "fit a CPU's time budget)",
    )
    parser.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="which contenders to time"
    )
    parser.add_argument(
        "--long-generation-tokens", type=int, default=256, help="max_new_tokens of reference_256 (0: skip it)"
    )
    parser.add_argument(
        "--long-generation-at",
        nargs=2,
        action="append",
        metavar=("IMAGE_SIZE", "BATCH_SIZE"),
        help="where to also time reference_256 (repeatable; default: the first image size at batch 1)",
    )
    parser.add_argument(
        "--long-generation-runs", type=int, default=None, help="timed runs of reference_256 (default: --runs)"
    )
    parser.add_argument(
        "--memory",
        choices=["auto", "subprocess", "inline", "skip"],
        default="auto",
        help="peak memory: a fresh process per contender (exact to ~0.1 MiB; small presets on CPU), during the "
        "timed calls (published architectures, CUDA), or not at all; auto picks",
    )
    parser.add_argument("--memory-worker", choices=TIMED_TOGETHER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.image_sizes is None:
        args.image_sizes = REAL_PHOTO_SIZES if args.preset and is_real_scale(args.preset) else SMALL_PRESET_SIZES
    if args.long_generation_runs is None:
        args.long_generation_runs = args.runs
    check_arguments(
        parser,
        args,
        image_sizes=[("--image-sizes", size) for size in args.image_sizes],
        counts=[("--batch-sizes", size) for size in args.batch_sizes]
        + [("--long-generation-runs", args.long_generation_runs)],
    )
    if args.long_generation_at is None:
        args.long_generation_at = [[args.image_sizes[0], 1]]
    else:
        try:
            args.long_generation_at = [[parse_image_size(size), int(batch)] for size, batch in args.long_generation_at]
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"--long-generation-at: {error}")
    if args.memory == "auto":
        cuda = torch.device(args.device).type == "cuda"
        args.memory = "inline" if cuda or (args.preset and is_real_scale(args.preset)) else "subprocess"
    return args


class Contenders:
    """The model, the reference pipelines and the callables to time (one model for every image size)."""

    def __init__(self, args, device, dtype, spec):
        self.device, self.dtype, self.seed = device, dtype, args.seed
        self.model, self.image_processor, self.vlm_processor = build_model(
            spec, MIKELS_LABELS, device, dtype, args.seed
        )
        self.answer_tokens = realistic_answer_length(self.model)
        self.reference = ReferencePipeline(self.model, self.vlm_processor, self.answer_tokens, self.answer_tokens)
        tokens = args.long_generation_tokens
        self.reference_long = ReferencePipeline(
            self.model, self.vlm_processor, tokens, tokens, visual_encoder_copy=self.reference.visual_encoder_copy
        )

    def images(self, image_size, batch_size: int) -> list:
        return synthetic_images(batch_size, image_size, seed=self.seed + batch_size)

    def model_inputs(self, images) -> tuple[dict, str]:
        """This model's inputs (the paper's cap, then the image processor) and who applied the cap."""
        capped, cap = cap_images(images, self.image_processor)
        return to_device(self.image_processor(capped), self.device, self.dtype), cap

    def batch(self, images) -> dict:
        inputs, cap = self.model_inputs(images)
        return {
            "inputs": inputs,
            "reference_inputs": self.reference.prepare(images, self.device, self.dtype),
            "cap": cap,
        }

    def callables(self, batch: dict, names) -> dict:
        available = {
            "emovlm_kd": lambda: self.model(**batch["inputs"]),
            "vlm_floor": vlm_floor_call(self.model.vlm, batch["inputs"]),
            "reference": lambda: self.reference.predict(batch["reference_inputs"]),
            "reference_256": lambda: self.reference_long.predict(batch["reference_inputs"]),
        }
        return {name: available[name] for name in names}

    def memory_report(self, name: str, inference_peak_mib: float) -> dict:
        """A contender's peak memory in MiB: the weights it holds + the peak growth during inference."""
        weights = self.weight_bytes(name) / 2**20
        return {
            "weights_mib": weights,
            "inference_peak_mib": inference_peak_mib,
            "total_mib": weights + inference_peak_mib,
        }

    def weight_bytes(self, name: str) -> int:
        """The weights a contender must hold: the VLM; + head and gate; + the reference's encoder copy."""
        if name == "vlm_floor":
            return module_bytes(self.model.vlm)
        if name == "emovlm_kd":
            return module_bytes(self.model)
        return module_bytes(*self.reference.modules())

    def uncapped_image_tokens(self, image_size) -> int:
        """LM image tokens the VLM's processor alone (no 1024-px cap) would give an image of this size."""
        processor = self.image_processor
        factor = processor.patch_size * processor.merge_size
        height, width = smart_resize(
            image_size[1], image_size[0], factor, processor.size["shortest_edge"], processor.size["longest_edge"]
        )
        return (height // factor) * (width // factor)

    def preprocessing(self, image_size, runs: int = PREPROCESSING_RUNS) -> dict:
        """Median seconds to turn one decoded image of this size into model inputs: this model's path (cap + image
        processor with the prompt) and the reference's (cap + chat template + VLM processor)."""
        (image,) = self.images(image_size, 1)
        paths = {
            "emovlm_kd": lambda: self.image_processor(cap_images([image], self.image_processor)[0]),
            "reference": lambda: self.reference.prepare([image]),
        }
        times = time_interleaved(paths, runs, 0)
        return {name: {clock: statistics.median(times[name][clock]) for clock in ("wall", "cpu")} for name in paths}

    def shapes(self, batch: dict) -> dict:
        inputs, patch = batch["inputs"], self.image_processor.patch_size
        return {
            "image_tokens": int(inputs["mm_token_type_ids"][0].sum()),
            "prompt_tokens": int(inputs["attention_mask"][0].sum()),
            "model_image_size": [int(side) * patch for side in inputs["image_grid_thw"][0, [2, 1]]],
        }


def contender_names(args, image_size, batch_size: int) -> list[str]:
    names = [name for name in TIMED_TOGETHER if name in args.contenders]
    if (
        "reference_256" in args.contenders
        and args.long_generation_tokens
        and [tuple(image_size), batch_size] in [[tuple(size), batch] for size, batch in args.long_generation_at]
    ):
        names.append("reference_256")
    return names


def batch_sizes_for(args, image_tokens: int) -> list[int]:
    limit = args.max_batch_image_tokens
    return [size for size in args.batch_sizes if size == 1 or limit is None or size * image_tokens <= limit]


def memory_worker(args) -> None:
    """In a fresh process: peak memory of one contender for each batch size (ascending), printed as one JSON line."""
    device, dtype, spec, _, _ = setup(args)
    (image_size,) = args.image_sizes
    name = args.memory_worker
    contenders = Contenders(args, device, dtype, spec)
    probe, report = MemoryProbe(device), {}
    with torch.inference_mode():
        for batch_size in sorted(args.batch_sizes):
            batch = contenders.batch(contenders.images(image_size, batch_size))
            run = contenders.callables(batch, [name])[name]
            run()  # warm-up: one-time allocations (trie tensors, caches) are not part of a steady-state peak
            before = probe.current_mib()
            probe.reset_peak()
            run()
            report[str(batch_size)] = contenders.memory_report(name, max(probe.peak_mib() - before, 0.0))
    print(json.dumps(report))


def measure_memory_in_subprocesses(args, image_size, batch_sizes, names) -> dict:
    """{contender: {batch_size: memory report}}, one subprocess per contender."""
    memory = {}
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--memory-worker",
            name,
            "--image-sizes",
            size_key(image_size),
            "--batch-sizes",
            *map(str, batch_sizes),
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
            raise RuntimeError(
                f"memory worker for {name} at {size_key(image_size)} failed:\n{completed.stderr[-3000:]}"
            )
        memory[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    return memory


def inline_memory(contenders: Contenders, name: str, times: dict) -> dict:
    """Memory report of a contender from the peaks recorded during its timed calls (their maximum)."""
    return contenders.memory_report(name, max(times[name]["peak_mib"]))


def measure_row(args, contenders, image_size, batch_size, progress) -> dict:
    batch = contenders.batch(contenders.images(image_size, batch_size))
    names = contender_names(args, image_size, batch_size)
    together = [name for name in names if name != "reference_256"]
    probe = MemoryProbe(contenders.device) if args.memory == "inline" else None
    with torch.inference_mode():
        callables = contenders.callables(batch, names)
        times = time_interleaved(
            {name: callables[name] for name in together}, args.runs, args.warmup, contenders.device, progress, probe
        )
        if "reference_256" in names:  # after `reference`, which warmed up the same code and shapes
            long_generation = {"reference_256": callables["reference_256"]}
            runs = args.long_generation_runs
            times.update(time_interleaved(long_generation, runs, 0, contenders.device, progress))
    stats = {name: summarize(times[name], batch_size, args.clock) for name in names}
    row = {
        "image_size": list(image_size),
        **contenders.shapes(batch),
        "batch_size": batch_size,
        "image_cap": batch["cap"],
        "reference_generated_tokens": contenders.answer_tokens,
        "trie_nodes": len(contenders.model._trie),
        "contenders": stats,
        "ratios": {},
    }
    ratios = row["ratios"]
    if {"emovlm_kd", "vlm_floor"} <= set(stats):
        ratios["emovlm_kd_over_floor"] = stats["emovlm_kd"]["median_s"] / stats["vlm_floor"]["median_s"]
        ratios["emovlm_kd_over_floor_paired"] = paired_ratio(times, "emovlm_kd", "vlm_floor", args.clock)
    if {"emovlm_kd", "reference"} <= set(stats):
        ratios["reference_over_emovlm_kd"] = stats["reference"]["median_s"] / stats["emovlm_kd"]["median_s"]
        ratios["reference_over_emovlm_kd_paired"] = paired_ratio(times, "reference", "emovlm_kd", args.clock)
    if {"emovlm_kd", "reference_256"} <= set(stats):
        ratios["reference_256_over_emovlm_kd"] = stats["reference_256"]["median_s"] / stats["emovlm_kd"]["median_s"]
    if probe is not None:
        row["memory"] = {name: inline_memory(contenders, name, times) for name in together}
    return row


def attach_memory_ratios(row) -> None:
    if {"emovlm_kd", "vlm_floor"} <= set(row.get("memory", {})):
        ours, floor = row["memory"]["emovlm_kd"], row["memory"]["vlm_floor"]
        row["ratios"]["memory_emovlm_kd_over_floor"] = ours["total_mib"] / floor["total_mib"]
        row["ratios"]["memory_inference_peak_emovlm_kd_over_floor"] = ours["inference_peak_mib"] / max(
            floor["inference_peak_mib"], 1e-9
        )


def benchmark_image_sizes(args, contenders, progress) -> tuple[list[dict], list[dict]]:
    """(timing rows, one per distinct model input and batch size; preprocessing rows, one per image size)."""
    rows, preprocessing, measured = [], [], {}
    for image_size in args.image_sizes:
        probe_batch = contenders.batch(contenders.images(image_size, 1))
        shapes = contenders.shapes(probe_batch)
        grid = tuple(probe_batch["inputs"]["image_grid_thw"][0].tolist())
        preprocessing.append(
            {
                "image_size": list(image_size),
                "model_image_size": shapes["model_image_size"],
                "image_tokens": shapes["image_tokens"],
                "uncapped_image_tokens": contenders.uncapped_image_tokens(image_size),
                "image_cap": probe_batch["cap"],
                "seconds": contenders.preprocessing(image_size),
                "timed_as": size_key(measured.get(grid, image_size)),
            }
        )
        if grid in measured:  # e.g. a 4032x3024 photo capped to 1024x768: the same model inputs, the same cost
            continue
        measured[grid] = image_size
        torch.manual_seed(args.seed)  # the reference samples
        size_rows = [
            measure_row(args, contenders, image_size, batch_size, progress)
            for batch_size in batch_sizes_for(args, shapes["image_tokens"])
        ]
        if args.memory == "subprocess":
            batch_sizes = [row["batch_size"] for row in size_rows]
            names = [name for name in TIMED_TOGETHER if name in args.contenders]
            memory = measure_memory_in_subprocesses(args, image_size, batch_sizes, names)
            for row in size_rows:
                row["memory"] = {name: memory[name][str(row["batch_size"])] for name in memory}
        for row in size_rows:
            attach_memory_ratios(row)
        rows += size_rows
    return rows, preprocessing


def row_key(row) -> str:
    size = row["image_size"]  # a side in results written before image sizes had a width and a height
    return f"{size if isinstance(size, int) else size_key(size)}px_batch{row['batch_size']}"


def row_size_name(row) -> str:
    return size_name(row["image_size"])  # a side in results written before image sizes had a width and a height


def check_targets(rows, targets: dict) -> dict:
    checks = {}
    for row in rows:
        ratios, check = row["ratios"], {}
        if "emovlm_kd_over_floor" in ratios:
            check["emovlm_kd_over_floor"] = ratios["emovlm_kd_over_floor"] <= targets["emovlm_kd_over_floor_max"]
        if row["batch_size"] == 1 and "reference_over_emovlm_kd" in ratios:
            minimum = targets["reference_over_emovlm_kd_at_batch_1_min"]
            check["reference_over_emovlm_kd"] = ratios["reference_over_emovlm_kd"] >= minimum
        if "memory_emovlm_kd_over_floor" in ratios:
            maximum = targets["memory_emovlm_kd_over_floor_max"]
            check["memory_emovlm_kd_over_floor"] = ratios["memory_emovlm_kd_over_floor"] <= maximum
        checks[row_key(row)] = check
    return checks


def _mark(passed) -> str:
    return "" if passed is None else (" ✓" if passed else " ✗")


MEMORY_NOTES = {
    "subprocess": "a process per contender",
    "inline": "measured during the timed calls (their maximum)",
    "skip": "not measured in this run",
}


def method_note(settings: dict, row: dict) -> str:
    """How the times and memory were measured (older results lack the newer settings: their defaults apply)."""
    warmup = settings["warmup"]
    timing = (
        f"Times: {clock_note(settings['clock'], settings['threads'])}, median of {settings['runs']} runs"
        + (f" after {warmup} warm-up" if warmup else " (no warm-up round)")
        + ", contenders interleaved; preprocessing "
        + ("timed apart." if "processor_limits" in settings else "not timed.")
    )
    long_runs = settings.get("long_generation_runs", settings["runs"])
    generation = (
        f"`reference` generates {row['reference_generated_tokens']} tokens (`{{'emotion': 'contentment'}}` + end "
        f"of turn), `reference_256` generates {settings['long_generation_tokens']}"
        + (f" ({long_runs} run{'s' if long_runs > 1 else ''})." if long_runs != settings["runs"] else ".")
    )
    memory = (
        "Peak memory (MiB) = weights held + peak inference growth "
        + ("of CUDA memory" if settings.get("device", "cpu").startswith("cuda") else "of the resident set")
        + f", {MEMORY_NOTES[settings.get('memory', 'subprocess')]}."
    )
    return f"8 classes (Mikels), trie of {row['trie_nodes']} answer tokens. {timing} {generation} {memory}"


def preprocessing_section(result: dict) -> list[str]:
    rows = result.get("preprocessing")
    if not rows:
        return []
    clock = result["settings"]["clock"]
    table = [
        [
            size_name(row["image_size"]),
            size_name(row["model_image_size"]),
            f"{row['image_tokens']} ({row['uncapped_image_tokens']})",
            f"{1000 * row['seconds']['emovlm_kd'][clock]:.0f}",
            f"{1000 * row['seconds']['reference'][clock]:.0f}",
            size_name(parse_image_size(row["timed_as"])),
        ]
        for row in result["preprocessing"]
    ]
    limits = result["settings"].get("processor_limits", {})
    return [
        f"Images: synthetic RGB of each size, longest side capped at 1024 px with LANCZOS (the paper's cap; applied "
        f"by {rows[0]['image_cap']}), then resized by the VLM's processor (min_pixels "
        f"{limits.get('min_pixels', '–'):,}, max_pixels {limits.get('max_pixels', '–'):,}, multiples of "
        f"{limits.get('resize_factor', 28)} px). "
        "Sizes that reach the model as the same inputs are timed once. Preprocessing: median ms per image, "
        f"{result['settings'].get('preprocessing_runs', PREPROCESSING_RUNS)} runs (not part of the times below; "
        "the reference repeats it for every image it scores).",
        markdown_table(
            [
                "image",
                "to the VLM",
                "image tokens (without the cap)",
                "emovlm_kd preprocessing ms",
                "reference preprocessing ms",
                "timed as",
            ],
            table,
        ),
    ]


def to_markdown(result: dict) -> str:
    settings, rows = result["settings"], result["results"]
    targets = result.get("targets", TARGETS)
    table = []
    for row in rows:
        ours = row["contenders"].get("emovlm_kd", {}).get("median_s")
        for name, stats in row["contenders"].items():
            memory = row.get("memory", {}).get(name)
            memory_cell = (
                f"{memory['total_mib']:,.0f} = {memory['weights_mib']:,.0f} + {memory['inference_peak_mib']:,.0f}"
                if memory
                else "–"
            )
            clock_stats = stats[stats["clock"]]
            table.append(
                [
                    row_size_name(row),
                    row["image_tokens"],
                    row["batch_size"],
                    name,
                    f"{1000 * stats['median_s']:,.0f}",
                    f"{1000 * clock_stats['min_s']:,.0f}–{1000 * clock_stats['max_s']:,.0f} ({stats['runs']})",
                    f"{stats['images_per_s']:.2f}" if stats["images_per_s"] >= 0.1 else f"{stats['images_per_s']:.3f}",
                    f"{stats['median_s'] / ours:.2f}×" if ours else "–",
                    memory_cell,
                ]
            )
    ratio_rows = []
    for row in rows:
        ratios, checks = row["ratios"], result["target_checks"][row_key(row)]

        def cell(key, digits, check=None, ratios=ratios, checks=checks):
            return f"{ratios[key]:.{digits}f}{_mark(checks.get(check))}" if key in ratios else "–"

        reference_digits = 1 if ratios.get("reference_over_emovlm_kd", 0) < 10 else 0
        ratio_rows.append(
            [
                row_size_name(row),
                row["prompt_tokens"],
                row["batch_size"],
                cell("emovlm_kd_over_floor", 3, "emovlm_kd_over_floor"),
                cell("reference_over_emovlm_kd", reference_digits, "reference_over_emovlm_kd"),
                cell("reference_256_over_emovlm_kd", 0),
                cell("memory_emovlm_kd_over_floor", 3, "memory_emovlm_kd_over_floor"),
            ]
        )
    return "\n\n".join(
        [
            "### Inference",
            machine_line(result["machine"]),
            model_line(result["model"], settings["dtype"]),
            *preprocessing_section(result),
            method_note(settings, rows[0]),
            markdown_table(
                [
                    "image",
                    "image tokens",
                    "batch",
                    "contender",
                    "ms / batch",
                    "min–max ms (runs)",
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
                    f"emovlm_kd / floor (≤ {targets['emovlm_kd_over_floor_max']})",
                    f"reference / emovlm_kd (≥ {targets['reference_over_emovlm_kd_at_batch_1_min']:g} at batch 1)",
                    "reference_256 / emovlm_kd",
                    f"memory emovlm_kd / floor (≤ {targets['memory_emovlm_kd_over_floor_max']})",
                ],
                ratio_rows,
            ),
        ]
    )


MEMORY_METHODS = {
    "subprocess": (
        "weights: bytes of the parameters and buffers each contender holds (the reference adds its encoder copy); "
        "inference peak: in a fresh process per contender (glibc mmap threshold fixed at 64 KiB), after one warm-up "
        "call, the growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident "
        "set before the call"
    ),
    "inline": (
        "weights: bytes of the parameters and buffers each contender holds (the reference adds its encoder copy); "
        "inference peak: the largest growth over the timed calls of the peak resident set (VmHWM, reset through "
        "/proc/self/clear_refs, after gc and malloc_trim) over the resident set before the call, or on CUDA of "
        "torch.cuda.max_memory_allocated over memory_allocated"
    ),
}


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    device, dtype, spec, preset, tag = setup(args)
    machine = machine_info(device)
    contenders = Contenders(args, device, dtype, spec)
    with tqdm(desc="inference timing", unit="call") as progress:
        rows, preprocessing = benchmark_image_sizes(args, contenders, progress)
    targets = REAL_SCALE_TARGETS if is_real_scale(preset) else TARGETS
    processor = contenders.image_processor
    result = {
        "benchmark": "inference",
        "machine": machine,
        "model": {**spec_dict(spec, preset), "parameters": count_parameters(contenders.model)},
        "settings": {
            "device": str(device),
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "runs": args.runs,
            "warmup": args.warmup,
            "labels": MIKELS_LABELS,
            "long_generation_tokens": args.long_generation_tokens,
            "long_generation_runs": args.long_generation_runs,
            "max_batch_image_tokens": args.max_batch_image_tokens,
            "processor_limits": {
                "min_pixels": processor.size["shortest_edge"],
                "max_pixels": processor.size["longest_edge"],
                "resize_factor": processor.patch_size * processor.merge_size,
            },
            "preprocessing_runs": PREPROCESSING_RUNS,
            "reference_sampling": {"do_sample": True, "temperature": 0.8, "top_p": 1.0},
            "memory": args.memory,
            "memory_method": MEMORY_METHODS.get(args.memory, "not measured"),
        },
        "targets": targets,
        "preprocessing": preprocessing,
        "results": rows,
    }
    result["target_checks"] = check_targets(rows, targets)
    json_path, md_path, markdown = write_results(result, to_markdown, args.output_dir, f"inference_{tag}")
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
