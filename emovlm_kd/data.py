"""Data and run-directory library shared by every training stage.

Datasets are ImageFolder trees::

    <root>/train/<class>/<image>      required
    <root>/val/<class>/<image>        optional; without it a stratified `val_fraction` of train (seed 42) is held out
    <root>/test/<class>/<image>       optional

`load_imagefolder` lists them into a `datasets.DatasetDict` (columns `image_path`: str, `label`: `ClassLabel`),
decoding nothing but a one-off readability check: unreadable images are listed in `ImageFolderData.bad_images`
with the reason, logged, and left out of the splits.

A training run lives in one directory; each stage reads what the earlier ones wrote::

    <run_dir>/labels.json               class names in output order, written by the first stage that runs
    <run_dir>/instruction_data.jsonl    stage 0: instruction data (one record per training image)
    <run_dir>/vlm/                      stage 1: the instruction-tuned VLM (adapter merged) + its processor
    <run_dir>/teacher/                  stage 2: the timm teacher (model.safetensors + config.json)
    <run_dir>/cache/                    stages 3-5: per-image features (pooled image embeddings, VLM log-likelihoods,
                                        teacher logits), one safetensors file per split and model fingerprint
    <run_dir>/head/                     stage 3: the distilled head
    <run_dir>/gate/                     stage 4: the gate
    <run_dir>/eval/                     stage 5: results.json, confusion matrices (PNG)
    <run_dir>/model/                    stage 6: the final model repo (what is pushed to the Hub)
    <run_dir>/checkpoints/<stage>/      Accelerate `save_state` checkpoints (for `--resume`)
    <run_dir>/logs/                     tracker logs (TensorBoard)

Every stage writes `<stage dir>/COMPLETE.json` as its last action, holding a fingerprint of its inputs and
arguments; the all-stages command skips a stage whose COMPLETE.json matches the fingerprint it would write.
The stage-0 output is a file, so its marker is `<run_dir>/instruction_data.COMPLETE.json`.
"""

import collections
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from PIL import Image

from image_processing_emovlm_kd import DEFAULT_MAX_IMAGE_PIXELS, RASTER_FORMATS, open_image, to_rgb, verify_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"
COMPLETE_FILE = "COMPLETE.json"
# Stage name -> path inside the run directory (the stage's output; COMPLETE.json goes inside, or next to a file).
STAGE_OUTPUTS = {
    "instruction_data": "instruction_data.jsonl",
    "instruction_tuning": "vlm",
    "teacher": "teacher",
    "distill": "head",
    "gate": "gate",
    "evaluate": "eval",
    "export": "model",
}
# The raster formats every decode accepts (never .eps/.ps/.pdf: PIL would hand those to Ghostscript).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in RASTER_FORMATS)


class DataError(ValueError):
    """A dataset or run directory that cannot be used as given (the message says which path and why)."""


# ---------------------------------------------------------------------------------------------- images
def open_image_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image file as 8-bit RGB (raster formats only, at most `max_pixels` pixels, checked from
    the header first); failures are `ValueError`s that name the file."""
    return to_rgb(open_image(path, max_pixels=max_pixels))


def check_image(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """None when `path` decodes as an image `open_image` accepts, else the reason it does not. The format and size
    are read from the header first, so a decompression bomb is refused without being decoded."""
    try:
        verify_image(path, max_pixels=max_pixels)
    except ValueError as error:
        message = str(error)
        return message.split(": ", 1)[1] if message.startswith("Could not read image") else message
    return None


# ---------------------------------------------------------------------------------------------- ImageFolder
@dataclass
class ImageFolderData:
    """An ImageFolder dataset: `splits` (a `DatasetDict` with `train`, `val` and maybe `test`), the class names in
    label order, the images that could not be read (`(path, reason)`) and the non-image files that were ignored."""

    root: str
    splits: DatasetDict
    class_names: list[str]
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    val_from_train: bool = False

    def fingerprint(self, split: str | None = None) -> str:
        """Hash of the listed files (path, size, mtime), their labels and the class names: changes when data does."""
        names = [split] if split else sorted(self.splits)
        entries = [self.class_names]
        for name in names:
            for path, label in zip(self.splits[name]["image_path"], self.splits[name]["label"]):
                stat = os.stat(path)
                entries.append([name, os.path.relpath(path, self.root), label, stat.st_size, stat.st_mtime_ns])
        return fingerprint(entries)

    def summary(self) -> str:
        sizes = ", ".join(f"{name}={len(split)}" for name, split in self.splits.items())
        text = f"{self.root}: {len(self.class_names)} classes {self.class_names}; {sizes}"
        if self.val_from_train:
            text += " (val held out from train)"
        if self.bad_images:
            text += f"; {len(self.bad_images)} unreadable images skipped"
        return text


def _list_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """`{class: [image paths]}` and the ignored paths of one split folder.

    Symbolic links: a class folder linking into the dataset or to a folder that holds this split (`test/x -> ..`)
    is skipped, and so are broken links and folder links below a class folder (each logged and listed as ignored);
    a linked image file is listed like any image, so a broken or looping one is reported with the unreadable images.
    """
    root, split = split_dir.parent.resolve(), split_dir.resolve()
    classes, ignored = {}, []
    for class_dir in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
        if class_dir.is_symlink():
            reason = _unfollowed_folder_link(class_dir, root, split)
            if reason:
                logger.warning(f"Skipped {str(class_dir)!r}: {reason}")
                ignored.append(str(class_dir))
                continue
        if not class_dir.is_dir():
            ignored.append(str(class_dir))  # a file beside the class folders
            continue
        images = []
        for path in sorted(p for p in class_dir.rglob("*") if not p.name.startswith(".")):
            if path.is_symlink() and path.is_dir():  # not followed (a loop or another class's files otherwise)
                logger.warning(f"Skipped {str(path)!r}: a link to a folder inside a class folder is not followed")
                ignored.append(str(path))
            elif path.is_dir():
                continue
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(str(path))
            else:
                ignored.append(str(path))
        if not images:
            raise DataError(f"Class folder {str(class_dir)!r} contains no image files")
        classes[class_dir.name] = images
    if not classes:
        raise DataError(f"Split folder {str(split_dir)!r} contains no class folders")
    return classes, ignored


def _unfollowed_folder_link(link: Path, root: Path, split: Path) -> str | None:
    """Why the symbolic link `link` in a split folder is not followed as a class folder, or None when it is."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as error:
        return f"a broken or looping symbolic link ({error})"
    if not target.is_dir():
        return None
    if target == root or root in target.parents:
        return f"a link to {str(target)!r} inside the dataset (classes must be real folders of their split)"
    if target in split.parents:
        return f"a link to {str(target)!r}, a folder holding this split"
    return None


def _find_bad_images(paths: list[str], num_threads: int | None = None) -> list[tuple[str, str]]:
    from tqdm.auto import tqdm

    num_threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(num_threads) as pool:
        reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="Checking images", leave=False))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def _split_dataset(images: dict[str, list[str]], class_names: list[str], bad: set[str]) -> Dataset:
    features = Features({"image_path": Value("string"), "label": ClassLabel(names=class_names)})
    rows = [(path, class_names.index(name)) for name in class_names for path in images[name] if path not in bad]
    return Dataset.from_dict(
        {"image_path": [path for path, _ in rows], "label": [label for _, label in rows]}, features=features
    )


def _stratified_holdout(
    train: Dataset, val_fraction: float, seed: int, class_names: list[str], where: str
) -> DatasetDict:
    """Hold out `val_fraction` of train, stratified by class; at least one image per class."""
    counts = collections.Counter(train["label"])
    too_few = [class_names[label] for label in range(len(class_names)) if counts[label] < 2]
    if too_few:
        raise DataError(f"{where!r} needs at least 2 readable images per class to hold out a val split: {too_few}")
    size = math.ceil(val_fraction * len(train))
    if size < len(class_names):
        logger.warning(
            f"val_fraction={val_fraction} of {len(train)} images is fewer than one per class: "
            f"holding out {len(class_names)}"
        )
        size = len(class_names)
    return train.train_test_split(test_size=size, stratify_by_column="label", seed=seed)


def load_imagefolder(
    root: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 42,
    class_names: list[str] | None = None,
    check_images: bool = True,
) -> ImageFolderData:
    """List an ImageFolder dataset (see the module docstring) into train / val (/ test) splits.

    Args:
        root: the dataset folder, holding `train/` and optionally `val/` and `test/`.
        val_fraction: share of train held out (stratified by class) as `val` when there is no `val/` folder.
        seed: seed of that split.
        class_names: the classes in label order; by default the sorted folder names. Must be the same set as the
            folders.
        check_images: decode every image once and leave out (and report) the unreadable ones.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist")
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"Dataset folder {str(root)!r} has no train/ folder (found folders: {found})")

    listed, ignored = {}, []
    for split in SPLITS:
        if (root / split).is_dir():
            listed[split], ignored_here = _list_split(root / split)
            ignored += ignored_here
    folder_classes = sorted(listed["train"])
    for split, images in listed.items():
        if sorted(images) != folder_classes:
            raise DataError(
                f"Class folders of {str(root / split)!r} {sorted(images)} differ from those of "
                f"{str(root / 'train')!r} {folder_classes}"
            )
    if class_names is None:
        class_names = folder_classes
    elif sorted(class_names) != folder_classes:
        raise DataError(
            f"Given class names {list(class_names)} differ from the class folders of {str(root)!r}: {folder_classes}"
        )
    class_names = list(class_names)

    all_paths = [path for images in listed.values() for paths in images.values() for path in paths]
    bad_images = _find_bad_images(all_paths) if check_images else []
    bad = {path for path, _ in bad_images}
    splits = DatasetDict({split: _split_dataset(images, class_names, bad) for split, images in listed.items()})
    for split, dataset in splits.items():
        missing = sorted(set(range(len(class_names))) - set(dataset["label"]))
        if missing:
            raise DataError(
                f"Split {split!r} of {str(root)!r} has no readable image of class(es) "
                f"{[class_names[i] for i in missing]}"
            )

    val_from_train = "val" not in splits
    if val_from_train:
        if not 0 < val_fraction < 1:
            raise DataError(f"{str(root)!r} has no val/ folder and val_fraction={val_fraction} is not in (0, 1)")
        held_out = _stratified_holdout(splits["train"], val_fraction, seed, class_names, str(root / "train"))
        splits["train"], splits["val"] = held_out["train"], held_out["test"]
    splits = DatasetDict({split: splits[split] for split in SPLITS if split in splits})

    data = ImageFolderData(str(root), splits, class_names, bad_images, ignored, val_from_train)
    log_data_report(data)
    return data


def log_data_report(data: ImageFolderData, log=None):
    """Log the split sizes, every unreadable image with its reason, and the ignored non-image files."""
    log = log or logger
    log.info(data.summary())
    for path, reason in data.bad_images:
        log.warning(f"Skipped unreadable image {path!r}: {reason}")
    if data.ignored_files:
        log.warning(f"Ignored {len(data.ignored_files)} non-image file(s): {data.ignored_files[:10]}")


# ---------------------------------------------------------------------------------------------- run directory
def fingerprint(value) -> str:
    """A short stable hash of any JSON-serialisable value (paths and other objects are stringified)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_class_names(run_dir: str | os.PathLike, class_names: list[str]) -> list[str]:
    """Fix the run's classes: write `<run_dir>/labels.json` on first use, else check `class_names` against it.

    Call it before any heavy work: a dataset whose classes or class order differ from the run's is an error.
    """
    path = Path(run_dir) / LABELS_FILE
    class_names = list(class_names)
    if path.exists():
        recorded = json.loads(path.read_text())["class_names"]
        if recorded != class_names:
            raise DataError(
                f"The dataset's classes {class_names} differ from those fixed for this run in {str(path)!r}: "
                f"{recorded}. Use the same dataset (and class order) for every stage of a run, or a new run directory."
            )
        return recorded
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"class_names": class_names}, indent=2) + "\n")
    os.replace(tmp, path)
    return class_names


def read_class_names(run_dir: str | os.PathLike) -> list[str]:
    path = Path(run_dir) / LABELS_FILE
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist: run a training stage on a dataset first")
    return json.loads(path.read_text())["class_names"]


def stage_output(run_dir: str | os.PathLike, stage: str) -> Path:
    """Where `stage` (a key of `STAGE_OUTPUTS`) writes its output in the run directory."""
    return Path(run_dir) / STAGE_OUTPUTS[stage]


def complete_marker(run_dir: str | os.PathLike, stage: str) -> Path:
    output = stage_output(run_dir, stage)
    return output.with_suffix(".COMPLETE.json") if output.suffix else output / COMPLETE_FILE


def read_complete(run_dir: str | os.PathLike, stage: str) -> dict | None:
    """The stage's COMPLETE.json contents, or None when the stage has not completed."""
    marker = complete_marker(run_dir, stage)
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(run_dir: str | os.PathLike, stage: str, stage_fingerprint: str | None = None) -> bool:
    """Whether the stage completed (with this fingerprint of its inputs and arguments, when given)."""
    record = read_complete(run_dir, stage)
    return record is not None and (stage_fingerprint is None or record.get("fingerprint") == stage_fingerprint)


def write_complete(run_dir: str | os.PathLike, stage: str, stage_fingerprint: str, **info) -> Path:
    """Mark the stage complete; call it as the stage's last action (written atomically)."""
    marker = complete_marker(run_dir, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage,
        "fingerprint": stage_fingerprint,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **info,
    }
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, marker)
    return marker


def clear_complete(run_dir: str | os.PathLike, stage: str):
    """Remove the stage's marker (a stage does this when it starts, so a crash never leaves a stale marker)."""
    complete_marker(run_dir, stage).unlink(missing_ok=True)


def resolve_vlm(run_dir: str | os.PathLike, vlm: str) -> str:
    """The VLM a stage 3+ run uses: the run's instruction-tuned `vlm/` when stage 1 completed, else `vlm`."""
    tuned = stage_output(run_dir, "instruction_tuning")
    return str(tuned) if is_complete(run_dir, "instruction_tuning") else vlm


def build_emovlm_kd(vlm: str, class_names: list[str], seed: int = 0, dtype="auto", **config_kwargs):
    """Load a VLM (`"tiny"`, a Hub name or a folder) and wrap it with a fresh head and gate for `class_names`:
    `(model, image_processor, vlm_processor)`. `config_kwargs` are `EmoVLMKDConfig` fields."""
    from emovlm_kd.vlm import load_vlm_and_processor
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    vlm_model, vlm_processor = load_vlm_and_processor(vlm, dtype=dtype, seed=seed)
    model = EmoVLMKDForImageClassification.from_vlm(vlm_model, vlm_processor, list(class_names), **config_kwargs)
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(vlm_processor, model.config.prompt_text())
    return model.eval(), image_processor, vlm_processor


__all__ = [
    "COMPLETE_FILE",
    "DataError",
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "LABELS_FILE",
    "STAGE_OUTPUTS",
    "build_emovlm_kd",
    "check_image",
    "clear_complete",
    "complete_marker",
    "ensure_class_names",
    "fingerprint",
    "is_complete",
    "load_imagefolder",
    "log_data_report",
    "open_image_rgb",
    "read_class_names",
    "read_complete",
    "resolve_vlm",
    "stage_output",
    "write_complete",
]
