"""Stage 3: distil the teacher into a head on the frozen VLM's own image embeddings.

The VLM's pooled image embeddings and class-answer log-likelihoods (one vision pass per image) and the teacher's
logits are computed once per image and cached (`emovlm_kd.cache`); the head then trains on the cache with the
paper's loss `alpha * KL(teacher_T || head_T) * T^2 + (1 - alpha) * CE` (alpha 0.5, T 2; Adam lr 1e-5, weight decay
1e-4, 5 epochs). The VLM is the run's instruction-tuned `vlm/` when stage 1 completed, else `--vlm`.
Writes `<run_dir>/head/` (`head.safetensors`, `config.json` with what stages 4-6 need to rebuild the model).
"""

import argparse
import json
import logging
import sys

import torch
from safetensors.torch import save_file

from configuration_emovlm_kd import ANSWER_FORMAT, CLASSIFICATION_PROMPT, VLM_BRANCH_MODES
from emovlm_kd.cache import get_features, vlm_identity
from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.data import read_class_names, resolve_vlm, stage_output, write_complete
from emovlm_kd.metrics import classification_metrics
from emovlm_kd.stages import (
    add_epoch_args,
    add_run_args,
    close_trackers,
    dataset_fingerprint,
    end_epoch,
    finish_stage,
    load_run_data,
    make_accelerator,
    progress,
    resume_if_asked,
    start_stage,
    upstream_fingerprint,
)
from modeling_emovlm_kd import EmoVLMKDHead, distillation_loss

logger = logging.getLogger(__name__)

STAGE = "distill"
HEAD_WEIGHTS = "head.safetensors"
SPEC_FILE = "config.json"
EVAL_SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(parser)
    add_epoch_args(parser)
    add_vlm_args(parser)
    group = parser.add_argument_group("head")
    group.add_argument("--head-hidden-sizes", type=int, nargs="+", default=[1024], help="Hidden layers of the MLP")
    group.add_argument("--head-dropout", type=float, default=0.1)
    group.add_argument("--kd-alpha", type=float, default=0.5, help="Weight of the KL term (1 - alpha: CE)")
    group.add_argument("--kd-temperature", type=float, default=2.0)
    group.add_argument("--learning-rate", type=float, default=1e-5)
    group.add_argument("--weight-decay", type=float, default=1e-4)
    group.add_argument("--epochs", type=int, default=5)
    group.add_argument("--batch-size", type=int, default=32, help="Global batch size (split across processes)")
    return parser


def add_vlm_args(parser):
    group = parser.add_argument_group("VLM (frozen; its features are cached)")
    group.add_argument(
        "--vlm",
        default="Qwen/Qwen2-VL-7B-Instruct",
        help="VLM checkpoint or folder when the run has no instruction-tuned vlm/ (stage 1); 'tiny' works offline",
    )
    group.add_argument("--vlm-dtype", default="auto", help="dtype to load the VLM in (auto, bfloat16, float32, ...)")
    group.add_argument(
        "--classification-prompt",
        default=CLASSIFICATION_PROMPT,
        help="<num_labels>, <label_list>, <example_label_1>, <example_label_2> are filled in",
    )
    group.add_argument("--answer-format", default=ANSWER_FORMAT, help="<label> is replaced by a class")
    group.add_argument("--vlm-branch-mode", choices=VLM_BRANCH_MODES, default="score")
    group.add_argument("--max-new-tokens", type=int, default=32, help="Generation budget of the 'generate' mode")
    group.add_argument("--feature-batch-size", type=int, default=8, help="Images per VLM forward while caching")
    return parser


def feature_spec(args, class_names: list[str]) -> dict:
    """What the cached VLM features and the final model config depend on (saved as head/config.json)."""
    vlm = resolve_vlm(args.run_dir, args.vlm)
    return {
        "vlm": vlm,
        "vlm_identity": vlm_identity(args.run_dir, vlm),
        "vlm_dtype": args.vlm_dtype,
        "class_names": list(class_names),
        "model_config": {
            "classification_prompt": args.classification_prompt,
            "answer_format": args.answer_format,
            "vlm_branch_mode": args.vlm_branch_mode,
            "max_new_tokens": args.max_new_tokens,
            "head_hidden_sizes": list(args.head_hidden_sizes),
            "head_dropout": args.head_dropout,
            "kd_alpha": args.kd_alpha,
            "kd_temperature": args.kd_temperature,
        },
    }


def fingerprint(args, class_names=None) -> str:
    class_names = class_names or read_class_names(args.run_dir)
    keys = ("learning_rate", "weight_decay", "epochs", "batch_size", "seed")
    return hash_of(
        {
            "stage": STAGE,
            "data": dataset_fingerprint(args),
            "teacher": upstream_fingerprint(args.run_dir, "teacher", STAGE),
            "spec": feature_spec(args, class_names),
            **{k: getattr(args, k) for k in keys},
        }
    )


def read_spec(run_dir) -> dict:
    """The feature spec stage 3 used (VLM, classes, model config): what stages 4-6 rebuild the model from."""
    return json.loads((stage_output(run_dir, STAGE) / SPEC_FILE).read_text())


def load_head(run_dir) -> EmoVLMKDHead:
    """The distilled head of a run, in eval mode."""
    from safetensors.torch import load_file

    spec = read_spec(run_dir)
    config = spec["model_config"]
    head = EmoVLMKDHead(
        spec["in_features"], config["head_hidden_sizes"], len(spec["class_names"]), config["head_dropout"]
    )
    head.load_state_dict(load_file(stage_output(run_dir, STAGE) / HEAD_WEIGHTS))
    return head.eval()


@torch.no_grad()
def head_logits(head, image_embeds: torch.Tensor) -> torch.Tensor:
    head.eval()
    return head(image_embeds.to(next(head.parameters()).device)).float().cpu()


# ---------------------------------------------------------------------------------------------- the stage
def run(args) -> dict:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args, STAGE)
    set_seed(args.seed)
    data = load_run_data(args, accelerator)
    class_names = data.class_names
    stage_fingerprint = fingerprint(args, class_names)
    spec = feature_spec(args, class_names)
    start_stage(accelerator, args.run_dir, STAGE)

    features = get_features(
        accelerator,
        args.run_dir,
        data,
        spec,
        list(data.splits),
        teacher_fingerprint=upstream_fingerprint(args.run_dir, "teacher", STAGE),
        batch_size=args.feature_batch_size,
        num_workers=args.num_workers,
    )
    train, val = features["train"], features["val"]
    in_features = train["image_embeds"].shape[-1]

    head = EmoVLMKDHead(in_features, args.head_hidden_sizes, len(class_names), args.head_dropout)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train["image_embeds"], train["teacher_logits"], train["labels"]),
        batch_size=args.batch_size,
        shuffle=True,
    )
    optimizer = torch.optim.Adam(head.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)

    epochs_done = resume_if_asked(accelerator, args, STAGE, stage_fingerprint)
    metrics = {}
    for epoch in range(epochs_done, args.epochs):
        head.train()
        loader.set_epoch(epoch)
        total_loss, steps = 0.0, 0
        for embeds, teacher_logits, labels in progress(
            accelerator, loader, desc=f"Head epoch {epoch + 1}/{args.epochs}"
        ):
            loss = distillation_loss(
                head(embeds), teacher_logits, labels, temperature=args.kd_temperature, alpha=args.kd_alpha
            )
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total_loss += accelerator.reduce(loss.detach(), reduction="mean").item()
            steps += 1
        logits = head_logits(accelerator.unwrap_model(head), val["image_embeds"])
        metrics = classification_metrics(val["labels"], logits.argmax(-1), class_names)
        metrics["train_loss"] = total_loss / max(steps, 1)
        logger.info(f"Head epoch {epoch + 1}: {metrics}")
        accelerator.log({f"head/val_{k}": v for k, v in metrics.items()}, step=epoch + 1)
        if end_epoch(accelerator, args, STAGE, stage_fingerprint, epoch + 1, args.epochs):
            close_trackers(accelerator)
            return {"stage": STAGE, "stopped": True, "epochs_done": epoch + 1}

    output = stage_output(args.run_dir, STAGE)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_file(accelerator.unwrap_model(head).state_dict(), output / HEAD_WEIGHTS)
        (output / SPEC_FILE).write_text(json.dumps({**spec, "in_features": in_features}, indent=2) + "\n")
        write_complete(
            args.run_dir, STAGE, stage_fingerprint, val_metrics=metrics, vlm=spec["vlm"],
            unreadable_images=data.bad_images, num_processes=accelerator.num_processes,
        )  # fmt: skip
    finish_stage(accelerator, args, STAGE)
    return {
        "stage": STAGE, "output": str(output), "val_metrics": metrics, "vlm": spec["vlm"],
        "unreadable_images": data.bad_images,
    }  # fmt: skip


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = ["build_parser", "feature_spec", "fingerprint", "head_logits", "load_head", "read_spec", "run"]
