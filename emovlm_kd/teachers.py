"""The distillation teacher: any `timm` classifier, its data transforms, and loading a trained one from a run."""

# The reference's teacher: `google/vit-base-patch16-384`, the original ViT-B/16 at 384 px (ImageNet-21k, fine-tuned
# on ImageNet-1k). timm's untagged `vit_base_patch16_384` is another checkpoint (AugReg); this tag is those weights.
DEFAULT_TEACHER = "vit_base_patch16_384.orig_in21k_ft_in1k"

# The reference's data config for every teacher (data_utils.py: INPUT_SIZE 384 of config.json, the ViT feature
# extractor's mean = std = 0.5), also for its torchvision VGG16 and ResNet50 (`--model vgg|resnet`, train_ViT.py:12-23).
REFERENCE_DATA_CONFIG = {"input_size": (3, 384, 384), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# Named presets: (timm model name, create_model kwargs). `tiny` is a 2-block ViT at 32 px for offline tests (never
# pretrained). `vgg` and `resnet` are the reference's torchvision teachers through timm's ports of the torchvision
# ImageNet-1k weights (`.tv_in1k`: `models.vgg16(pretrained=True)`, `models.resnet50(pretrained=True)`), with the
# reference's input size and normalisation.
TEACHER_PRESETS = {
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}),
    "vgg": ("vgg16.tv_in1k", {"pretrained_cfg_overlay": REFERENCE_DATA_CONFIG}),
    "resnet": ("resnet50.tv_in1k", {"pretrained_cfg_overlay": REFERENCE_DATA_CONFIG}),
}
RANDOM_INIT_PRESETS = ("tiny",)


def create_teacher(name: str, num_classes: int, pretrained: bool = True):
    """A timm classifier with a fresh `num_classes` head (`name` may be a preset of `TEACHER_PRESETS`)."""
    import timm

    from timm.models import parse_model_name

    model_name, kwargs = TEACHER_PRESETS.get(name, (name, {}))
    pretrained = pretrained and name not in RANDOM_INIT_PRESETS
    source, _ = parse_model_name(model_name)
    if source is None and not timm.is_model(model_name):  # `hf-hub:` / `local-dir:` names are timm's to resolve
        raise ValueError(f"--teacher {name!r} is not a timm model name (see timm.list_models())")
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as error:  # huggingface_hub's offline / connection errors
        raise RuntimeError(
            f"Could not download the pretrained weights of {model_name!r} ({type(error).__name__}); "
            f"pass --no-pretrained to start from random weights"
        ) from error


def load_teacher(teacher_dir):
    """A trained teacher saved with `timm.models.save_for_hf` (a run's `teacher/`), in eval mode."""
    import timm

    return timm.create_model(f"local-dir:{teacher_dir}", pretrained=True).eval()


def teacher_transforms(model):
    """(train, eval) transforms as the reference's (`data_utils.ImageDataset`), at the model's input size and with
    its normalisation (timm's data config; mean = std = 0.5 for the default teacher, as the reference's feature
    extractor has them): train RandomResizedCrop + horizontal flip, eval Resize (shorter side) + CenterCrop, both
    bilinear."""
    from timm.data import resolve_input_data_config
    from torchvision import transforms

    config = resolve_input_data_config(model)  # the model's actual input size (also for presets' img_size)
    size = tuple(config["input_size"][1:])
    bilinear = transforms.InterpolationMode.BILINEAR
    to_tensor = [transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])]
    train = transforms.Compose(
        [transforms.RandomResizedCrop(size, interpolation=bilinear), transforms.RandomHorizontalFlip(), *to_tensor]
    )
    evaluation = transforms.Compose(
        [transforms.Resize(min(size), interpolation=bilinear), transforms.CenterCrop(size), *to_tensor]
    )
    return train, evaluation


__all__ = [
    "DEFAULT_TEACHER",
    "REFERENCE_DATA_CONFIG",
    "TEACHER_PRESETS",
    "create_teacher",
    "load_teacher",
    "teacher_transforms",
]
