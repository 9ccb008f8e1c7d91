"""Every stage's data from any source: an ImageFolder tree, or anything the `datasets` library loads.

    --data-dir DIR               an ImageFolder tree (`emovlm_kd.data`), as before
    --dataset NAME_OR_PATH       any of
        an ImageFolder tree      DIR/train/<class>/<image> (the same as --data-dir)
        a save_to_disk folder    a `DatasetDict` (its splits) or a `Dataset` (the train split)
        parquet or arrow files   a folder of them (split names from the file names, as in Hub repos:
                                 data/train-00000-of-00002.parquet, test.parquet, ...), or a file or glob (train)
        a Hub dataset id         `user/name`, with --dataset-config and --dataset-revision

A `datasets` source has an image column (`--image-column`; default: its one `Image` feature; a column of file paths
works too) and a label column (`--label-column`; default: its one `ClassLabel`, whose names are the classes in
order; a string or integer column gets its sorted unique values). Splits: `--train-split` (train), `--val-split`
(validation, else val; without one, a stratified `--val-fraction` of train is held out with `--seed`, as for
folders) and `--test-split` (test, when there is one).

Images stay encoded in the dataset (its image column is read with `decode=False`) and are decoded one row at a time,
when a stage asks for that row (`SourceData.image`). Loading decodes each image once to find the undecodable ones,
which are reported as `(<split>[<row>], reason)` and left out, like the unreadable files of a folder; `<split>[<row>]`
(the row of the image in its source split) is also the row's key. What identifies the data for the stage
fingerprints and the feature cache is the `datasets` fingerprint of each split for save_to_disk folders and Hub
datasets (a Hub dataset's follows its resolved revision), and the names, sizes and modification times of the files
for parquet/arrow files and ImageFolder trees (`--verify-content`: a hash of their bytes): never an absolute path.

Rows that name a local file instead of holding the image's bytes (an `Image` feature stored by path, or a column of
paths) are read only when the file lies inside the dataset's own folder (the save_to_disk folder, the folder of the
parquet/arrow files) or the Hugging Face caches, after resolving links; any other path is reported as an unreadable
row and left out, unless `--allow-local-paths` is given. A dataset file can then never make a run read, log or
export a file of the machine it runs on.
"""

import glob
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from PIL import Image

from emovlm_kd.arguments import PRESET_SPLIT_SEED
from emovlm_kd.data import (
    ImageData,
    changed_during_run,
    check_image,
    dataset_hash,
    file_identity,
    find_bad_images,
    finish_splits,
    load_imagefolder,
    log_data_report,
    open_image_rgb,
)
from emovlm_kd.run_dir import DataError, hash_json, read_json, write_atomic
from image_decoding_emovlm_kd import check_image_header, open_image, to_rgb

logger = logging.getLogger(__name__)

FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
HUB_DATASET_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
VAL_SPLITS = ("validation", "val")
# Formats a browser (and a chat endpoint) reads as they are: (MIME type, file extension).
WEB_IMAGE_FORMATS = {
    "JPEG": ("image/jpeg", ".jpg"),
    "PNG": ("image/png", ".png"),
    "WEBP": ("image/webp", ".webp"),
    "GIF": ("image/gif", ".gif"),
}


def web_image(data: bytes, name: str, max_side: int | None = 1024) -> tuple[bytes, str]:
    """`(encoded image, format)` for a browser or a chat endpoint: `data` itself when its format is web-safe (see
    `WEB_IMAGE_FORMATS`) and no side exceeds `max_side`, else a JPEG of the RGB image resized to fit. Undecodable
    data raises a `ValueError` naming `name`."""
    image_format, _ = check_image_header(data, name)  # raster formats only, size checked before decoding
    image = open_image(data, name)  # all of it: a broken image fails here, not at the server or on the Hub page
    if image_format in WEB_IMAGE_FORMATS and (max_side is None or max(image.size) <= max_side):
        return data, image_format
    image = to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), "JPEG"


def hugging_face_caches() -> list[Path]:
    """The folders `datasets` and `huggingface_hub` download files to (rows of a Hub dataset may point there)."""
    import datasets
    from huggingface_hub import constants

    return [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]


def local_roots(kind: str, location: str) -> list[Path]:
    """Where the path-only rows of a source may point: its own folder, and the Hugging Face caches."""
    roots = hugging_face_caches()
    if kind == "disk":
        roots.append(Path(location))
    elif kind == "files":
        roots.append(Path(os.path.commonpath([str(p.resolve().parent) for p in source_files(location)])))
    return [root.resolve() for root in roots]


class SplitImages:
    """The images of one split of a `datasets` source, kept encoded and decoded one row at a time. A row holding
    only a path is read when the path resolves inside one of `allowed_roots` (None: anywhere)."""

    def __init__(self, dataset: Dataset, column: str, split: str, allowed_roots: list[Path] | None = None):
        from datasets import Image as ImageFeature

        self.split, self.column, self.allowed_roots = split, column, allowed_roots
        self.dataset = dataset.select_columns([column]).cast_column(column, ImageFeature(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, row: int) -> str:
        return f"{self.split}[{row}]"

    def _stored(self, row: int) -> tuple[bytes | None, str | None, str]:
        """The row's encoded bytes and file path (either may be None), and its name for messages."""
        value = self.dataset[row][self.column] or {}
        path = value.get("path")
        return value.get("bytes"), path, self.key(row) + (f" ({path})" if path else "")

    def _local_file(self, path: str, name: str) -> str:
        """`path` when a path-only row may read it (see the module docstring), else a `ValueError` naming the row."""
        if self.allowed_roots is None:
            return path
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.allowed_roots):
            raise ValueError(
                f"Image {name} is a path outside the dataset's folder and the Hugging Face caches, so it is not read: "
                "pass --allow-local-paths to read local files that dataset rows name"
            )
        return path

    def image_bytes(self, row: int) -> bytes:
        data, path, name = self._stored(row)
        if data is None and path:
            path = self._local_file(path, name)
            try:
                return Path(path).read_bytes()
            except OSError as error:
                raise ValueError(f"Could not read image {name}: {type(error).__name__}: {error}") from None
        if data is None:
            raise ValueError(f"Could not read image {name}: the row has no image")
        return data

    def image(self, row: int) -> Image.Image:
        """The row's image as 8-bit RGB; failures are `ValueError`s naming the row."""
        data, path, name = self._stored(row)
        if data is None and path:  # a column of file paths: read like the files of a folder
            return open_image_rgb(self._local_file(path, name))
        if data is None:
            raise ValueError(f"Could not read image {name}: the row has no image")
        return to_rgb(open_image(data, name))

    def check(self, row: int) -> str | None:
        """None when the row's image decodes, else the reason it does not."""
        data, path, name = self._stored(row)
        if data is None and path:
            try:
                return check_image(self._local_file(path, name))
            except ValueError as error:
                return str(error)
        if data is None:
            return "the row has no image"
        return check_image(data, name)

    def undecodable(self, num_threads: int | None = None) -> list[tuple[int, str]]:
        """`(row, reason)` of every row whose image does not decode (each decoded once, none kept)."""
        return find_bad_images(list(range(len(self))), self.check, num_threads)


@dataclass
class SourceData(ImageData):
    """A `datasets` source: its splits have the columns `row` (the row of the image in its source split) and `label`;
    `images` are the images of each split's source split, `identity` what each source split's content is."""

    images: dict[str, SplitImages] = field(default_factory=dict)
    identity: dict[str, object] = field(default_factory=dict)
    columns: tuple[str, str] = ("image", "label")

    def _source(self, split: str, index: int) -> tuple[SplitImages, int]:
        return self.images[split], self.column(split, "row")[index]

    def image(self, split: str, index: int) -> Image.Image:
        images, row = self._source(split, index)
        with changed_during_run():
            return images.image(row)

    def image_bytes(self, split: str, index: int) -> bytes:
        images, row = self._source(split, index)
        with changed_during_run():
            return images.image_bytes(row)

    def key(self, split: str, index: int) -> str:
        images, row = self._source(split, index)
        return images.key(row)

    def content_hash(self, split: str | None = None) -> str:
        """Hash of the source splits' identities, the rows and labels of the split(s), the columns and classes."""
        names = [split] if split else sorted(self.splits)
        entries = [self.class_names, list(self.columns)]
        for name in names:
            source = self.images[name].split
            rows, labels = self.column(name, "row"), self.column(name, "label")
            entries.append([name, source, self.identity[source], rows, labels])
        return hash_json(entries)


def has_source(run_args) -> bool:
    return bool(run_args.data_dir or run_args.dataset)


def dataset_kind(name: str) -> str | None:
    """`disk` for a folder written by save_to_disk, `files` for parquet/arrow files (a file, a glob, a folder holding
    some), else None."""
    path = Path(name)
    if glob.has_magic(name) or (path.is_file() and path.suffix in FILE_FORMATS):
        return "files"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk"
        if any(p.suffix in FILE_FORMATS and p.is_file() for p in path.rglob("*")):
            return "files"
    return None


def detect_source(name: str) -> str:
    """What `--dataset NAME` is: `imagefolder`, `disk` (save_to_disk), `files` (parquet/arrow) or `hub`."""
    kind = dataset_kind(name)
    if kind is not None:
        return kind
    path = Path(name)
    if path.is_file():
        raise DataError(f"Dataset file {name!r} is not a parquet or arrow file ({sorted(FILE_FORMATS)})")
    if path.is_dir():
        if (path / "train").is_dir():
            return "imagefolder"
        raise DataError(
            f"Dataset folder {name!r} is none of: an ImageFolder tree (train/<class>/<image>), a folder written by "
            f"save_to_disk, a folder of parquet or arrow files"
        )
    if HUB_DATASET_ID.fullmatch(name):
        return "hub"
    raise DataError(f"Dataset {name!r} is no file, folder or glob that exists, and no Hub dataset id")


def source_of(run_args) -> tuple[str, str]:
    """`(kind, location)` of the run's data: `--data-dir` is an ImageFolder tree; `--dataset` is detected."""
    if run_args.data_dir:
        return "imagefolder", run_args.data_dir
    if not run_args.dataset:
        raise DataError("No dataset: pass --data-dir or --dataset")
    return detect_source(run_args.dataset), run_args.dataset


def source_name(run_args) -> str | None:
    """What the run's data is called (a model card's `datasets` entry): a Hub id, else the folder's name."""
    if not has_source(run_args):
        return None
    kind, location = source_of(run_args)
    if kind == "hub":
        return location
    path = Path(location).parent if glob.has_magic(location) or Path(location).is_file() else Path(location)
    return path.resolve().name


def source_files(location: str) -> list[Path]:
    """The parquet or arrow files of a file, a glob or a folder (all of one format)."""
    if glob.has_magic(location):
        files = sorted(Path(p) for p in glob.glob(location, recursive=True) if Path(p).is_file())
    elif Path(location).is_dir():
        files = sorted(p for p in Path(location).rglob("*") if p.suffix in FILE_FORMATS and p.is_file())
    else:
        files = [Path(location)]
    formats = {FILE_FORMATS.get(p.suffix) for p in files}
    if not files or None in formats or len(formats) > 1:
        raise DataError(
            f"Dataset {location!r} must name parquet or arrow files, all of one format; found "
            f"{[str(path) for path in files]}"
        )
    return files


def _files_identity(location: str, verify_content: bool = False) -> list:
    files = source_files(location)
    base = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    return [[p.resolve().relative_to(base).as_posix(), *file_identity(p, verify_content)] for p in files]


def open_source(kind: str, location: str, config: str | None = None, revision: str | None = None) -> DatasetDict:
    """The splits of a `datasets` source (memory-mapped by `datasets`; nothing decoded)."""
    import datasets

    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(location)
        elif kind == "files":
            files = source_files(location)
            file_format = FILE_FORMATS[files[0].suffix]
            if Path(location).is_dir():
                loaded = datasets.load_dataset(file_format, data_dir=location)
            else:
                loaded = datasets.load_dataset(file_format, data_files={"train": [str(p) for p in files]})
        else:
            loaded = datasets.load_dataset(location, config, revision=revision)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(f"Could not load dataset {location!r}: {type(error).__name__}: {error}") from error
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)


def split_identities(kind: str, location: str, source: DatasetDict, verify_content: bool = False) -> dict[str, object]:
    """What each split's content is: its `datasets` fingerprint, or (parquet/arrow files) the files' stats (with
    `verify_content`, hashes of their bytes)."""
    if kind == "files":
        files = _files_identity(location, verify_content)
        return {split: files for split in source}
    return {split: dataset_fingerprint(dataset) for split, dataset in source.items()}


def dataset_fingerprint(dataset) -> str:
    """`datasets`' own hash of a split's content and transforms. It is the private `Dataset._fingerprint` (datasets
    has no public accessor); this is its only use, and tests/test_dependencies.py fails loudly if it changes."""
    return dataset._fingerprint


def preset_holds_out(run_args) -> bool:
    """Whether `--dataset-preset` names a dataset the reference validates on a held-out part of train (EmoSet,
    Emotion6, Abstract, ArtPhoto: a stratified 10 %, `random_state=42`, `data_utils.py:109-122`); the reference reads
    no `val/` for those, so neither does this package."""
    preset = getattr(run_args, "preset", None)
    return preset is not None and not preset.val_folder


def split_seed(run_args) -> int:
    """Seed of the held-out val split: the reference's 42 under a preset that holds out (whatever `--seed` says, which
    still seeds initialisation and shuffling), else `--seed`."""
    return PRESET_SPLIT_SEED if preset_holds_out(run_args) else run_args.seed


def warn_ignored_val(run_args, where: str):
    logger.warning(
        f"--dataset-preset {run_args.dataset_preset}: the val split of {where!r} is ignored; as in the reference, "
        f"val is a stratified {run_args.val_fraction:.0%} of train (seed {PRESET_SPLIT_SEED})"
    )


def source_hash(run_args) -> str:
    """A hash of what the run's data is and how it is split, cheaply (nothing decoded): the `data` entry of every
    stage's fingerprint. An ImageFolder tree's is the same as before `--dataset` existed."""
    kind, location = source_of(run_args)
    if kind == "imagefolder":
        _check_imagefolder_options(run_args, location)
        return dataset_hash(location, run_args.val_fraction, split_seed(run_args), run_args.verify_content)
    if kind == "files":
        identity = _files_identity(location, run_args.verify_content)
    else:
        source = open_source(kind, location, run_args.dataset_config, run_args.dataset_revision)
        identity = split_identities(kind, location, source)
    options = [run_args.dataset_config, run_args.dataset_revision, run_args.image_column, run_args.label_column]
    if run_args.allow_local_paths:  # only then: the fingerprints of runs without it stay what they were
        options.append("allow_local_paths")
    splits = [run_args.train_split, run_args.val_split, run_args.test_split]
    return hash_json(
        {
            "kind": kind,
            "source": identity,
            "options": options,
            "splits": splits,
            "val_fraction": run_args.val_fraction,
            "seed": split_seed(run_args),
        }
    )


def _check_imagefolder_options(run_args, location: str):
    given = {
        "--image-column": run_args.image_column,
        "--label-column": run_args.label_column,
        "--dataset-config": run_args.dataset_config,
        "--dataset-revision": run_args.dataset_revision,
        "--val-split": run_args.val_split,
        "--test-split": run_args.test_split,
        "--train-split": None if run_args.train_split == "train" else run_args.train_split,
    }
    given = [option for option, value in given.items() if value is not None]
    if given:
        raise DataError(
            f"{location!r} is an ImageFolder tree: its splits are the folders train/, val/ and test/ and its labels "
            f"the class folders, so {given} do not apply (they are for `datasets` sources)"
        )


# In a run directory: the unreadable images of the run's data, found once per run (by the first stage's main
# process; the other processes of a launch load the data after it) under the data's `source_hash`.
IMAGE_CHECK_FILE = "image_check.json"


def _image_check_record(run_args) -> tuple[Path | None, str | None, object]:
    """Where the run's image check is kept, the data's hash, and what an earlier check recorded (None if none). Only
    in an existing run directory (a stage creates it before loading the data)."""
    if not run_args.run_dir or not Path(run_args.run_dir).is_dir():
        return None, None, None
    path, data_hash = Path(run_args.run_dir) / IMAGE_CHECK_FILE, source_hash(run_args)
    record = read_json(path, "image check") or {}
    return path, data_hash, record.get("bad_images") if record.get("source_hash") == data_hash else None


def load_source(run_args, class_names: list[str] | None = None, check_images: bool = True) -> ImageData:
    """The run's dataset (`--data-dir` or `--dataset`), split into train / val (/ test), with the class names in
    label order (`class_names` when given: the same classes, in the run's order) and the undecodable images left
    out and reported. Images are decoded to check them once per run directory (`IMAGE_CHECK_FILE`)."""
    kind, location = source_of(run_args)
    record_path, data_hash, known = _image_check_record(run_args) if check_images else (None, None, None)
    if kind == "imagefolder":
        _check_imagefolder_options(run_args, location)
        if preset_holds_out(run_args) and (Path(location) / "val").is_dir():
            warn_ignored_val(run_args, str(Path(location) / "val"))
        data = load_imagefolder(
            location,
            val_fraction=run_args.val_fraction,
            seed=split_seed(run_args),
            class_names=class_names,
            check_images=check_images,
            known_bad_images=known,
            read_val=not preset_holds_out(run_args),
            verify_content=run_args.verify_content,
        )
        found = [list(item) for item in data.bad_images]
    else:
        data, found = _load_datasets_source(run_args, kind, location, class_names, check_images, known)
    if record_path is not None and known is None:
        write_atomic(record_path, json.dumps({"source_hash": data_hash, "bad_images": found}) + "\n")
    return data


def _load_datasets_source(run_args, kind, location, class_names, check_images, known) -> tuple[ImageData, dict]:
    """`load_source` of a `datasets` source; also the unreadable rows by split (`known`: those of an earlier check)."""
    source = open_source(kind, location, run_args.dataset_config, run_args.dataset_revision)
    where = location if run_args.dataset_config is None else f"{location} ({run_args.dataset_config})"
    chosen = pick_splits(list(source), run_args, where)
    image_column, label_column = pick_columns(source, chosen, run_args, where)
    raw_labels = {split: list(source[name][label_column]) for split, name in chosen.items()}
    label_feature = source[chosen["train"]].features[label_column]
    for name in chosen.values():
        if source[name].features[label_column] != label_feature:
            raise DataError(
                f"Column {label_column!r} of {where!r} differs between splits {chosen['train']!r} ({label_feature}) "
                f"and {name!r} ({source[name].features[label_column]})"
            )
    names, to_name = label_names(label_feature, raw_labels, label_column, where)
    if class_names is None:
        class_names = names
    elif sorted(class_names) != sorted(names):
        raise DataError(f"Given class names {list(class_names)} differ from the classes of {where!r}: {names}")
    class_names = list(class_names)

    roots = None if run_args.allow_local_paths else local_roots(kind, location)
    images = {split: SplitImages(source[name], image_column, name, roots) for split, name in chosen.items()}
    if known is not None:
        bad = {split: {int(row): reason for row, reason in known.get(split, {}).items()} for split in images}
    else:
        bad = {split: dict(split_images.undecodable() if check_images else []) for split, split_images in images.items()}
    features = Features({"row": Value("int64"), "label": ClassLabel(names=class_names)})
    label_ids = {name: index for index, name in enumerate(class_names)}
    splits = DatasetDict()
    for split, labels in raw_labels.items():
        rows = [row for row in range(len(labels)) if row not in bad[split]]
        splits[split] = Dataset.from_dict(
            {"row": rows, "label": [label_ids[to_name(labels[row])] for row in rows]}, features=features
        )
    splits, val_from_train = finish_splits(
        splits, class_names, run_args.val_fraction, split_seed(run_args), where, f"{where}: {chosen['train']}"
    )
    if val_from_train:
        images["val"] = images["train"]
    bad_images = [(images[split].key(row), reason) for split in chosen for row, reason in bad[split].items()]
    data = SourceData(
        where,
        splits,
        class_names,
        bad_images,
        val_from_train=val_from_train,
        images=images,
        identity=split_identities(kind, location, source, run_args.verify_content),
        columns=(image_column, label_column),
        verify_content=run_args.verify_content,
    )
    log_data_report(data)
    return data, bad


def pick_splits(available: list[str], run_args, where: str) -> dict[str, str]:
    """`{run split: source split}`: train, val (when the source has one) and test (when it has one)."""

    def named(split: str, option: str) -> str:
        if split not in available:
            raise DataError(f"Dataset {where!r} has no split {split!r} ({option}); its splits: {available}")
        return split

    chosen = {"train": named(run_args.train_split, "--train-split")}
    if preset_holds_out(run_args):
        if run_args.val_split:
            raise DataError(
                f"--dataset-preset {run_args.dataset_preset} holds out val from train as the reference does; drop "
                f"--val-split {run_args.val_split} or the preset"
            )
        if any(split in available for split in VAL_SPLITS):
            warn_ignored_val(run_args, f"{where}: {next(s for s in VAL_SPLITS if s in available)}")
    elif run_args.val_split:
        chosen["val"] = named(run_args.val_split, "--val-split")
    elif any(split in available for split in VAL_SPLITS):
        chosen["val"] = next(split for split in VAL_SPLITS if split in available)
    if run_args.test_split:
        chosen["test"] = named(run_args.test_split, "--test-split")
    elif "test" in available:
        chosen["test"] = "test"
    if len(set(chosen.values())) < len(chosen):
        raise DataError(f"Dataset {where!r}: the same split is used twice: {chosen}")
    return chosen


def pick_column(features, name: str | None, option: str, kind, described: str, where: str) -> str:
    """The column `name` (a clear error when missing), else the one feature of type `kind`."""
    columns = list(features)
    if name is None:
        found = [column for column, feature in features.items() if isinstance(feature, kind)]
        if len(found) != 1:
            raise DataError(
                f"Dataset {where!r} has {len(found)} {described} columns {found}: name the one to use with {option} "
                f"(columns: {columns})"
            )
        return found[0]
    if name not in features:
        raise DataError(f"Dataset {where!r} has no column {name!r} ({option}); its columns: {columns}")
    return name


def pick_image_column(features, name: str | None, where: str) -> str:
    """The image column: the one named (`Image` feature, or file paths), else the one `Image` feature."""
    from datasets import Image as ImageFeature

    column = pick_column(features, name, "--image-column", ImageFeature, "`Image`", where)
    paths = isinstance(features[column], Value) and features[column].dtype in ("string", "large_string")
    if not (paths or isinstance(features[column], ImageFeature)):
        raise DataError(f"Column {column!r} of {where!r} holds {features[column]}, not images or paths")
    return column


def pick_columns(source: DatasetDict, chosen: dict[str, str], run_args, where: str) -> tuple[str, str]:
    """The image and label columns: the ones named, else the one `Image` and the one `ClassLabel` feature."""
    features = source[chosen["train"]].features
    image_column = pick_image_column(features, run_args.image_column, where)
    label_column = pick_column(features, run_args.label_column, "--label-column", ClassLabel, "`ClassLabel`", where)
    for name in chosen.values():
        missing = [column for column in (image_column, label_column) if column not in source[name].features]
        if missing:
            raise DataError(
                f"Split {name!r} of {where!r} has no column(s) {missing}; its columns: {list(source[name].features)}"
            )
    return image_column, label_column


def label_names(feature, raw_labels: dict[str, list], column: str, where: str):
    """The classes of a label column in label order, and how a raw value maps to its class name: a `ClassLabel`'s
    names; the sorted unique values of a string or integer column."""
    missing = {split: labels.index(None) for split, labels in raw_labels.items() if None in labels}
    if isinstance(feature, ClassLabel):
        missing.update({split: labels.index(-1) for split, labels in raw_labels.items() if -1 in labels})
    if missing:
        raise DataError(
            f"Column {column!r} of {where!r} has rows without a label (first in each split: {missing}); choose "
            f"labelled splits with --train-split / --val-split / --test-split"
        )
    if isinstance(feature, ClassLabel):
        for split, labels in raw_labels.items():
            row = next((row for row, value in enumerate(labels) if not 0 <= value < feature.num_classes), None)
            if row is not None:
                raise DataError(
                    f"Column {column!r} of {where!r}: split {split!r}, row {row} holds the label {labels[row]}, which "
                    f"is not one of its ClassLabel's {feature.num_classes} classes (0 to {feature.num_classes - 1}: "
                    f"{feature.names})"
                )
        return list(feature.names), lambda value: feature.names[value]
    if not isinstance(feature, Value) or not (feature.dtype in ("string", "large_string") or "int" in feature.dtype):
        raise DataError(
            f"Column {column!r} of {where!r} holds {feature}: labels must be a ClassLabel, strings or integers"
        )
    values = sorted({value for labels in raw_labels.values() for value in labels})
    return [str(value) for value in values], str


__all__ = [
    "SourceData",
    "SplitImages",
    "WEB_IMAGE_FORMATS",
    "dataset_fingerprint",
    "dataset_kind",
    "detect_source",
    "has_source",
    "hugging_face_caches",
    "local_roots",
    "label_names",
    "load_source",
    "open_source",
    "pick_column",
    "pick_columns",
    "pick_image_column",
    "pick_splits",
    "source_files",
    "source_hash",
    "source_name",
    "source_of",
    "split_identities",
    "web_image",
]
