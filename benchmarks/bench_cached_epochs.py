#!/usr/bin/env python
"""Seconds per epoch of stages 3 (head) and 4 (gate) on cached features, one image per update (the paper's) or
larger batches: what the published update counts cost once the frozen features are cached.

The head and the gate are the paper's (Qwen2-VL-7B's 3584-wide image embeddings -> 1024 -> C classes; the
concat-linear gate), trained by the stages' own code: `cached_data_loader`, `adam` and `train_one_epoch` under
Accelerate, the distillation loss (head) and cross-entropy (gate), on random tensors of the cached shapes (the cost
does not depend on the values). Validation is not timed (one batched pass over the val split per epoch).

    python benchmarks/bench_cached_epochs.py                                # 1,000 and 20,000 images, batch 1 and 32
    python benchmarks/bench_cached_epochs.py --num-images 1000 --runs 5 --device cuda
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from emovlm_kd.batch_semantics import cached_data_loader
from emovlm_kd.epoch_loop import train_one_epoch
from emovlm_kd.optimizers import build_adam_optimizer
from modeling_emovlm_kd import GATES, EmoVLMKDHead, distillation_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import RESULTS_DIR, Stopwatch, machine_info, write_results  # noqa: E402

QWEN2_VL_7B_HIDDEN = 3584


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, nargs="+", default=[1000, 20000], help="cached training images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--in-features", type=int, default=QWEN2_VL_7B_HIDDEN, help="the VLM's hidden size")
    parser.add_argument("--runs", type=int, default=3, help="timed epochs per setting (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def epoch_seconds(module, loss, tensors, batch_size: int, device: str, runs: int) -> dict:
    """Wall-clock and process CPU seconds of `runs` epochs (medians), each after a fresh optimizer."""
    accelerator = Accelerator(
        cpu=device == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=0),
    )
    optimizer = build_adam_optimizer(
        module.parameters(), argparse.Namespace(learning_rate=1e-5, weight_decay=1e-4), accelerator.device
    )
    module, optimizer = accelerator.prepare(module, optimizer)
    loader = cached_data_loader(accelerator, torch.utils.data.TensorDataset(*tensors), batch_size)
    wall, cpu = [], []
    for epoch in range(runs):
        loader.set_epoch(epoch)
        with Stopwatch(device) as watch:
            train_one_epoch(accelerator, module, loader, optimizer, loss, desc=f"batch {batch_size}")
        wall.append(watch.wall)
        cpu.append(watch.cpu)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "wall_runs": wall, "cpu_runs": cpu}


def measure(args) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for num_images in args.num_images:
        embeds = torch.randn(num_images, args.in_features, generator=generator) * 0.02
        teacher = torch.randn(num_images, args.num_classes, generator=generator)
        labels = torch.randint(args.num_classes, (num_images,), generator=generator)
        vlm_probs = torch.randn(num_images, args.num_classes, generator=generator).softmax(-1)
        for batch_size in args.batch_sizes:
            head = EmoVLMKDHead(args.in_features, [1024], args.num_classes, 0.1)

            def head_loss(model, batch):
                features, teacher_logits, targets = batch
                return distillation_loss(model(features), teacher_logits, targets, temperature=2.0, alpha=0.5)

            def gate_loss(model, batch):
                head_logits, vlm_scores, targets = batch
                return F.cross_entropy(model(head_logits, vlm_scores)[0], targets)

            for stage, module, loss, tensors in (
                ("distill", head, head_loss, (embeds, teacher, labels)),
                ("gate", GATES["concat_linear"](args.num_classes), gate_loss, (teacher, vlm_probs, labels)),
            ):
                timing = epoch_seconds(module, loss, tensors, batch_size, args.device, args.runs)
                row = {"stage": stage, "num_images": num_images, "batch_size": batch_size, **timing}
                row["updates_per_epoch"] = -(-num_images // batch_size)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs")}), flush=True)
    return rows


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "### Stages 3 and 4 on cached features: seconds per epoch",
        f"Machine: {info['machine']}; torch {info['torch']}, {info['threads']} thread(s), device {info['device']}; "
        f"load average {info['load_before']} before, {info['load_after']} after (a shared machine: other jobs ran). "
        f"Median of {info['runs']} epochs; wall-clock and process CPU time. Head {info['in_features']} -> 1024 -> "
        f"{info['num_classes']}, concat-linear gate; the stages' fused Adam.",
        "",
        "| stage | images | batch | updates / epoch | wall s / epoch | CPU s / epoch | ms / update (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['num_images']:,} | {row['batch_size']} | {row['updates_per_epoch']:,} | "
            f"{row['wall_s']:.2f} | {row['cpu_s']:.2f} | {1000 * row['cpu_s'] / row['updates_per_epoch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    info = {
        "machine": f"{machine['cpu_model']}, {machine['cpu_cores']} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "runs": args.runs,
        "in_features": args.in_features,
        "num_classes": args.num_classes,
        "load_before": round(os.getloadavg()[0], 1),
    }
    rows = measure(args)
    info["load_after"] = round(os.getloadavg()[0], 1)
    tag = f"cached_epochs_{args.device.split(':')[0]}"
    _, _, markdown = write_results(
        {"info": info, "rows": rows},
        lambda result: to_markdown(result["rows"], result["info"]),
        Path(args.output_dir),
        tag,
    )
    print(markdown)


if __name__ == "__main__":
    main()
