#!/usr/bin/env python
"""Where the time of each inference contender goes: a per-component breakdown and the top operators.

Components are timed with forward hooks on the `--clock` (wall-clock by default, or process CPU time): the visual
encoder, the reference's encoder copy, the language model (split into the prompt pass and the one-token decoding steps
of generation), the LM head, the distilled head and the gate; `other` is the rest of the call (mask and position
building, sampling, parsing). The trie tokens' share of `emovlm_kd`'s language-model pass is derived as the
difference from the floor's pass over the same prompt. The top operators come from `torch.profiler`.

    python benchmarks/profile_contenders.py --threads 1               # ~1 minute on CPU
    python benchmarks/profile_contenders.py --preset qwen2-vl-2b --dtype bfloat16 --threads 1 --clock cpu \
        --image-size 1024x768 --runs 1 --warmup 0 --top 0 --contenders emovlm_kd vlm_floor reference
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import CONTENDERS, Contenders  # noqa: E402
from bench_utils import (  # noqa: E402
    add_common_arguments,
    count_parameters,
    machine_info,
    machine_line,
    markdown_table,
    model_line,
    paired_ratio,
    parse_image_size,
    setup,
    size_key,
    size_name,
    spec_dict,
    synchronize,
    time_interleaved,
    write_results,
)

LM_PROMPT = "language model: prompt (+ trie)"
TRIE_SHARE = "of which the trie tokens (emovlm_kd's LM pass minus the floor's)"
OTHER = "other (masks, positions, sampling, parsing)"
COMPONENT_ORDER = [
    "visual encoder",
    "visual encoder copy (reference)",
    LM_PROMPT,
    "language model: decoding steps",
    "LM head",
    "distilled head",
    "gate",
    OTHER,
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--image-size", type=parse_image_size, default=(224, 224), help="WIDTHxHEIGHT or SIDE")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="operators listed per contender (0: no operator profile)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--replay-runs",
        type=int,
        default=0,
        help="also time emovlm_kd's and the floor's language-model passes alone, interleaved, this many times",
    )
    parser.set_defaults(long_generation_tokens=256)
    return parser.parse_args(argv)


class ComponentTimer:
    """Accumulates the time spent inside chosen modules (outermost call only) across calls."""

    def __init__(self, device, clock: str):
        self.device, self.clock = device, clock
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self._handles, self._stack = [], []

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter() if self.clock == "wall" else time.process_time()

    def watch(self, module, name, name_of_call=None):
        def pre(_, args, kwargs):
            label = name_of_call(args, kwargs) if name_of_call else name
            self._stack.append((label, self.now()))

        def post(*_):
            label, start = self._stack.pop()
            self.seconds[label] += self.now() - start
            self.calls[label] += 1

        self._handles += [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post),
        ]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def language_model_phase(args, kwargs) -> str:
    embeds = kwargs.get("inputs_embeds")
    return "language model: decoding steps" if embeds is not None and embeds.shape[1] == 1 else LM_PROMPT


def breakdown(contenders: Contenders, run, runs: int, warmup: int, device, clock: str) -> dict:
    model = contenders.model
    timer = ComponentTimer(device, clock)
    timer.watch(model.vlm.model.visual, "visual encoder")
    timer.watch(contenders.reference.visual_encoder_copy, "visual encoder copy (reference)")
    timer.watch(model.vlm_adapter.language_model(model.vlm), None, language_model_phase)
    timer.watch(model.vlm.lm_head, "LM head")
    timer.watch(model.head, "distilled head")
    timer.watch(model.gate, "gate")
    for _ in range(warmup):
        run()
    timer.seconds.clear(), timer.calls.clear()
    total = 0.0
    for _ in range(runs):
        start = timer.now()
        run()
        total += timer.now() - start
    timer.remove()
    components = {label: seconds / runs for label, seconds in timer.seconds.items()}
    components[OTHER] = total / runs - sum(components.values())
    calls = {label: count // runs for label, count in timer.calls.items()}
    return {"total_s": total / runs, "components": components, "calls_per_run": calls}


def capture_language_model_call(language_model, run) -> dict:
    """The keyword arguments of the (first) language-model call that `run` makes."""
    captured = {}

    def pre(_, args, kwargs):
        captured.setdefault("kwargs", dict(kwargs))

    handle = language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return captured["kwargs"]


def replay_language_model(contenders: Contenders, callables: dict, runs: int, device, clock: str) -> dict:
    """The trie tokens' cost, measured directly: `emovlm_kd`'s language-model pass (prompt + trie, tree mask) and
    the floor's (prompt only, causal) replayed on their captured inputs, interleaved; medians and their paired
    ratio. A difference of two whole-call components would drown a few percent in the vision pass's noise."""
    language_model = contenders.model.vlm_adapter.language_model(contenders.model.vlm)
    passes = {
        "prompt + trie (emovlm_kd)": capture_language_model_call(language_model, callables["emovlm_kd"]),
        "prompt only (floor)": capture_language_model_call(language_model, callables["vlm_floor"]),
    }
    calls = {name: (lambda kwargs=kwargs: language_model(**kwargs)) for name, kwargs in passes.items()}
    times = time_interleaved(calls, runs, 1, device)
    medians = {name: statistics.median(times[name][clock]) for name in calls}
    ours, floor = medians.values()
    return {
        "median_s": medians,
        "times_s": {name: times[name][clock] for name in calls},
        "tokens": {name: int(kwargs["inputs_embeds"].shape[1]) for name, kwargs in passes.items()},
        "trie_s": ours - floor,
        "ratio_paired": paired_ratio(times, *calls, clock),
    }


def top_operators(run, device, top: int) -> list[tuple[str, float, int]]:
    """The `top` operators by self time (device time on CUDA, CPU time otherwise): (name, ms, calls)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        run()

    def self_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    events = sorted(profiler.key_averages(), key=self_us, reverse=True)[:top]
    return [(event.key, self_us(event) / 1000, event.count) for event in events]


def to_markdown(record: dict, tops: dict, replay_runs: int) -> str:
    """The report of a profile `record`, with the top operators `tops` (`{contender: top_operators(...)}`)."""
    settings, reports, replay = record["settings"], record["reports"], record["language_model_replay"]
    names = list(reports)
    clock_name = "process CPU" if settings["clock"] == "cpu" else "wall-clock"
    unit = "s" if max(report["total_s"] for report in reports.values()) >= 10 else "ms"
    scale = 1 if unit == "s" else 1000
    sections = [
        f"### Profile: {size_name(settings['image_size'])} images, batch {settings['batch_size']}",
        machine_line(record["machine"]),
        model_line(record["model"], settings["dtype"]),
        f"Per call, {clock_name} {unit}, mean of {settings['runs']} run(s) after {settings['warmup']} warm-up; "
        f"{settings['image_tokens']} image tokens ({size_name(settings['model_image_size'])} after the cap and "
        f"resize), {settings['prompt_tokens']} prompt tokens, trie of {settings['trie_nodes']} answer tokens, "
        f"reference generates {settings['reference_generated_tokens']} tokens.",
    ]
    found = {label for report in reports.values() for label in report["components"]}
    labels = [label for label in COMPONENT_ORDER if label in found] + sorted(found - set(COMPONENT_ORDER))
    digits = 2 if unit == "s" else 1
    rows = []
    for label in labels:
        rows.append(
            [label]
            + [
                f"{scale * reports[name]['components'][label]:.{digits}f} "
                f"({reports[name]['calls_per_run'].get(label, '–')})"
                if label in reports[name]["components"]
                else "–"
                for name in names
            ]
        )
        if label == LM_PROMPT and "derived" in reports.get("emovlm_kd", {}):
            rows.append(
                [f"– {TRIE_SHARE}"]
                + [
                    f"{scale * reports[name]['derived'][TRIE_SHARE]:.{digits}f}" if "derived" in reports[name] else "–"
                    for name in names
                ]
            )
    rows.append(["**total**"] + [f"**{scale * reports[name]['total_s']:.{digits}f}**" for name in names])
    sections.append(markdown_table(["component (calls per run)"] + names, rows))
    if replay is not None:
        rows = [
            [name, replay["tokens"][name], f"{replay['median_s'][name]:.3f}", " ".join(f"{t:.3f}" for t in times)]
            for name, times in replay["times_s"].items()
        ]
        sections.append(
            f"Language-model passes alone, replayed on the captured inputs ({clock_name} s, {replay_runs} "
            "interleaved runs after 1 warm-up):\n\n"
            + markdown_table(["pass", "tokens", "median s", "runs"], rows)
            + f"\n\nThe trie tokens cost **{replay['trie_s']:.3f} s** per call (paired ratio of the passes "
            f"{replay['ratio_paired']:.3f})."
        )
    cuda = torch.device(record["machine"]["device"]).type == "cuda"
    for name, operators in tops.items():
        sections.append(
            f"Top operators of `{name}` (self {'device' if cuda else 'CPU'} ms, calls):\n\n"
            + markdown_table(
                ["operator", "self ms", "calls"], [[op, f"{ms:.1f}", count] for op, ms, count in operators]
            )
        )
    return "\n\n".join(sections) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec, preset, tag = setup(args)
    machine = machine_info(device)
    contenders = Contenders(args, device, dtype, spec)
    batch = contenders.batch(contenders.images(args.image_size, args.batch_size))
    names = list(args.contenders)
    tops = {}
    with torch.inference_mode():
        callables = contenders.callables(batch, names)
        reports = {
            name: breakdown(contenders, callables[name], args.runs, args.warmup, device, args.clock) for name in names
        }
        if args.top > 0:
            for name in [name for name in names if name != "reference_256"]:
                tops[name] = top_operators(callables[name], device, args.top)
        replay = None
        if args.replay_runs and {"emovlm_kd", "vlm_floor"} <= set(names):
            replay = replay_language_model(contenders, callables, args.replay_runs, device, args.clock)
    if {"emovlm_kd", "vlm_floor"} <= set(reports):
        ours, floor = (reports[name]["components"][LM_PROMPT] for name in ("emovlm_kd", "vlm_floor"))
        reports["emovlm_kd"]["derived"] = {TRIE_SHARE: ours - floor}
    record = {
        "benchmark": "profile",
        "machine": machine,
        "model": {**spec_dict(spec, preset), "parameters": count_parameters(contenders.model)},
        "settings": {
            "dtype": args.dtype,
            "clock": args.clock,
            "runs": args.runs,
            "warmup": args.warmup,
            "image_size": list(args.image_size),
            "batch_size": args.batch_size,
            **contenders.shapes(batch),
            "trie_nodes": len(contenders.model._trie),
            "reference_generated_tokens": contenders.answer_tokens,
        },
        "reports": reports,
        "language_model_replay": replay,
    }
    stem = f"profile_{tag}_{size_key(args.image_size)}px_batch{args.batch_size}"
    _, _, markdown = write_results(
        record, lambda record: to_markdown(record, tops, args.replay_runs), args.output_dir, stem
    )
    print(markdown)
    print(f"wrote {args.output_dir / stem}.md and .json")
    return reports


if __name__ == "__main__":
    main()
