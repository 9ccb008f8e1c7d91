#!/usr/bin/env python
"""Where the time of each inference contender goes: a per-component breakdown and the top operators.

Components are timed with forward hooks (process CPU time on CPU, wall-clock on CUDA): the visual encoder, the
reference's encoder copy, the language model (split into the prompt pass and the one-token decoding steps of
generation), the LM head; `other` is the rest of the call (mask and position building, sampling, parsing, head and
gate). The top operators come from `torch.profiler`.

    python benchmarks/profile_contenders.py --threads 1               # ~1 minute on CPU
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import Contenders  # noqa: E402
from bench_utils import add_common_arguments, machine_info, machine_line, markdown_table, setup, synchronize  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="operators listed per contender")
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
    return (
        "language model: decoding steps"
        if embeds is not None and embeds.shape[1] == 1
        else "language model: prompt (+ trie)"
    )


def breakdown(contenders: Contenders, name: str, run, runs: int, device, clock: str) -> dict:
    model = contenders.model
    timer = ComponentTimer(device, clock)
    timer.watch(model.vlm.model.visual, "visual encoder")
    timer.watch(contenders.reference.visual_encoder_copy, "visual encoder copy (reference)")
    timer.watch(model.vlm.model.language_model, None, language_model_phase)
    timer.watch(model.vlm.lm_head, "LM head")
    run()  # warm-up
    timer.seconds.clear(), timer.calls.clear()
    total = 0.0
    for _ in range(runs):
        start = timer.now()
        run()
        total += timer.now() - start
    timer.remove()
    components = {label: seconds / runs for label, seconds in timer.seconds.items()}
    components["other (masks, positions, sampling, parsing, head, gate)"] = total / runs - sum(components.values())
    calls = {label: count // runs for label, count in timer.calls.items()}
    return {"total_s": total / runs, "components": components, "calls_per_run": calls}


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


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec, preset, tag = setup(args)
    machine = machine_info(device)
    contenders = Contenders(args, device, dtype, spec, args.image_size)
    batch = contenders.batch(args.batch_size)
    names = ["emovlm_kd", "vlm_floor", "reference", "reference_256"]
    rows, tops = [], {}
    with torch.inference_mode():
        callables = contenders.callables(batch, names)
        reports = {name: breakdown(contenders, name, callables[name], args.runs, device, args.clock) for name in names}
        for name in names[:3]:
            tops[name] = top_operators(callables[name], device, args.top)
    machine["load_average_1m_at_end"] = os.getloadavg()[0]
    sections = [
        f"### Profile: {args.image_size}² images, batch {args.batch_size}",
        machine_line(machine),
        f"Per call, {'process CPU' if args.clock == 'cpu' else 'wall-clock'} ms, mean of {args.runs} runs; "
        f"{contenders.shapes(batch)['prompt_tokens']} prompt tokens, trie of {len(contenders.model._trie)} answer "
        f"tokens, reference generates {contenders.answer_tokens} tokens.",
    ]
    labels = sorted({label for report in reports.values() for label in report["components"]})
    for label in labels:
        rows.append(
            [label]
            + [
                f"{1000 * reports[name]['components'][label]:.1f} ({reports[name]['calls_per_run'].get(label, '–')})"
                if label in reports[name]["components"]
                else "–"
                for name in names
            ]
        )
    rows.append(["**total**"] + [f"**{1000 * reports[name]['total_s']:.1f}**" for name in names])
    sections.append(markdown_table(["component (calls per run)"] + names, rows))
    for name, operators in tops.items():
        sections.append(
            f"Top operators of `{name}` (self {'device' if device.type == 'cuda' else 'CPU'} ms, calls):\n\n"
            + markdown_table(
                ["operator", "self ms", "calls"], [[op, f"{ms:.1f}", count] for op, ms, count in operators]
            )
        )
    markdown = "\n\n".join(sections) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"profile_{tag}_{args.image_size}px_batch{args.batch_size}.md"
    path.write_text(markdown)
    print(markdown)
    print(f"wrote {path}")
    return reports


if __name__ == "__main__":
    main()
