"""Stage 2: fine-tune a conventional vision model (any `timm` model) on the labels: the distillation teacher.

Paper defaults: ViT-B/16 at 384 px with the reference's weights (`vit_base_patch16_384.orig_in21k_ft_in1k`, what
`google/vit-base-patch16-384` holds), Adam lr 3e-5, weight decay 1e-5, batch 10, 10 epochs; the reference's
transforms: RandomResizedCrop + horizontal flip for training, resize + centre crop for evaluation, bilinear, the
model's normalisation (mean = std = 0.5). Writes `<run_dir>/teacher/` (`model.safetensors` + timm's `config.json`,
loadable with `timm.create_model("local-dir:<run_dir>/teacher", pretrained=True)`).
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from emovlm_kd.arguments import training_arguments_class
from emovlm_kd.batch_semantics import PER_PROCESS
from emovlm_kd.epoch_loop import train_epochs
from emovlm_kd.metrics import classification_metrics
from emovlm_kd.optimizers import build_adam_optimizer
from emovlm_kd.processes import progress
from emovlm_kd.run_dir import hash_json
from emovlm_kd.seeding import seeded_rng
from emovlm_kd.settings import CARD, NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage
from emovlm_kd.teachers import DEFAULT_TEACHER, TEACHER_PRESETS, create_teacher, teacher_transforms

STAGE = "teacher"


@dataclass
class TeacherArguments(
    training_arguments_class("TeacherTraining", learning_rate=3e-5, weight_decay=1e-5, epochs=10, batch_size=10)
):
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "teacher": RESULT | CARD,
        "pretrained": RESULT,
        "eval_batch_size": NOTHING,
    }

    teacher: str = field(
        default=DEFAULT_TEACHER,
        metadata={
            "help": f"timm model name, or a preset: {sorted(TEACHER_PRESETS)} (vgg, resnet: the reference's "
            "torchvision VGG16 / ResNet50 weights through timm, at its 384 px and normalisation)"
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "Start from timm's pretrained weights (downloaded from the Hub); the 'tiny' preset never is"
        },
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the validation pass"})


ARGUMENTS = TeacherArguments
# Settings the trained teacher depends on (not the checkpointing or evaluation batch).
FINGERPRINT_FIELDS = fingerprint_fields(TeacherArguments)
TRANSFORMS = "reference"  # a new name when `teacher_transforms` changes: teachers trained otherwise are stale


def fingerprint(run_args, args: TeacherArguments) -> str:
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            "seed": run_args.seed,
            "transforms": TRANSFORMS,
            **{name: getattr(args, name) for name in FINGERPRINT_FIELDS},
        }
    )


class ImageSplit(torch.utils.data.Dataset):
    """A split of the run's data (`emovlm_kd.data.ImageData`) through a transform. With `augment_seed`, sample `i`
    of epoch `e` draws its random augmentation from a generator seeded by (seed, e, i): identical whatever the
    process or worker layout."""

    def __init__(self, data, split: str, transform, augment_seed: int | None = None):
        self.data, self.split, self.labels = data, split, data.column(split, "label")
        self.transform, self.augment_seed, self.epoch = transform, augment_seed, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.data.image(self.split, index)
        if self.augment_seed is None:
            pixels = self.transform(image)
        else:
            with seeded_rng(self.augment_seed, self.epoch, index):
                pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": self.labels[index]}


@torch.no_grad()
def predict_logits(accelerator, model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole (prepared) loader, gathered from every process without duplicates."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in progress(accelerator, loader, desc="Evaluating", leave=False):
        logits, labels = accelerator.gather_for_metrics((model(batch["pixel_values"]), batch["labels"]))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def cross_entropy_loss(model, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])


def run(run_args, args: TeacherArguments) -> dict:
    from timm.models import save_for_hf

    stage_run = begin_stage(run_args, args, STAGE, fingerprint, batch_semantics=PER_PROCESS)
    accelerator, data = stage_run.accelerator, stage_run.data
    class_names = data.class_names
    with accelerator.main_process_first():  # one download of pretrained weights
        model = create_teacher(args.teacher, len(class_names), args.pretrained)
    train_transform, eval_transform = teacher_transforms(model)
    train_set = ImageSplit(data, "train", train_transform, augment_seed=run_args.seed)
    loader_kwargs = {"num_workers": run_args.num_workers, "pin_memory": torch.cuda.is_available()}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(
        ImageSplit(data, "val", eval_transform), batch_size=args.eval_batch_size, **loader_kwargs
    )
    optimizer = build_adam_optimizer(model.parameters(), args, accelerator.device)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    def validate() -> dict:
        logits, labels = predict_logits(accelerator, model, val_loader)
        return classification_metrics(labels, logits.argmax(-1), class_names)

    def set_augmentation_epoch(epoch: int):
        train_set.epoch = epoch

    metrics, stopped = train_epochs(
        stage_run, model, train_loader, optimizer, cross_entropy_loss, validate, on_epoch_start=set_augmentation_epoch
    )
    if stopped:
        return stopped

    def save_teacher(output):
        teacher = accelerator.unwrap_model(model)
        save_for_hf(teacher, output, model_config={"label_names": class_names}, safe_serialization=True)

    output = complete_stage(
        stage_run,
        save_teacher,
        teacher=args.teacher,
        val_metrics=metrics,
        epochs=args.epochs,
        unreadable_images=data.bad_images,
    )
    return {"stage": STAGE, "output": str(output), "val_metrics": metrics, "unreadable_images": data.bad_images}


__all__ = ["ARGUMENTS", "STAGE", "TeacherArguments", "fingerprint", "run"]
