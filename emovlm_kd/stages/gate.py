"""Stage 4: train the gate fusing the distilled head's logits and the VLM branch's prediction.

Both inputs come from the feature cache of stage 3 (the frozen head is applied to the cached image embeddings);
the gate trains with cross-entropy (paper: `concat_linear`, Adam lr 1e-4, weight decay 1e-4, 10 epochs, one image
per update). All five variants are selectable with `--gate-type`. With stage 3 in the `generate` mode with sampling,
`--resample-vlm-answers` draws a fresh sampled answer per training image every epoch, as the reference does (each
epoch's sample cached); by default every epoch sees the cached one. Writes `<run_dir>/gate/` (`gate.safetensors`,
`gate_spec.json`).
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from configuration_emovlm_kd import GATE_TYPES, VLM_BRANCH_INPUTS, EmoVLMKDConfig
from emovlm_kd.arguments import training_arguments_class
from emovlm_kd.artifacts import build_gate, fused_logits, gate_inputs, load_head, read_head_spec, save_gate
from emovlm_kd.batch_semantics import SAME_UPDATES
from emovlm_kd.cache import FeatureCache, samples_answers
from emovlm_kd.epoch_loop import train_on_cached_tensors
from emovlm_kd.metrics import classification_metrics
from emovlm_kd.run_dir import DataError, hash_json, upstream_fingerprint
from emovlm_kd.settings import CARD, MODEL_CONFIG, NOTHING, RESULT, Affects, fingerprint_fields, values_with
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage

STAGE = "gate"


@dataclass
class GateArguments(
    training_arguments_class("GateTraining", learning_rate=1e-4, weight_decay=1e-4, epochs=10, batch_size=1)
):
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "gate_type": RESULT | MODEL_CONFIG | CARD,
        "gate_num_experts": RESULT | MODEL_CONFIG,
        "vlm_branch_input": RESULT | MODEL_CONFIG | CARD,
        "resample_vlm_answers": RESULT | CARD,
        "feature_batch_size": NOTHING,  # sampled answers are seeded per image, whatever the batch
        "shuffle_each_epoch": RESULT | CARD,
    }

    gate_type: Literal[GATE_TYPES] = field(
        default=EmoVLMKDConfig.gate_type, metadata={"help": "Gate variant (the paper's best: concat_linear)"}
    )
    gate_num_experts: int = field(default=EmoVLMKDConfig.gate_num_experts, metadata={"help": "Experts of 'moe'"})
    vlm_branch_input: Literal[VLM_BRANCH_INPUTS] = field(
        default=EmoVLMKDConfig.vlm_branch_input,
        metadata={"help": "What the gate sees of the VLM: its class probabilities, or a one-hot answer (the paper's)"},
    )
    resample_vlm_answers: bool = field(
        default=False,
        metadata={
            "help": "Stage 3 in 'generate' mode with sampling: a fresh sampled VLM answer per image every epoch, as "
            "the reference does (the VLM runs on every training image every epoch); default: the cached one"
        },
    )
    feature_batch_size: int = field(default=8, metadata={"help": "Images per VLM forward if features are not cached"})
    shuffle_each_epoch: bool = field(
        default=True,
        metadata={
            "help": "Reshuffle the training images every epoch; --no-shuffle-each-epoch: one seeded shuffle, then the "
            "same order every epoch, as the reference iterates its data (train_gate.py:189)"
        },
    )


ARGUMENTS = GateArguments
FINGERPRINT_FIELDS = fingerprint_fields(GateArguments)


def gate_spec(args: GateArguments, class_names: list[str]) -> dict:
    """The gate's settings that the exported config keeps, and the classes."""
    return {**values_with(args, MODEL_CONFIG), "class_names": list(class_names)}


def fingerprint(run_args, args: GateArguments) -> str:
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            "head": upstream_fingerprint(run_args.run_dir, "distill", STAGE),
            "seed": run_args.seed,
            **{name: getattr(args, name) for name in FINGERPRINT_FIELDS},
        }
    )


def cross_entropy_loss(gate, batch) -> torch.Tensor:
    head_output, vlm_scores, labels = batch
    return F.cross_entropy(gate(head_output, vlm_scores)[0], labels)


def run(run_args, args: GateArguments) -> dict:
    head_spec = read_head_spec(run_args.run_dir)
    if args.resample_vlm_answers and not samples_answers(head_spec):
        raise DataError(
            "--resample-vlm-answers needs sampled VLM answers: stage 3 with --vlm-branch-mode generate and "
            "--generate-do-sample"
        )
    stage_run = begin_stage(
        run_args, args, STAGE, fingerprint, class_names=head_spec["class_names"], batch_semantics=SAME_UPDATES
    )
    accelerator, data = stage_run.accelerator, stage_run.data
    spec = gate_spec(args, data.class_names)
    # one cache for every call: a fresh sample each epoch loads the VLM once
    cache = FeatureCache(accelerator, run_args.run_dir, data, args.feature_batch_size, run_args.num_workers)
    features = cache.get(head_spec, ["train", "val"])
    head = load_head(run_args.run_dir)
    train_inputs = gate_inputs(head, features["train"], head_spec, spec)
    val_inputs = gate_inputs(head, features["val"], head_spec, spec)

    train_set = torch.utils.data.TensorDataset(*train_inputs, features["train"]["labels"])

    def validate(gate) -> dict:
        logits = fused_logits(gate, *val_inputs)
        return classification_metrics(features["val"]["labels"], logits.argmax(-1), data.class_names)

    def draw_vlm_answers(epoch: int):
        """The reference's gate training: the VLM answers every training image again each epoch (sample `epoch`;
        epoch 0 is the cached sample every other stage uses)."""
        if not args.resample_vlm_answers:
            return
        answers = features["train"]["vlm_generated"]
        if epoch > 0:
            answers = cache.get(head_spec, ["train"], sample=epoch)["train"]["vlm_generated"]
        train_set.tensors = (train_set.tensors[0], answers, train_set.tensors[2])

    gate, metrics, stopped = train_on_cached_tensors(
        stage_run,
        lambda: build_gate(spec, len(data.class_names)),
        train_set,
        cross_entropy_loss,
        validate,
        on_epoch_start=draw_vlm_answers,
        reshuffle=args.shuffle_each_epoch,
    )
    if stopped:
        return stopped
    output = complete_stage(
        stage_run,
        lambda output: save_gate(output, gate, spec),
        val_metrics=metrics,
        gate_type=args.gate_type,
    )
    return {"stage": STAGE, "output": str(output), "val_metrics": metrics}


__all__ = ["ARGUMENTS", "STAGE", "GateArguments", "fingerprint", "gate_spec", "run"]
