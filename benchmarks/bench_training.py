#!/usr/bin/env python
"""Training cost of stages 3 (distilled head) and 4 (gate): cached tensors versus the reference's per-sample loops.

  cached     (this project) one batched pass per image computes the pooled image embeddings, the exact VLM class
             scores and the teacher's logits; the head (5 epochs) and then the gate (10 epochs) train on those tensors.
  reference  (the paper's public code) batch size 1; every epoch, every sample re-runs the second visual-encoder copy
             and the teacher (stage 3), or the encoder copy and sampled VLM generation (stage 4), before one
             optimiser step. Generation is forced to the length of a real answer (`{'emotion': 'contentment'}`);
             the reference's own budget is `max_new_tokens=256`, so this is the reference at its fastest.

Both use the same VLM, head, gate and teacher weights, the paper's optimisers (head: Adam lr 1e-5, wd 1e-4, KD loss
alpha 0.5, T 2; gate: Adam lr 1e-4, wd 1e-4, cross-entropy) and the same preprocessed inputs (preprocessing is not
timed; the reference also re-preprocesses every epoch and evaluates on a validation split every epoch, neither of
which is counted). The reference's cost per epoch is constant (nothing is reused across epochs), so by default one
epoch of each stage is timed and multiplied by the paper's epoch counts; `--reference-epochs 0` runs them all.

    python benchmarks/bench_training.py                          # N=64, ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_training.py --preset qwen2-vl-7b --device cuda --dtype bfloat16 --image-size 500x375 \
        --teacher vit_base_patch16_384                           # the paper's VLM and teacher architectures

The cached path's feature pass is also reported as feature-caching throughput (images/s).
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from emovlm_kd import distillation_loss
from emovlm_kd.cache import vlm_features
from emovlm_kd.epoch_loop import train_one_epoch
from modeling_emovlm_kd import vlm_scores_from_log_likelihoods

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    MIKELS_LABELS,
    Stopwatch,
    add_common_arguments,
    build_model,
    cap_images,
    check_arguments,
    clock_note,
    count_parameters,
    machine_info,
    machine_line,
    markdown_table,
    model_line,
    parse_image_size,
    realistic_answer_length,
    setup,
    size_name,
    spec_dict,
    synthetic_images,
    to_device,
    write_results,
)
from reference_pipeline import ReferencePipeline  # noqa: E402

HEAD_EPOCHS, GATE_EPOCHS = 5, 10  # the paper's stage-3 and stage-4 epoch counts
HEAD_OPTIMIZER = {"lr": 1e-5, "weight_decay": 1e-4}
GATE_OPTIMIZER = {"lr": 1e-4, "weight_decay": 1e-4}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(runs=3)
    parser.add_argument("--num-images", type=int, default=64, help="training images N")
    parser.add_argument("--image-size", type=parse_image_size, default=(224, 224), help="WIDTHxHEIGHT or SIDE")
    parser.add_argument("--teacher", default="vit_tiny_patch16_224", help="timm model name (random init)")
    parser.add_argument("--extract-batch-size", type=int, default=8, help="batch of the cached feature pass")
    parser.add_argument("--train-batch-size", type=int, default=16, help="batch of head / gate training on tensors")
    parser.add_argument("--head-epochs", type=int, default=HEAD_EPOCHS)
    parser.add_argument("--gate-epochs", type=int, default=GATE_EPOCHS)
    parser.add_argument(
        "--reference-epochs", type=int, default=1, help="epochs of each reference stage to time (0: all of them)"
    )
    args = parser.parse_args(argv)
    counts = [
        (f"--{name.replace('_', '-')}", getattr(args, name))
        for name in ("num_images", "extract_batch_size", "train_batch_size", "head_epochs", "gate_epochs")
    ]
    check_arguments(parser, args, image_sizes=[("--image-size", args.image_size)], counts=counts)
    if args.reference_epochs < 0:
        parser.error(f"--reference-epochs must be 0 (all) or more, got {args.reference_epochs}")
    return args


class Workload:
    """The N images, prepared once for both paths: model inputs in batches, reference inputs, teacher pixels."""

    def __init__(self, args, device, dtype, spec):
        self.device, self.dtype = device, dtype
        self.model, image_processor, vlm_processor = build_model(spec, MIKELS_LABELS, device, dtype, args.seed)
        self.answer_tokens = realistic_answer_length(self.model)
        self.reference = ReferencePipeline(self.model, vlm_processor, self.answer_tokens, self.answer_tokens)
        self.teacher = timm.create_model(args.teacher, pretrained=False, num_classes=len(MIKELS_LABELS))
        self.teacher = self.teacher.to(device=device, dtype=dtype).eval()
        teacher_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(self.teacher))

        images = synthetic_images(args.num_images, args.image_size, seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        self.labels = torch.randint(len(MIKELS_LABELS), (args.num_images,), generator=generator).to(device)
        self.teacher_pixels = torch.stack([teacher_transform(image) for image in images]).to(device, dtype)
        size = args.extract_batch_size
        capped, self.image_cap = cap_images(images, image_processor)
        self.batches = [
            to_device(image_processor(capped[start : start + size]), device, dtype)
            for start in range(0, len(images), size)
        ]
        self.image_tokens = int(self.batches[0]["mm_token_type_ids"][0].sum())
        self.reference_inputs = self.reference.prepare(images, device, dtype)


@torch.inference_mode()
def extract_features(work: Workload, extract_batch_size: int):
    """One pass per image, as stage 3 caches it: (pooled image embeds, VLM class log-likelihoods, teacher logits)."""
    pooled, scores, teacher_logits = [], [], []
    for index, batch in enumerate(work.batches):
        features = vlm_features(work.model, batch)  # the training pipeline's own feature function
        pooled.append(features["image_embeds"])
        scores.append(features["vlm_log_likelihoods"])
        start = index * extract_batch_size
        teacher_logits.append(work.teacher(work.teacher_pixels[start : start + len(batch["input_ids"])]).float())
    return torch.cat(pooled), torch.cat(scores), torch.cat(teacher_logits)


def train_on_tensors(module, loss_fn, tensors, epochs, batch_size, optimizer_kwargs, seed, device) -> float:
    """The stages' epoch loop (`emovlm_kd.epoch_loop.train_one_epoch`, under Accelerate) over a TensorDataset;
    `loss_fn(module, *batch)`. Returns the last epoch's mean loss. Unlike the stages (`train_on_cached_tensors`), it
    keeps `--threads` and an unfused Adam at `--train-batch-size`: the per-update costs of the stages' published
    setting (fused Adam, one thread, batch 1) are measured by `bench_cached_epochs.py`."""
    accelerator = Accelerator(
        cpu=torch.device(device).type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )
    optimizer = torch.optim.Adam(module.parameters(), **optimizer_kwargs)
    loader = DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    loss = float("nan")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        loss = train_one_epoch(
            accelerator, module, loader, optimizer, lambda model, batch: loss_fn(model, *batch), desc="Training"
        )
    module.eval()
    return loss


def run_cached(work: Workload, args) -> dict:
    """Seconds (of `args.clock`) of each phase of the cached stages 3 + 4, with a fresh head and gate."""
    model, config = work.model, work.model.config
    head, gate = copy.deepcopy(model.head), copy.deepcopy(model.gate)
    timings = {}

    with Stopwatch(work.device) as watch:
        pooled, log_likelihoods, teacher_logits = extract_features(work, args.extract_batch_size)
    timings["extract_features_s"] = watch.seconds(args.clock)

    head_dtype = head.mlp[0].weight.dtype

    def head_loss(head, features, teacher, labels):
        logits = head(features.to(head_dtype)).float()
        return distillation_loss(logits, teacher, labels, config.kd_temperature, config.kd_alpha)

    with Stopwatch(work.device) as watch:
        head_loss_value = train_on_tensors(
            head,
            head_loss,
            (pooled, teacher_logits, work.labels),
            args.head_epochs,
            args.train_batch_size,
            HEAD_OPTIMIZER,
            args.seed,
            work.device,
        )
    timings["train_head_s"] = watch.seconds(args.clock)

    def gate_loss(gate, head_part, vlm_part, labels):
        return F.cross_entropy(gate(head_part, vlm_part)[0].float(), labels)

    with Stopwatch(work.device) as watch:
        with torch.no_grad():  # the frozen head's logits, once per image
            head_logits = head(pooled.to(head_dtype))
            vlm_scores = vlm_scores_from_log_likelihoods(log_likelihoods, model.config.vlm_branch_input).to(head_dtype)
        gate_loss_value = train_on_tensors(
            gate,
            gate_loss,
            (head_logits, vlm_scores, work.labels),
            args.gate_epochs,
            args.train_batch_size,
            GATE_OPTIMIZER,
            args.seed,
            work.device,
        )
    timings["train_gate_s"] = watch.seconds(args.clock)
    timings["total_s"] = sum(timings.values())
    timings["final_losses"] = {"head": head_loss_value, "gate": gate_loss_value}
    return timings


def reference_head_epoch(work: Workload, head, optimizer, clock, progress) -> list[float]:
    """Stage 3 as the reference runs it: per sample, encoder copy + teacher, KD loss, one step. Per-sample seconds."""
    config, seconds = work.model.config, []
    work.reference.head = head
    for index, inputs in enumerate(work.reference_inputs):
        with Stopwatch(work.device) as watch:
            student = work.reference.distilled_logits(inputs)
            with torch.no_grad():
                teacher = work.teacher(work.teacher_pixels[index : index + 1])
            loss = distillation_loss(
                student.float(),
                teacher.float(),
                work.labels[index : index + 1],
                config.kd_temperature,
                config.kd_alpha,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(watch.seconds(clock))
        progress.update(1)
    return seconds


def reference_gate_epoch(work: Workload, gate, optimizer, clock, progress) -> list[float]:
    """Stage 4 as the reference runs it: per sample, encoder copy + head, sampled generation + parse, one step."""
    seconds = []
    for index, inputs in enumerate(work.reference_inputs):
        with Stopwatch(work.device) as watch:
            with torch.no_grad():
                head_logits = work.reference.distilled_logits(inputs)
                one_hot, _ = work.reference.vlm_one_hot(inputs)
            fused, _ = gate(head_logits, one_hot.to(head_logits.dtype))
            loss = F.cross_entropy(fused.float(), work.labels[index : index + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(watch.seconds(clock))
        progress.update(1)
    return seconds


def run_reference(work: Workload, args) -> dict:
    head_epochs = args.reference_epochs or args.head_epochs
    gate_epochs = args.reference_epochs or args.gate_epochs
    head, gate = copy.deepcopy(work.model.head).train(), copy.deepcopy(work.model.gate).train()
    head_optimizer = torch.optim.Adam(head.parameters(), **HEAD_OPTIMIZER)
    gate_optimizer = torch.optim.Adam(gate.parameters(), **GATE_OPTIMIZER)
    total = (head_epochs + gate_epochs) * len(work.reference_inputs)
    stages = {}
    with tqdm(total=total, desc="reference (per sample)", unit="sample") as progress:
        head_seconds = [
            reference_head_epoch(work, head, head_optimizer, args.clock, progress) for _ in range(head_epochs)
        ]
        work.reference.head = head.eval()
        gate_seconds = [
            reference_gate_epoch(work, gate, gate_optimizer, args.clock, progress) for _ in range(gate_epochs)
        ]
    for name, epochs, paper_epochs in (
        ("head", head_seconds, args.head_epochs),
        ("gate", gate_seconds, args.gate_epochs),
    ):
        epoch_totals = [sum(epoch) for epoch in epochs]
        per_epoch = statistics.median(epoch_totals)
        stages[name] = {
            "epochs_timed": len(epochs),
            "epochs_total": paper_epochs,
            "seconds_per_epoch": per_epoch,
            "ms_per_sample_median": 1000 * statistics.median(s for epoch in epochs for s in epoch),
            "total_s": per_epoch * paper_epochs,
            "extrapolated": len(epochs) < paper_epochs,
        }
    return {"stages": stages, "total_s": sum(stage["total_s"] for stage in stages.values())}


def to_markdown(result: dict) -> str:
    settings, cached, reference = result["settings"], result["cached"], result["reference"]
    stages = reference["stages"]
    extrapolated = any(stage["extrapolated"] for stage in stages.values())
    rows = [
        [
            "cached (this project)",
            f"{cached['extract_features_s']:.2f}",
            f"{cached['train_head_s']:.2f}",
            f"{cached['train_gate_s']:.2f}",
            f"{cached['total_s']:.2f}",
            "1×",
        ],
        [
            "reference (per sample, every epoch)",
            "–",
            f"{stages['head']['total_s']:.1f}",
            f"{stages['gate']['total_s']:.1f}",
            f"{reference['total_s']:.1f}",
            f"{result['ratio_reference_over_cached']:.0f}×",
        ],
    ]
    size = size_name(settings["image_size"])
    tokens = f" ({settings['image_tokens']} image tokens)" if "image_tokens" in settings else ""
    caching = (
        [
            f"Feature caching (one VLM pass with exact scoring + teacher, batch {settings['extract_batch_size']}): "
            f"**{result['feature_caching_images_per_s']:.2f} images/s**."
        ]
        if "feature_caching_images_per_s" in result
        else []
    )
    return "\n\n".join(
        [
            "### Training stages 3 + 4",
            machine_line(result["machine"]),
            model_line(result["model"], settings["dtype"]),
            f"N = {settings['num_images']} images of {size}{tokens}, 8 classes, teacher "
            f"`{settings['teacher']}` (random init); head {settings['head_epochs']} epochs, gate "
            f"{settings['gate_epochs']} epochs. Times: {clock_note(settings['clock'], settings['threads'])}. Cached: "
            f"median of {settings['runs']} runs. Reference: generation of {settings['reference_generated_tokens']} "
            "tokens per sample (a real answer's length; its own budget is 256)"
            + (
                f"; {stages['head']['epochs_timed']} epoch(s) of each stage timed and multiplied by the epoch counts "
                "(its cost per epoch is constant)."
                if extrapolated
                else "; all epochs timed."
            )
            + " Seconds:",
            markdown_table(["path", "features once", "stage 3 (head)", "stage 4 (gate)", "total", "ratio"], rows),
            f"Reference per sample: stage 3 {stages['head']['ms_per_sample_median']:.0f} ms, stage 4 "
            f"{stages['gate']['ms_per_sample_median']:.0f} ms. Target: ratio ≥ 10× — "
            + ("met." if result["ratio_reference_over_cached"] >= 10 else "missed."),
            *caching,
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    device, dtype, spec, preset, tag = setup(args)
    set_seed(args.seed)
    machine = machine_info(device)
    work = Workload(args, device, dtype, spec)

    for _ in range(args.warmup):
        run_cached(work, args)
    cached_runs = [run_cached(work, args) for _ in tqdm(range(args.runs), desc="cached runs")]
    median_run = sorted(cached_runs, key=lambda run: run["total_s"])[len(cached_runs) // 2]
    reference = run_reference(work, args)

    result = {
        "benchmark": "training_stages_3_4",
        "machine": machine,
        "model": {**spec_dict(spec, preset), "parameters": count_parameters(work.model)},
        "settings": {
            "dtype": args.dtype,
            "threads": args.threads,
            "clock": args.clock,
            "num_images": args.num_images,
            "image_size": list(args.image_size),
            "image_tokens": work.image_tokens,
            "image_cap": work.image_cap,
            "teacher": args.teacher,
            "teacher_parameters": count_parameters(work.teacher),
            "head_epochs": args.head_epochs,
            "gate_epochs": args.gate_epochs,
            "runs": args.runs,
            "extract_batch_size": args.extract_batch_size,
            "train_batch_size": args.train_batch_size,
            "reference_generated_tokens": work.answer_tokens,
            "reference_batch_size": 1,
        },
        "cached": median_run,
        "cached_total_s_all_runs": [run["total_s"] for run in cached_runs],
        "feature_caching_images_per_s": args.num_images / median_run["extract_features_s"],
        "reference": reference,
        "ratio_reference_over_cached": reference["total_s"] / median_run["total_s"],
        "target_ratio_min": 10.0,
    }
    result["target_met"] = result["ratio_reference_over_cached"] >= result["target_ratio_min"]
    json_path, md_path, markdown = write_results(result, to_markdown, args.output_dir, f"training_{tag}")
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
