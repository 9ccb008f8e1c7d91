"""Shared pieces of the benchmarks: the benchmark model, inputs, interleaved timing, memory, reports.

Every contender of a benchmark runs on the same weights: a random-init Qwen2-VL-architecture VLM built offline from a
fixed seed, sized by a preset. `cpu` and `gpu` are small models built by `emovlm_kd.tiny` (one batch-8 forward in
~50-500 ms on a 2-core CPU; ~0.6B parameters for an accelerator); `qwen2-vl-2b` and `qwen2-vl-7b` have the published
architecture of Qwen2-VL-2B/7B-Instruct (`emovlm_kd.architectures`), vocabulary size included, so they cost what the
real checkpoints cost. Text is tokenised by the offline tiny tokenizer in every preset (ids below its ~500 entries;
the model's embedding and LM head keep the preset's full vocabulary).

Images go through the real Qwen2-VL processor settings (the checkpoints' min/max pixels) after the paper's cap of
the longest side at 1024 px (`cap_images`, with the package's `limit_longest_side`).
"""

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDImageProcessor
from emovlm_kd.architectures import ARCHITECTURES, QWEN2_VL_IMAGE_LIMITS, build_architecture_vlm
from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor
from image_processing_emovlm_kd import DEFAULT_MAX_IMAGE_SIDE, limit_longest_side

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The paper's 8 Mikels emotions (FI, EmoSet); `contentment` has the longest answer, the realistic generation length.
MIKELS_LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
LONGEST_ANSWER_LABEL = "contentment"
# Plausible larger label sets for the class-count scaling (Cowen & Keltner's 27 categories and a few more).
MANY_EMOTIONS = (
    "admiration, adoration, aesthetic appreciation, amusement, anger, anxiety, awe, awkwardness, boredom, calmness, "
    "confusion, craving, disgust, empathic pain, entrancement, excitement, fear, horror, interest, joy, nostalgia, "
    "relief, romance, sadness, satisfaction, surprise, contentment, pride, gratitude, hope, loneliness, serenity"
).split(", ")
BINARY_LABELS = ["negative", "positive"]
# The paper's distilled head: Linear(d -> 1024) - GELU - Dropout - Linear(1024 -> C).
HEAD_HIDDEN = 1024
# The one-forward floor: a bare VLM forward over these of the model's inputs, logits of the last position only.
FLOOR_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def labels_for(num_classes: int) -> list[str]:
    """2 -> sentiment, 8 -> Mikels, anything else -> the first `num_classes` of a 32-emotion list."""
    if num_classes == 2:
        return list(BINARY_LABELS)
    if num_classes == 8:
        return list(MIKELS_LABELS)
    if not 2 <= num_classes <= len(MANY_EMOTIONS):
        raise ValueError(f"num_classes must be between 2 and {len(MANY_EMOTIONS)}, got {num_classes}")
    return MANY_EMOTIONS[:num_classes]


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a small random-init Qwen2-VL-architecture VLM (arguments of `emovlm_kd.tiny.build_tiny_vlm`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vision_dim: int
    vision_depth: int
    head_hidden: int = HEAD_HIDDEN

    def summary(self) -> str:
        return (
            f"Qwen2-VL architecture, text {self.hidden_size} x {self.num_layers} layers (GQA "
            f"{self.num_heads}/{self.num_kv_heads} heads), vision {self.vision_dim} x {self.vision_depth} blocks"
        )


MODEL_PRESETS = {
    "cpu": ModelSpec(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, vision_dim=256, vision_depth=4),
    "gpu": ModelSpec(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, vision_dim=512, vision_depth=16),
    **ARCHITECTURES,
}


def is_real_scale(preset: str) -> bool:
    """Whether a preset has a published checkpoint's architecture (as opposed to a small test model)."""
    return preset in ARCHITECTURES


def parse_image_size(text: str) -> tuple[int, int]:
    """`"500x375"` -> (500, 375); `"224"` -> (224, 224). An argparse type."""
    import argparse

    try:
        parts = [int(part) for part in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"image size must be WIDTHxHEIGHT or SIDE (e.g. 500x375, 224), got {text!r}")
    return parts[0], parts[1]


def width_height(size) -> tuple[int, int]:
    """`(width, height)` of a size given as a pair or as one side (results written before sizes had both)."""
    width, height = (size, size) if isinstance(size, int) else size
    return width, height


def size_name(size) -> str:
    width, height = width_height(size)
    return f"{width}²" if width == height else f"{width}×{height}"


def size_key(size) -> str:
    return "x".join(map(str, size))


def add_common_arguments(parser):
    parser.add_argument(
        "--preset",
        choices=list(MODEL_PRESETS),
        default=None,
        help="model: small test models (cpu, gpu) or a published architecture (qwen2-vl-2b, qwen2-vl-7b, qwen3-vl-2b, "
        "qwen3-vl-4b, qwen3-vl-8b); default: cpu, or gpu on cuda",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default=None, help="suffix of the result files (default: the device type)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what the tables and ratios use: wall-clock time, or process CPU time (meaningful with --threads 1: it "
        "then ignores time lost to other processes on a shared machine). Both are always recorded in the JSON.",
    )
    return parser


def check_arguments(parser, args, image_sizes=(), counts=()) -> None:
    """Reject sizes the benchmarks cannot run with a message that names the option (`parser.error` exits)."""
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(
            f"need --runs >= 1, --warmup >= 0, --threads >= 1; got {args.runs}, {args.warmup}, {args.threads}"
        )
    for option, size in image_sizes:
        if min(size) < 56:
            parser.error(f"{option} sides must be at least 56 (Qwen2-VL's smallest image side), got {size_key(size)}")
    for option, count in counts:
        if count < 1:
            parser.error(f"{option} must be at least 1, got {count}")


def require_device(device) -> torch.device:
    """The device, or a clear exit when CUDA is asked for and absent (before anything is built)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda was given but no CUDA GPU is available on this machine (torch.cuda.is_available() is "
            "False); run on a GPU machine, or use --device cpu"
        )
    return device


def setup(args):
    """Apply the thread count and the device-dependent defaults: `(device, dtype, spec, preset name, result tag)`."""
    torch.set_num_threads(args.threads)
    device = require_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    tag = args.tag or device.type
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall on cuda")
    return device, getattr(torch, args.dtype), MODEL_PRESETS[preset], preset, tag


def build_vlm(spec, device="cpu", dtype=torch.float32, seed: int = 0):
    """(vlm, vlm_processor) on `device` in `dtype`: the same weights for every call with the same spec and seed.

    The processor has the checkpoints' geometry and image limits (Qwen2-VL: an image keeps its size, rounded to 28 px,
    up to 12.8 MP; Qwen3-VL: rounded to 32 px, between 256^2 and 4096^2 px); the paper's 1024-px cap
    (`limit_longest_side`) is applied before it: by the EmoVLM-KD image processor itself or `cap_images`, and by the
    reference pipeline.
    """
    if isinstance(spec, ModelSpec):
        processor = build_tiny_vlm_processor(**QWEN2_VL_IMAGE_LIMITS)
    else:
        processor = build_tiny_vlm_processor(family=spec.family, **spec.image_limits)
        return build_architecture_vlm(spec, processor, device=device, dtype=dtype, seed=seed), processor
    vlm = build_tiny_vlm(
        processor,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        vision_dim=spec.vision_dim,
        vision_depth=spec.vision_depth,
        seed=seed,
    )
    return vlm.to(device=device, dtype=dtype), processor


def wrap_vlm(vlm, processor, labels: list[str], seed: int = 0):
    """(model, image_processor): EmoVLM-KD around `vlm` with the paper's head and the default gate (on its device,
    in its dtype)."""
    torch.manual_seed(seed)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, labels, head_hidden_sizes=[HEAD_HIDDEN])
    model.to(dtype=next(vlm.parameters()).dtype)
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
    return model.eval(), image_processor


def build_model(spec, labels: list[str], device, dtype, seed: int = 0):
    """(model, image_processor, vlm_processor) on `device` in `dtype`."""
    vlm, processor = build_vlm(spec, device, dtype, seed)
    model, image_processor = wrap_vlm(vlm, processor, labels, seed)
    return model, image_processor, processor


def realistic_answer_length(model) -> int:
    """Tokens of `{'emotion': 'contentment'}` + end of turn: what a trained VLM generates before it stops."""
    config = model.config
    return len(config.answer_token_ids[config.label2id[LONGEST_ANSWER_LABEL]])


def synthetic_images(count: int, size, seed: int = 0) -> list[Image.Image]:
    """Deterministic RGB noise images of `size` = (width, height) or a side (content does not matter to random
    weights)."""
    width, height = width_height(size)
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def cap_images(images, image_processor) -> tuple[list[Image.Image], str]:
    """The paper's 1024-px cap before this model's image processor: `(images, who applied it)`.

    `EmoVLMKDImageProcessor` caps images itself (`max_image_side`); for a processor without that setting (an older
    export), the benchmark applies the same cap here, so that both contenders see the images the paper's pipeline
    sees.
    """
    if getattr(image_processor, "max_image_side", None):
        return list(images), f"EmoVLMKDImageProcessor(max_image_side={image_processor.max_image_side})"
    applied_by = f"benchmark (limit_longest_side, {DEFAULT_MAX_IMAGE_SIDE} px)"
    return [limit_longest_side(image, DEFAULT_MAX_IMAGE_SIDE) for image in images], applied_by


def to_device(batch, device, dtype) -> dict:
    """Move a processor output to `device`; floating tensors (pixel values) also to `dtype`."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def vlm_floor_call(vlm, inputs: dict):
    """The one-forward floor as a callable: `vlm` over the `FLOOR_INPUTS` of the model's `inputs` (selected now, not
    in the timed call), keeping the logits of the last position only."""
    floor_inputs = {key: inputs[key] for key in FLOOR_INPUTS}
    return lambda: vlm(**floor_inputs, logits_to_keep=1)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    contenders: dict, runs: int, warmup: int, device="cpu", progress=None, memory_probe=None
) -> dict[str, dict]:
    """Wall-clock and process CPU seconds of every call of every contender: `{name: {"wall": [...], "cpu": [...]}}`.

    `runs` rounds follow `warmup` untimed rounds. Contenders run round-robin (the order rotating each round) instead
    of one after the other, so slow periods of a shared machine hit all of them alike and their ratios stay meaningful.
    With a `MemoryProbe`, each timed call's peak memory growth (MiB) is also recorded, under `"peak_mib"`, measured
    outside the clocks.
    """
    names = list(contenders)
    times = {name: {"wall": [], "cpu": [], "peak_mib": []} for name in names}
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        timed = round_index >= warmup
        for name in names[shift:] + names[:shift]:
            if timed and memory_probe is not None:
                before = memory_probe.current_mib()
                memory_probe.reset_peak()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if timed:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
                if memory_probe is not None:
                    times[name]["peak_mib"].append(max(memory_probe.peak_mib() - before, 0.0))
            if progress is not None:
                progress.update(1)
    return times


class Stopwatch:
    """Wall-clock and process CPU seconds of a block: `with Stopwatch(device) as watch: ...`, then `watch.wall`."""

    def __init__(self, device="cpu"):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        return False

    def seconds(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu


def summarize(times: dict, images: int, clock: str) -> dict:
    """Median / min / max of both clocks; `median_s`, `images_per_s` and `ms_per_image` follow `clock`."""
    stats = {}
    for name in ("wall", "cpu"):
        values = times[name]
        stats[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "times_s": values,
        }
    median = stats[clock]["median_s"]
    return {
        "clock": clock,
        "median_s": median,
        "images_per_s": images / median,
        "ms_per_image": 1000.0 * median / images,
        "runs": len(times[clock]),
        **stats,
    }


def paired_ratio(times: dict, numerator: str, denominator: str, clock: str) -> float:
    """Median over rounds of the ratio of two contenders timed back to back (robust to a shared machine's load)."""
    pairs = zip(times[numerator][clock], times[denominator][clock], strict=True)
    return statistics.median(top / bottom for top, bottom in pairs)


def clock_note(clock: str, threads: int) -> str:
    if clock == "cpu":
        return (
            f"process CPU time with {_threads(threads)} (robust to other load on a shared machine; "
            "equals wall-clock time on an idle one)"
        )
    return f"wall-clock time with {_threads(threads)}"


_LIBC = None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so resident memory means live memory."""
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed pages, which only overstates the baseline
        pass


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


MEASURE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # a fixed threshold also turns off glibc's adaptive one


class MemoryProbe:
    """Peak memory of one piece of work, in MiB.

    CPU: resident set size from `/proc/self/status`; the peak (`VmHWM`) is reset before the work by writing 5 to
    `/proc/self/clear_refs` (Linux), so each measurement sees only its own peak. Run the process with
    `MEASURE_MEMORY_ENV` so that glibc serves every allocation of 64 KiB or more with its own mapping and returns it on
    free: resident memory then follows live memory and repeated measurements agree to ~0.1 MiB.
    CUDA: `torch.cuda` allocator stats.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def current_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        release_free_memory()
        return _proc_status_kib("VmRSS") / 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _proc_status_kib("VmHWM") / 1024


def machine_info(device) -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    info = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info.update(code_version())
    return info


def code_version() -> dict:
    """The repository commit the numbers belong to, and whether the model's files had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    model_files = [
        "modeling_emovlm_kd.py",
        "configuration_emovlm_kd.py",
        "image_processing_emovlm_kd.py",
        "vlm_adapters_emovlm_kd.py",
        "image_decoding_emovlm_kd.py",
    ]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", *model_files], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None}
    return {"git_commit": commit.stdout.strip(), "model_files_modified": bool(changed.stdout.strip())}


def write_results(result: dict, to_markdown, output_dir: Path, name: str) -> tuple[Path, Path, str]:
    """Write `<name>.json` and `<name>.md` (from `to_markdown(result)`) into `output_dir`; a `machine` entry of
    `result` (`machine_info`) gets the load average at the end."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if "machine" in result:
        result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")  # first: a report bug must not lose a long run
    markdown = to_markdown(result).rstrip() + "\n"
    md_path.write_text(markdown)
    return json_path, md_path, markdown


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def machine_line(machine: dict) -> str:
    commit = machine.get("git_commit")
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({_threads(machine['torch_threads'])}), transformers {machine['transformers']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; load average {machine['load_average_1m_at_start']:.1f} at start, "
        f"{machine.get('load_average_1m_at_end', float('nan')):.1f} at end"
        + (f"; code at commit {commit[:10]}" if commit else "")
        + ("" if not machine.get("model_files_modified") else " with uncommitted changes to the model files")
        + "."
    )


def model_line(model: dict, dtype) -> str:
    """The model sentence of a report, from a result's `model` entry (`spec_dict` plus `parameters`)."""
    description = model.get("description")
    if description is None:  # results written before the descriptions were stored
        fields = {key: value for key, value in model.items() if key in ModelSpec.__dataclass_fields__}
        description = ModelSpec(**fields).summary()
    return (
        f"Model ({model['preset']} preset, random init, {model['parameters'] / 1e6:,.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')}): {description}; head {model['hidden_size']}->"
        f"{model.get('head_hidden', HEAD_HIDDEN)}->C, concat-linear gate."
    )


def spec_dict(spec, preset: str) -> dict:
    return {"preset": preset, **asdict(spec), "head_hidden": HEAD_HIDDEN, "description": spec.summary()}


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules` (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total
