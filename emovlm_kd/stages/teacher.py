"""Stage 2: fine-tune a conventional vision model (any `timm` model) on the labels: the distillation teacher.

Paper defaults: ViT-B/16 at 384 px (`vit_base_patch16_384`, ImageNet-pretrained), Adam lr 3e-5, weight decay 1e-5,
batch 10, 10 epochs; RandomResizedCrop + horizontal flip for training, resize + centre crop (timm's data config of
the model) for evaluation. Writes `<run_dir>/teacher/` (`model.safetensors` + timm's `config.json`, loadable with
`timm.create_model("local-dir:<run_dir>/teacher", pretrained=True)`).
"""

import argparse
import logging
import sys

import torch
import torch.nn.functional as F

from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.data import open_image_rgb, stage_output, write_complete
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
    seeded_rng,
    start_stage,
)

logger = logging.getLogger(__name__)

STAGE = "teacher"
# Named presets: (timm model name, create_model kwargs). `tiny` is a 2-block ViT at 32 px for offline tests.
TEACHER_PRESETS = {
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(parser)
    add_epoch_args(parser)
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--teacher", default="vit_base_patch16_384", help=f"timm model name, or a preset: {sorted(TEACHER_PRESETS)}"
    )
    group.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Start from timm's pretrained weights (downloaded from the Hub); presets are never pretrained",
    )
    group.add_argument("--learning-rate", type=float, default=3e-5)
    group.add_argument("--weight-decay", type=float, default=1e-5)
    group.add_argument("--batch-size", type=int, default=10, help="Global batch size (split across processes)")
    group.add_argument("--eval-batch-size", type=int, default=32)
    group.add_argument("--epochs", type=int, default=10)
    return parser


def fingerprint(args) -> str:
    keys = ("teacher", "pretrained", "learning_rate", "weight_decay", "batch_size", "epochs", "seed")
    return hash_of({"stage": STAGE, "data": dataset_fingerprint(args), **{k: getattr(args, k) for k in keys}})


# ---------------------------------------------------------------------------------------------- model and data
def create_teacher(name: str, num_classes: int, pretrained: bool = True):
    """A timm classifier with a fresh `num_classes` head (`name` may be a preset of `TEACHER_PRESETS`)."""
    import timm

    model_name, kwargs = TEACHER_PRESETS.get(name, (name, {}))
    pretrained = pretrained and name not in TEACHER_PRESETS
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"--teacher {name!r} is not a timm model name (see timm.list_models())") from None
        raise
    except OSError as error:  # huggingface_hub's offline / connection errors
        raise RuntimeError(
            f"Could not download the pretrained weights of {model_name!r} ({type(error).__name__}); "
            f"pass --no-pretrained to start from random weights"
        ) from error


def load_teacher(teacher_dir):
    """The trained teacher of a run (`<run_dir>/teacher/`), in eval mode."""
    import timm

    return timm.create_model(f"local-dir:{teacher_dir}", pretrained=True).eval()


def teacher_transforms(model):
    """(train, eval) transforms from the model's timm data config: RandomResizedCrop + flip; resize + centre crop."""
    from timm.data import create_transform, resolve_input_data_config

    config = resolve_input_data_config(model)  # the model's actual input size (also for presets' img_size)
    train = create_transform(**config, is_training=True, hflip=0.5, color_jitter=None)
    return train, create_transform(**config, is_training=False)


class ImageSplit(torch.utils.data.Dataset):
    """A split's images through a transform. With `augment_seed`, sample `i` of epoch `e` draws its random
    augmentation from a generator seeded by (seed, e, i): identical whatever the process or worker layout."""

    def __init__(self, split, transform, augment_seed: int | None = None):
        self.paths, self.labels = split["image_path"], split["label"]
        self.transform, self.augment_seed, self.epoch = transform, augment_seed, 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = open_image_rgb(self.paths[index])
        if self.augment_seed is None:
            pixels = self.transform(image)
        else:
            with seeded_rng(self.augment_seed, self.epoch, index):
                pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": self.labels[index]}


@torch.no_grad()
def predict(accelerator, model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole (prepared) loader, gathered from every process without duplicates."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in progress(accelerator, loader, desc="Evaluating", leave=False):
        logits, labels = accelerator.gather_for_metrics((model(batch["pixel_values"]), batch["labels"]))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


# ---------------------------------------------------------------------------------------------- the stage
def run(args) -> dict:
    from accelerate.utils import set_seed
    from timm.models import save_for_hf

    accelerator = make_accelerator(args, STAGE)
    set_seed(args.seed)
    data = load_run_data(args, accelerator)
    stage_fingerprint = fingerprint(args)
    start_stage(accelerator, args.run_dir, STAGE)
    class_names = data.class_names

    with accelerator.main_process_first():  # one download of pretrained weights
        model = create_teacher(args.teacher, len(class_names), args.pretrained)
    train_transform, eval_transform = teacher_transforms(model)
    train_set = ImageSplit(data.splits["train"], train_transform, augment_seed=args.seed)
    loader_kwargs = {"num_workers": args.num_workers, "pin_memory": torch.cuda.is_available()}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(
        ImageSplit(data.splits["val"], eval_transform), batch_size=args.eval_batch_size, **loader_kwargs
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    epochs_done = resume_if_asked(accelerator, args, STAGE, stage_fingerprint)
    metrics = {}
    for epoch in range(epochs_done, args.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        train_set.epoch = epoch
        total_loss, steps = 0.0, 0
        for batch in progress(accelerator, train_loader, desc=f"Teacher epoch {epoch + 1}/{args.epochs}"):
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total_loss += accelerator.reduce(loss.detach(), reduction="mean").item()
            steps += 1
        logits, labels = predict(accelerator, model, val_loader)
        metrics = classification_metrics(labels, logits.argmax(-1), class_names)
        metrics["train_loss"] = total_loss / max(steps, 1)
        logger.info(f"Teacher epoch {epoch + 1}: {metrics}")
        accelerator.log({f"teacher/val_{k}": v for k, v in metrics.items()}, step=epoch + 1)
        if end_epoch(accelerator, args, STAGE, stage_fingerprint, epoch + 1, args.epochs):
            close_trackers(accelerator)
            return {"stage": STAGE, "stopped": True, "epochs_done": epoch + 1}

    output = stage_output(args.run_dir, STAGE)
    if accelerator.is_main_process:
        save_for_hf(
            accelerator.unwrap_model(model),
            output,
            model_config={"label_names": class_names},
            safe_serialization=True,
        )
        write_complete(
            args.run_dir, STAGE, stage_fingerprint, teacher=args.teacher, val_metrics=metrics, epochs=args.epochs,
            unreadable_images=data.bad_images, num_processes=accelerator.num_processes,
        )  # fmt: skip
    finish_stage(accelerator, args, STAGE)
    return {"stage": STAGE, "output": str(output), "val_metrics": metrics, "unreadable_images": data.bad_images}


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = [
    "TEACHER_PRESETS",
    "build_parser",
    "create_teacher",
    "fingerprint",
    "load_teacher",
    "run",
    "teacher_transforms",
]
