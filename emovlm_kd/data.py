"""Datasets: ImageFolder trees listed into `datasets.DatasetDict`s, with unreadable images reported and skipped.

    <root>/train/<class>/<image>      required
    <root>/val/<class>/<image>        optional; without it a stratified `val_fraction` of train (seed 42) is held out
    <root>/test/<class>/<image>       optional

`load_imagefolder` lists them into a `datasets.DatasetDict` (columns `image_path`: str, `label`: `ClassLabel`),
decoding nothing but a one-off readability check: unreadable images are listed in `ImageFolderData.bad_images`
with the reason, logged, and left out of the splits.

`ImageData` is what every stage reads, whatever the source (`emovlm_kd.sources` adds every `datasets` source): the
image of row `i` of a split, its stored bytes and a stable key of the row.
"""

import collections
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from PIL import Image

from emovlm_kd.run_dir import DataError, file_digest, hash_json
from image_decoding_emovlm_kd import DEFAULT_MAX_IMAGE_PIXELS, RASTER_FORMATS, open_image, to_rgb, verify_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The raster formats every decode accepts (never .eps/.ps/.pdf: PIL would hand those to Ghostscript).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in RASTER_FORMATS)


def open_image_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image file as 8-bit RGB (raster formats only, at most `max_pixels` pixels, checked from
    the header first); failures are `ValueError`s that name the file."""
    name = repr(os.fspath(path))
    return to_rgb(open_image(path, name, max_pixels=max_pixels), name)


def check_image(source, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """None when `source` (a path or encoded bytes) decodes as an image `open_image` accepts, else the reason it
    does not. The format and size are read from the header first, so a decompression bomb is refused undecoded."""
    try:
        verify_image(source, name, max_pixels)
    except ValueError as error:
        message = str(error)
        return message.split(": ", 1)[1] if message.startswith("Could not read image") else message
    return None


@dataclass
class ImageData:
    """A run's dataset, whatever its source (an ImageFolder tree here, any `datasets` source in `emovlm_kd.sources`):
    `splits` (a `DatasetDict` of `train`, `val` and maybe `test`, each with a `label` column), the class names in label
    order, the images that could not be decoded (`(where, reason)`), the files that were ignored, and whether `val`
    was held out of train.

    Every stage reads the images through it, one row at a time: `image(split, i)` (decoded, RGB),
    `image_bytes(split, i)` (as stored), `key(split, i)` (a stable name of the row, e.g. stage 0's record key) and
    `content_hash(split)` (changes when the split's images or labels do; the feature cache's key). An image that was
    readable when the data was loaded and no longer is (removed or changed during the run) is a `DataError` naming
    it. `verify_content`: identify files by a hash of their bytes rather than by their size and modification time.
    """

    root: str
    splits: DatasetDict
    class_names: list[str]
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    val_from_train: bool = False
    verify_content: bool = False
    _columns: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def image(self, split: str, index: int) -> Image.Image:
        raise NotImplementedError

    def image_bytes(self, split: str, index: int) -> bytes:
        raise NotImplementedError

    def key(self, split: str, index: int) -> str:
        raise NotImplementedError

    def content_hash(self, split: str | None = None) -> str:
        raise NotImplementedError

    def files_hash(self, split: str | None = None) -> str:
        """The former name of `content_hash` (not every source is files)."""
        return self.content_hash(split)

    def column(self, split: str, name: str) -> list:
        """A column of a split as a list, read once (row lookups in a `Dataset` are slow next to a list's)."""
        if (split, name) not in self._columns:
            self._columns[split, name] = list(self.splits[split][name])
        return self._columns[split, name]

    def summary(self) -> str:
        sizes = ", ".join(f"{name}={len(split)}" for name, split in self.splits.items())
        text = f"{self.root}: {len(self.class_names)} classes {self.class_names}; {sizes}"
        if self.val_from_train:
            text += " (val held out from train)"
        if self.bad_images:
            text += f"; {len(self.bad_images)} unreadable images skipped"
        return text


@dataclass
class ImageFolderData(ImageData):
    """An ImageFolder dataset: its splits have the columns `image_path` and `label`; unreadable images are reported
    by path; a row's key is its path relative to the dataset folder (`train/awe/0001.jpg`)."""

    def content_hash(self, split: str | None = None) -> str:
        """Hash of the listed files (path, size, mtime; with `verify_content`, path and a hash of the bytes), their
        labels and the class names: changes when data does."""
        names = [split] if split else sorted(self.splits)
        entries = [self.class_names]
        for name in names:
            for path, label in zip(self.splits[name]["image_path"], self.splits[name]["label"]):
                identity = file_identity(path, self.verify_content)
                entries.append([name, os.path.relpath(path, self.root), label, *identity])
        return hash_json(entries)

    def image_path(self, split: str, index: int) -> str:
        return self.column(split, "image_path")[index]

    def image(self, split: str, index: int) -> Image.Image:
        with changed_during_run():
            return open_image_rgb(self.image_path(split, index))

    def image_bytes(self, split: str, index: int) -> bytes:
        path = self.image_path(split, index)
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise DataError(f"Could not read image {path!r}: {error.strerror} ({CHANGED_DURING_RUN})") from None

    def key(self, split: str, index: int) -> str:
        return Path(os.path.relpath(self.image_path(split, index), self.root)).as_posix()


CHANGED_DURING_RUN = "it was readable when the dataset was loaded: was it changed or removed during the run?"


@contextmanager
def changed_during_run():
    """Report an image that no longer decodes, though it did when the data was loaded, as a `DataError`."""
    try:
        yield
    except DataError:
        raise
    except ValueError as error:
        raise DataError(f"{error} ({CHANGED_DURING_RUN})") from None


def file_identity(path: str | os.PathLike, verify_content: bool = False) -> list:
    """What identifies a file for fingerprints: `[size, mtime]`, or `[hash of its bytes]` with `verify_content`
    (which also sees a same-size, same-time swap). A file that is gone is a `DataError` naming it."""
    try:
        if verify_content:
            return [file_digest(path)]
        stat = os.stat(path)
    except OSError as error:
        raise DataError(f"Could not read {str(path)!r}: {error.strerror} ({CHANGED_DURING_RUN})") from None
    return [stat.st_size, stat.st_mtime_ns]


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
            elif not (path.is_file() or path.is_symlink()):  # never opened: a named pipe would block forever
                logger.warning(f"Skipped {str(path)!r}: not a regular file (a named pipe, socket or device)")
                ignored.append(str(path))
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


def find_bad_images(items: list, check=check_image, num_threads: int | None = None) -> list[tuple[object, str]]:
    """`(item, reason)` of every item (an image path, by default) that `check(item)` finds undecodable, checked in
    threads (each image decoded once, none kept)."""
    from tqdm.auto import tqdm

    num_threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(num_threads) as pool:
        reasons = list(tqdm(pool.map(check, items), total=len(items), desc="Checking images", leave=False))
    return [(item, reason) for item, reason in zip(items, reasons) if reason is not None]


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
    known_bad_images: list | None = None,
    read_val: bool = True,
    verify_content: bool = False,
) -> ImageFolderData:
    """List an ImageFolder dataset (see the module docstring) into train / val (/ test) splits.

    Args:
        root: the dataset folder, holding `train/` and optionally `val/` and `test/`.
        val_fraction: share of train held out (stratified by class) as `val` when there is no `val/` folder.
        seed: seed of that split.
        class_names: the classes in label order; by default the sorted folder names. Must be the same set as the
            folders.
        check_images: decode every image once and leave out (and report) the unreadable ones.
        known_bad_images: `(path, reason)` of the unreadable images, when an earlier check of the same files found
            them (no image is decoded then).
        read_val: read a `val/` folder when there is one; False ignores it and holds out of train (the reference's
            split of some datasets, `--dataset-preset`).
        verify_content: identify the files by their bytes, not their size and modification time (`content_hash`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist")
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"Dataset folder {str(root)!r} has no train/ folder (found folders: {found})")

    listed, ignored = {}, []
    for split in SPLITS:
        if (root / split).is_dir() and (read_val or split != "val"):
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
    if known_bad_images is not None:
        bad_images = [tuple(item) for item in known_bad_images]
    else:
        bad_images = find_bad_images(all_paths) if check_images else []
    bad = {path for path, _ in bad_images}
    splits = DatasetDict({split: _split_dataset(images, class_names, bad) for split, images in listed.items()})
    splits, val_from_train = finish_splits(splits, class_names, val_fraction, seed, str(root), str(root / "train"))

    data = ImageFolderData(str(root), splits, class_names, bad_images, ignored, val_from_train, verify_content)
    log_data_report(data)
    return data


def finish_splits(
    splits: DatasetDict, class_names: list[str], val_fraction: float, seed: int, where: str, train_where: str
) -> tuple[DatasetDict, bool]:
    """Check that every split has every class, hold out a stratified `val_fraction` of train (seed `seed`) when there
    is no `val` split, and order the splits train, val, test. Returns them and whether val was held out."""
    for split, dataset in splits.items():
        missing = sorted(set(range(len(class_names))) - set(dataset["label"]))
        if missing:
            raise DataError(
                f"Split {split!r} of {where!r} has no readable image of class(es) {[class_names[i] for i in missing]}"
            )
    val_from_train = "val" not in splits
    if val_from_train:
        if not 0 < val_fraction < 1:
            raise DataError(f"{where!r} has no val split and val_fraction={val_fraction} is not in (0, 1)")
        held_out = _stratified_holdout(splits["train"], val_fraction, seed, class_names, train_where)
        splits["train"], splits["val"] = held_out["train"], held_out["test"]
    return DatasetDict({split: splits[split] for split in SPLITS if split in splits}), val_from_train


def log_data_report(data: ImageData, log=None):
    """Log the split sizes, every unreadable image with its reason, and the ignored paths."""
    log = log or logger
    log.info(data.summary())
    for path, reason in data.bad_images:
        log.warning(f"Skipped unreadable image {path!r}: {reason}")
    if data.ignored_files:
        log.warning(f"Ignored {len(data.ignored_files)} path(s) (not images, or links): {data.ignored_files[:10]}")


def dataset_hash(data_dir: str | os.PathLike, val_fraction: float, seed: int, verify_content: bool = False) -> str:
    """Hash of a dataset folder's files (path, size, mtime; with `verify_content` path and a hash of the bytes) and
    of how it is split; cheap unless `verify_content` (decodes nothing)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist")
    entries = []
    for split in SPLITS:
        for path in sorted((root / split).rglob("*")) if (root / split).is_dir() else []:
            if path.is_file():
                entries.append([str(path.relative_to(root)), *file_identity(path, verify_content)])
    return hash_json({"files": entries, "val_fraction": val_fraction, "seed": seed})


__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageData",
    "ImageFolderData",
    "changed_during_run",
    "check_image",
    "file_identity",
    "find_bad_images",
    "dataset_hash",
    "finish_splits",
    "load_imagefolder",
    "log_data_report",
    "open_image_rgb",
]
