"""Stage 3: distil the teacher into a head on the frozen VLM's own image embeddings.

The VLM's pooled image embeddings and class-answer log-likelihoods (one vision pass per image) and the teacher's
logits are computed once per image and cached (`emovlm_kd.cache`); the head then trains on the cache with the
paper's loss `alpha * KL(teacher_T || head_T) * T^2 + (1 - alpha) * CE` (alpha 0.5, T 2; Adam lr 1e-5, weight decay
1e-4, 5 epochs, one image per update as published). The VLM is the run's instruction-tuned `vlm/` when stage 1
completed, else `--vlm`; a tuned VLM is scored with the prompts and image cap it was tuned on (`VLMInputArguments`),
and other settings are refused. Writes `<run_dir>/head/` (`head.safetensors`, `head_spec.json` with what stages 4-6
need to rebuild the model).
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from configuration_emovlm_kd import EmoVLMKDConfig
from emovlm_kd.arguments import VLM_INPUT_FIELDS, VLMBranchArguments, VLMInputArguments, training_arguments_class
from emovlm_kd.artifacts import head_logits, save_head, spec_vlm
from emovlm_kd.batch_semantics import SAME_UPDATES
from emovlm_kd.cache import FeatureCache, vlm_identity
from emovlm_kd.epoch_loop import train_on_cached_tensors
from emovlm_kd.metrics import classification_metrics
from emovlm_kd.run_dir import (
    DataError,
    hash_json,
    is_complete,
    read_class_names,
    read_complete,
    stage_output,
    upstream_fingerprint,
)
from emovlm_kd.settings import (
    CARD,
    CONTENT,
    MODEL_CONFIG,
    NOTHING,
    RESULT,
    VLM_FEATURES,
    Affects,
    fingerprint_fields,
    values_with,
)
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage
from modeling_emovlm_kd import EmoVLMKDHead, distillation_loss

STAGE = "distill"


@dataclass
class DistillArguments(
    VLMInputArguments,
    VLMBranchArguments,
    training_arguments_class("DistillTraining", learning_rate=1e-5, weight_decay=1e-4, epochs=5, batch_size=1),
):
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "vlm": CONTENT | VLM_FEATURES,  # by the weights' identity (`cache.vlm_identity`), not by where they lie
        "vlm_dtype": VLM_FEATURES,
        "feature_batch_size": NOTHING,  # sampled answers are seeded per image, whatever the batch
        "head_hidden_sizes": RESULT | MODEL_CONFIG | CARD,
        "head_dropout": RESULT | MODEL_CONFIG,
        "kd_alpha": RESULT | MODEL_CONFIG | CARD,
        "kd_temperature": RESULT | MODEL_CONFIG | CARD,
        "shuffle_each_epoch": RESULT | CARD,
    }

    vlm: str = field(
        default="Qwen/Qwen2-VL-7B-Instruct",
        metadata={
            "help": "VLM checkpoint or folder when the run has no instruction-tuned vlm/ (stage 1); 'tiny' and "
            "'tiny-qwen3-vl' work offline"
        },
    )
    vlm_dtype: str = field(
        default="auto", metadata={"help": "dtype to load the VLM in (auto, bfloat16, float32, ...)"}
    )
    feature_batch_size: int = field(default=8, metadata={"help": "Images per VLM forward while caching features"})
    head_hidden_sizes: list[int] = field(
        default_factory=lambda: EmoVLMKDConfig().head_hidden_sizes, metadata={"help": "Hidden layers of the MLP head"}
    )
    head_dropout: float = field(default=EmoVLMKDConfig.head_dropout, metadata={"help": "Dropout of the head"})
    kd_alpha: float = field(
        default=EmoVLMKDConfig.kd_alpha, metadata={"help": "Weight of the KL term (1 - alpha: cross-entropy)"}
    )
    kd_temperature: float = field(default=EmoVLMKDConfig.kd_temperature, metadata={"help": "Distillation temperature"})
    shuffle_each_epoch: bool = field(
        default=True,
        metadata={
            "help": "Reshuffle the training images every epoch; --no-shuffle-each-epoch: one seeded shuffle, then the "
            "same order every epoch, as the reference iterates its data (train_distillation.py:33)"
        },
    )


ARGUMENTS = DistillArguments
# Settings the trained head depends on (the VLM itself by identity, in the feature spec).
FINGERPRINT_FIELDS = tuple(name for name in fingerprint_fields(DistillArguments) if name != "vlm")


def feature_spec(run_args, args: DistillArguments, class_names: list[str]) -> dict:
    """What the cached VLM features and the final model config depend on (saved as the head spec). The VLM is the
    run's instruction-tuned `vlm/` once stage 1 completed, else `args.vlm`."""
    tuned = is_complete(run_args.run_dir, "instruction_tuning")
    return {
        "vlm": args.vlm,
        "instruction_tuned": tuned,
        "vlm_identity": vlm_identity(run_args.run_dir, args.vlm, tuned),
        "vlm_dtype": args.vlm_dtype,
        "class_names": list(class_names),
        "max_image_side": args.max_image_side,
        "generation_seed": run_args.seed,  # of sampled answers in the 'generate' mode
        "model_config": values_with(args, MODEL_CONFIG),
    }


def fingerprint(run_args, args: DistillArguments, class_names=None) -> str:
    class_names = class_names or read_class_names(run_args.run_dir)
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            "teacher": upstream_fingerprint(run_args.run_dir, "teacher", STAGE),
            # the VLM by its identity, not by where it lies: a moved or copied run directory is the same run
            "spec": {k: v for k, v in feature_spec(run_args, args, class_names).items() if k != "vlm"},
            "seed": run_args.seed,
            **{name: getattr(args, name) for name in FINGERPRINT_FIELDS},
        }
    )


def check_tuned_vlm_inputs(run_args, args: DistillArguments):
    """A `DataError` when the run's instruction-tuned VLM was tuned on other prompts or images than these settings
    would score with (both come from the same `VLMInputArguments`; set them for every stage with a bare
    `--set KEY=VALUE` of `run_all`)."""
    record = read_complete(run_args.run_dir, "instruction_tuning")
    if record is None:
        return
    tuned = record.get("settings", {})
    defaults = VLMInputArguments()
    differing = [name for name in VLM_INPUT_FIELDS if tuned.get(name, getattr(defaults, name)) != getattr(args, name)]
    if differing:
        details = "; ".join(
            f"{name}: tuned on {tuned.get(name)!r}, here {getattr(args, name)!r}" for name in differing
        )
        raise DataError(
            f"The run's instruction-tuned VLM ({str(stage_output(run_args.run_dir, 'instruction_tuning'))!r}) was "
            f"trained on other VLM inputs than stage {STAGE!r} would score with ({details}). Give both stages the "
            "same settings (`run_all --set NAME=VALUE` sets every stage that has NAME), or run stage 1 again"
        )


def run(run_args, args: DistillArguments) -> dict:
    check_tuned_vlm_inputs(run_args, args)
    stage_run = begin_stage(run_args, args, STAGE, fingerprint, batch_semantics=SAME_UPDATES)
    accelerator, data = stage_run.accelerator, stage_run.data
    class_names = data.class_names
    spec = feature_spec(run_args, args, class_names)
    cache = FeatureCache(accelerator, run_args.run_dir, data, args.feature_batch_size, run_args.num_workers)
    features = cache.get(spec, list(data.splits), upstream_fingerprint(run_args.run_dir, "teacher", STAGE))
    train, val = features["train"], features["val"]
    in_features = train["image_embeds"].shape[-1]

    def kd_loss(model, batch) -> torch.Tensor:
        embeds, teacher_logits, labels = batch
        return distillation_loss(
            model(embeds), teacher_logits, labels, temperature=args.kd_temperature, alpha=args.kd_alpha
        )

    def validate(head) -> dict:
        return classification_metrics(val["labels"], head_logits(head, val["image_embeds"]).argmax(-1), class_names)

    head, metrics, stopped = train_on_cached_tensors(
        stage_run,
        lambda: EmoVLMKDHead(in_features, args.head_hidden_sizes, len(class_names), args.head_dropout),
        torch.utils.data.TensorDataset(train["image_embeds"], train["teacher_logits"], train["labels"]),
        kd_loss,
        validate,
        reshuffle=args.shuffle_each_epoch,
    )
    if stopped:
        return stopped
    record = {"val_metrics": metrics, "vlm": spec_vlm(run_args.run_dir, spec), "unreadable_images": data.bad_images}
    output = complete_stage(
        stage_run, lambda output: save_head(output, head, {**spec, "in_features": in_features}), **record
    )
    return {"stage": STAGE, "output": str(output), **record}


__all__ = ["ARGUMENTS", "STAGE", "DistillArguments", "check_tuned_vlm_inputs", "feature_spec", "fingerprint", "run"]
