"""Stage 4: train the gate fusing the distilled head's logits and the VLM branch's prediction.

Both inputs come from the feature cache of stage 3 (the frozen head is applied to the cached image embeddings);
the gate trains with cross-entropy (paper: `concat_linear`, Adam lr 1e-4, weight decay 1e-4, 10 epochs). All five
variants are selectable with `--gate-type`. Writes `<run_dir>/gate/` (`gate.safetensors`, `config.json`).
"""

import argparse
import json
import logging
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from configuration_emovlm_kd import GATE_TYPES, VLM_BRANCH_INPUTS
from emovlm_kd.cache import get_features, vlm_gate_input
from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.data import stage_output, write_complete
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
from emovlm_kd.stages.distill import head_logits, load_head, read_spec
from modeling_emovlm_kd import GATES

logger = logging.getLogger(__name__)

STAGE = "gate"
GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "config.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(parser)
    add_epoch_args(parser)
    group = parser.add_argument_group("gate")
    group.add_argument("--gate-type", choices=GATE_TYPES, default="concat_linear")
    group.add_argument("--gate-num-experts", type=int, default=3, help="Experts of the 'moe' gate")
    group.add_argument(
        "--vlm-branch-input",
        choices=VLM_BRANCH_INPUTS,
        default="probs",
        help="What the gate sees of the VLM: its class probabilities, or a one-hot answer (the paper's)",
    )
    group.add_argument("--learning-rate", type=float, default=1e-4)
    group.add_argument("--weight-decay", type=float, default=1e-4)
    group.add_argument("--epochs", type=int, default=10)
    group.add_argument("--batch-size", type=int, default=32, help="Global batch size (split across processes)")
    group.add_argument("--feature-batch-size", type=int, default=8, help="Images per VLM forward if not cached")
    return parser


def gate_config(args) -> dict:
    return {
        "gate_type": args.gate_type,
        "gate_num_experts": args.gate_num_experts,
        "vlm_branch_input": args.vlm_branch_input,
    }


def fingerprint(args) -> str:
    keys = ("learning_rate", "weight_decay", "epochs", "batch_size", "seed")
    return hash_of(
        {
            "stage": STAGE,
            "data": dataset_fingerprint(args),
            "head": upstream_fingerprint(args.run_dir, "distill", STAGE),
            "gate": gate_config(args),
            **{k: getattr(args, k) for k in keys},
        }
    )


def build_gate(config: dict, num_labels: int) -> torch.nn.Module:
    return GATES[config["gate_type"]](num_labels, num_experts=config["gate_num_experts"])


def load_gate(run_dir) -> tuple[torch.nn.Module, dict]:
    """The trained gate of a run (eval mode) and its config."""
    from safetensors.torch import load_file

    output = stage_output(run_dir, STAGE)
    config = json.loads((output / GATE_CONFIG).read_text())
    gate = build_gate(config, len(config["class_names"]))
    gate.load_state_dict(load_file(output / GATE_WEIGHTS))
    return gate.eval(), config


def gate_inputs(head, features: dict, spec: dict, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(head logits, VLM gate input) of a split's cached features."""
    vlm_scores = vlm_gate_input(features, spec["model_config"]["vlm_branch_mode"], config["vlm_branch_input"])
    return head_logits(head, features["image_embeds"]), vlm_scores


@torch.no_grad()
def fused_logits(gate, head_logits_: torch.Tensor, vlm_scores: torch.Tensor) -> torch.Tensor:
    gate.eval()
    device = next(gate.parameters()).device
    return gate(head_logits_.to(device), vlm_scores.to(device))[0].float().cpu()


# ---------------------------------------------------------------------------------------------- the stage
def run(args) -> dict:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args, STAGE)
    set_seed(args.seed)
    spec = read_spec(args.run_dir)
    data = load_run_data(args, accelerator, class_names=spec["class_names"])
    stage_fingerprint = fingerprint(args)
    start_stage(accelerator, args.run_dir, STAGE)
    class_names = data.class_names
    config = {**gate_config(args), "class_names": class_names}

    features = get_features(
        accelerator, args.run_dir, data, spec, ["train", "val"], batch_size=args.feature_batch_size,
        num_workers=args.num_workers,
    )  # fmt: skip
    head = load_head(args.run_dir)
    train_inputs = gate_inputs(head, features["train"], spec, config)
    val_inputs = gate_inputs(head, features["val"], spec, config)

    gate = build_gate(config, len(class_names))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*train_inputs, features["train"]["labels"]),
        batch_size=args.batch_size,
        shuffle=True,
    )
    optimizer = torch.optim.Adam(gate.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    gate, optimizer, loader = accelerator.prepare(gate, optimizer, loader)

    epochs_done = resume_if_asked(accelerator, args, STAGE, stage_fingerprint)
    metrics = {}
    for epoch in range(epochs_done, args.epochs):
        gate.train()
        loader.set_epoch(epoch)
        total_loss, steps = 0.0, 0
        for head_out, vlm_scores, labels in progress(
            accelerator, loader, desc=f"Gate epoch {epoch + 1}/{args.epochs}"
        ):
            loss = F.cross_entropy(gate(head_out, vlm_scores)[0], labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total_loss += accelerator.reduce(loss.detach(), reduction="mean").item()
            steps += 1
        logits = fused_logits(accelerator.unwrap_model(gate), *val_inputs)
        metrics = classification_metrics(features["val"]["labels"], logits.argmax(-1), class_names)
        metrics["train_loss"] = total_loss / max(steps, 1)
        logger.info(f"Gate epoch {epoch + 1}: {metrics}")
        accelerator.log({f"gate/val_{k}": v for k, v in metrics.items()}, step=epoch + 1)
        if end_epoch(accelerator, args, STAGE, stage_fingerprint, epoch + 1, args.epochs):
            close_trackers(accelerator)
            return {"stage": STAGE, "stopped": True, "epochs_done": epoch + 1}

    output = stage_output(args.run_dir, STAGE)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_file(accelerator.unwrap_model(gate).state_dict(), output / GATE_WEIGHTS)
        (output / GATE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_complete(
            args.run_dir, STAGE, stage_fingerprint, val_metrics=metrics, gate_type=args.gate_type,
            num_processes=accelerator.num_processes,
        )  # fmt: skip
    finish_stage(accelerator, args, STAGE)
    return {"stage": STAGE, "output": str(output), "val_metrics": metrics}


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = ["build_gate", "build_parser", "fingerprint", "fused_logits", "gate_inputs", "load_gate", "run"]
