"""Batch prediction: classify a folder, a file list or any `datasets` source with an EmoVLM-KD model, at scale.

    python train/predict.py --model runs/fi/model --inputs photos/ --output-dir predictions/
    accelerate launch --num_processes 4 train/predict.py --model you/emovlm-kd-fi \\
        --inputs Woleek/EmoSet-118K --split test --output-dir emoset-test-predictions/

`--inputs` is a folder of images (searched recursively), a text file listing image paths (one per line, relative to
the file's folder), or any `datasets` source `--dataset` takes (a save_to_disk folder, parquet/arrow files, a Hub
dataset id; `--split`, `--image-column`). The rows are cut into shards of `--shard-size`; every process takes every
N-th unfinished shard, classifies it in batches (images decoded and processed in `--num-workers` DataLoader workers)
and writes it atomically as `<output_dir>/predictions-<shard>-of-<shards>.parquet`. An interrupted run resumes where
it stopped (finished shards are not recomputed), and N processes write the same rows as one. An input that cannot
be read is reported and gets a row with its `error` and no prediction; the run goes on.

The output loads with `datasets.load_dataset("parquet", data_files="OUTPUT_DIR/*.parquet", split="train")`, one row
per input in input order: `index`, `input` (the file path, or `<split>[<row>]`), `label` and `score` (the fused
prediction), `probabilities` (the fused probability of every class), `vlm_probabilities` (the VLM branch's) and
`head_probabilities` (the distilled head's), and `error`. `<output_dir>/predictions.json` records the model, the
inputs and the settings (a rerun with others is refused) and, when complete, the counts and images/s.

The output folder is handled like a run directory (`emovlm_kd.run_dir`): one run at a time (`<output_dir>/.lock`;
a second exits with status 2 naming the holder), every file written atomically under a unique temporary name, and a
read-only or full disk, an output path that is a file, or a corrupt `predictions.json` end the command with status 2
and a message naming the path. Every input gets a row: a broken symbolic link in an input folder is listed and
reported like an unreadable image.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch

from emovlm_kd.cache import model_identity
from emovlm_kd.data import IMAGE_EXTENSIONS, open_image_rgb
from emovlm_kd.processes import main_process_lock, progress
from emovlm_kd.run_dir import DataError, hash_json, read_json, temporary_path, write_atomic
from emovlm_kd.settings import CONTENT, NOTHING, RESULT, Affects
from emovlm_kd.sources import (
    SplitImages,
    dataset_kind,
    detect_source,
    local_roots,
    open_source,
    pick_image_column,
    split_identities,
)

logger = logging.getLogger(__name__)

MANIFEST = "predictions.json"
SHARD_NAME = "predictions-{shard:05d}-of-{shards:05d}.parquet"
BRANCH_COLUMNS = ("probabilities", "vlm_probabilities", "head_probabilities")


@dataclass
class PredictArguments:
    # Predictions are not a stage: RESULT fields are the settings recorded in the manifest (a rerun with others is
    # refused).
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "model": CONTENT,
        "inputs": CONTENT,
        "output_dir": NOTHING,
        "split": CONTENT,
        "image_column": CONTENT,
        "dataset_config": CONTENT,
        "dataset_revision": CONTENT,
        "batch_size": NOTHING,
        "shard_size": RESULT,
        "num_workers": NOTHING,
        "dtype": RESULT,
        "overwrite": NOTHING,
        "allow_local_paths": CONTENT,  # which path-only rows are read
    }

    model: str | None = field(default=None, metadata={"help": "Model folder or Hub repo id. Required."})
    inputs: str | None = field(
        default=None,
        metadata={
            "help": "A folder of images, a text file of image paths, or a datasets source (save_to_disk folder, "
            "parquet/arrow files, Hub dataset id). Required."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the parquet shards go. Required."})
    split: str | None = field(
        default=None, metadata={"help": "Split of a datasets source (default: test, else its only split)"}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of a datasets source (default: its one `Image` column)"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset"})
    dataset_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub dataset"})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass (per process)"})
    shard_size: int = field(default=512, metadata={"help": "Rows per output file: the unit of resuming"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding and processing images"})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the model in (auto, bfloat16, float32)"})
    allow_local_paths: bool = field(
        default=False,
        metadata={
            "help": "Let rows of a datasets source that hold only a file path read files outside the dataset's "
            "folder (and the Hugging Face caches); by default such rows get an error"
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start over when --output-dir holds predictions of other settings"}
    )

    def __post_init__(self):
        missing = [name for name in ("model", "inputs", "output_dir") if not getattr(self, name)]
        if missing:
            raise ValueError(f"Required: {', '.join('--' + name.replace('_', '-') for name in missing)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("--batch-size and --shard-size must be at least 1")


ARGUMENTS = PredictArguments


class PathImages:
    """Image files, decoded one at a time; a row's key is its path."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, row: int) -> str:
        return self.paths[row]

    def image(self, row: int):
        return open_image_rgb(self.paths[row])


def _file_stats(paths: list[str]) -> list:
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
            stats.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            stats.append([path, None, None])  # reported when read
    return stats


def open_inputs(args: PredictArguments) -> tuple[object, dict]:
    """The images to classify (`len`, `key(row)`, `image(row)`) and what identifies them (for resuming)."""
    inputs = Path(args.inputs)
    kind = dataset_kind(args.inputs)
    if kind is None and inputs.is_dir():
        # broken links too: they get a row that reports them
        files = sorted(p for p in inputs.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
        paths = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not paths:
            raise DataError(f"Folder {args.inputs!r} holds no image files")
        return PathImages(paths), {"folder": _file_stats(paths)}
    if kind is None and inputs.is_file():
        lines = [line.strip() for line in inputs.read_text().splitlines()]
        paths = [str(inputs.parent / line) for line in lines if line and not line.startswith("#")]
        if not paths:
            raise DataError(f"File list {args.inputs!r} names no image")
        return PathImages(paths), {"list": _file_stats(paths)}
    kind = kind or detect_source(args.inputs)
    source = open_source(kind, args.inputs, args.dataset_config, args.dataset_revision)
    split = args.split or ("test" if "test" in source else next(iter(source)) if len(source) == 1 else None)
    if split not in source:
        raise DataError(f"Dataset {args.inputs!r} has no split {split!r} (--split); its splits: {list(source)}")
    column = pick_image_column(source[split].features, args.image_column, args.inputs)
    identity = {"dataset": split_identities(kind, args.inputs, source)[split], "split": split, "column": column}
    roots = None if args.allow_local_paths else local_roots(kind, args.inputs)
    return SplitImages(source[split], column, split, roots), identity


class _Rows(torch.utils.data.Dataset):
    """`(row, image or None, error or None)`: an unreadable image is reported, not raised."""

    def __init__(self, images, rows: list[int]):
        self.images, self.rows = images, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, position):
        row = self.rows[position]
        try:
            return row, self.images.image(row), None
        except ValueError as error:
            return row, None, str(error)


class _ReadableImageInputs:
    """Process the readable images of a batch in the DataLoader worker."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, items):
        readable = [image for _, image, error in items if error is None]
        inputs = self.image_processor(readable, return_tensors="pt") if readable else None
        return [row for row, _, _ in items], [error for _, _, error in items], inputs


def _branch_probabilities(outputs) -> dict[str, torch.Tensor]:
    """Per branch, the probability of every class (the VLM branch's answer distribution; one-hot in generate mode)."""
    vlm = outputs.vlm_log_likelihoods
    return {
        "probabilities": outputs.logits.float().softmax(-1),
        "vlm_probabilities": vlm.float().softmax(-1) if vlm is not None else outputs.vlm_scores.float(),
        "head_probabilities": outputs.head_logits.float().softmax(-1),
    }


@torch.no_grad()
def predict_rows(model, image_processor, images, rows: list[int], args, class_names: list[str], bar=None) -> list:
    """One output row per input row: the fused label and score and every branch's class probabilities."""
    loader = torch.utils.data.DataLoader(
        _Rows(images, rows),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=_ReadableImageInputs(image_processor),
    )
    results = []
    for batch_rows, errors, inputs in loader:
        probabilities = {}
        if inputs is not None:
            outputs = model(**inputs.to(model.device))
            probabilities = {name: value.cpu() for name, value in _branch_probabilities(outputs).items()}
            if not all(value.isfinite().all() for value in probabilities.values()):
                raise DataError(
                    f"The model {args.model!r} gives NaN or infinite scores: its weights hold non-finite values "
                    "(a corrupt or diverged checkpoint)"
                )
        readable = 0
        for row, error in zip(batch_rows, errors):
            result = {"index": row, "input": images.key(row), "label": None, "score": None, "error": error}
            result.update(dict.fromkeys(BRANCH_COLUMNS))
            if error is None:
                fused = probabilities["probabilities"][readable]
                result["label"], result["score"] = class_names[int(fused.argmax())], float(fused.max())
                for name in BRANCH_COLUMNS:
                    result[name] = dict(zip(class_names, probabilities[name][readable].tolist()))
                readable += 1
            else:
                logger.warning(f"Skipped unreadable input {images.key(row)!r}: {error}")
            results.append(result)
        if bar is not None:
            bar.update(len(batch_rows))
    return results


def output_features(class_names: list[str]):
    from datasets import Features, Value

    per_class = {name: Value("float32") for name in class_names}
    return Features(
        {
            "index": Value("int64"),
            "input": Value("string"),
            "label": Value("string"),
            "score": Value("float32"),
            **{name: dict(per_class) for name in BRANCH_COLUMNS},
            "error": Value("string"),
        }
    )


def write_shard(rows: list[dict], path: Path, class_names: list[str]):
    """Write a shard atomically: a killed run leaves either the whole file or none."""
    from datasets import Dataset

    tmp = temporary_path(path)
    try:
        Dataset.from_list(rows, features=output_features(class_names)).to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_output(output: Path, manifest: dict, overwrite: bool):
    """Check that `output` holds predictions of the same settings (or none), else refuse or (`overwrite`) clear it;
    remove leftovers of a killed run; record the settings."""
    path = output / MANIFEST
    shards = list(output.glob("predictions-*.parquet"))
    if path.exists() or shards:
        recorded = read_json(path, "prediction record") or {}  # a corrupt one is reported and counts as other settings
        if recorded.get("settings") != manifest["settings"]:
            if not overwrite:
                changed = sorted(
                    key
                    for key in manifest["settings"]
                    if recorded.get("settings", {}).get(key) != manifest["settings"][key]
                )
                raise DataError(
                    f"{str(output)!r} holds predictions of other settings ({changed} changed): pass --overwrite to "
                    f"start over, or another --output-dir"
                )
            for shard in shards:
                shard.unlink()
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def check_output_dir(output: Path):
    if output.exists() and not output.is_dir():
        raise DataError(f"--output-dir {str(output)!r} is a file, not a folder: name a folder for the predictions")


def run(args: PredictArguments) -> dict:
    """Classify every input (the shards not written yet), on every process, holding the output folder's lock (on
    the main process); returns the summary."""
    output = Path(args.output_dir)
    check_output_dir(output)
    with main_process_lock(output):
        return _predict(args, output)


def _predict(args: PredictArguments, output: Path) -> dict:
    from accelerate import Accelerator
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    accelerator = Accelerator()
    with accelerator.main_process_first():  # one download or dataset preparation
        images, inputs_identity = open_inputs(args)
        model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=True, dtype=args.dtype)
        image_processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    model.to(accelerator.device).eval()
    class_names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    settings = {
        "model": model_identity(args.model),
        "inputs": hash_json(inputs_identity),
        "rows": len(images),
        "shard_size": args.shard_size,
        "dtype": args.dtype,
        "class_names": class_names,
    }
    manifest = {"model": args.model, "inputs": args.inputs, "settings": settings}
    if accelerator.is_main_process:
        prepare_output(output, manifest, args.overwrite)
    accelerator.wait_for_everyone()

    num_shards = math.ceil(len(images) / args.shard_size)
    paths = [output / SHARD_NAME.format(shard=shard, shards=num_shards) for shard in range(num_shards)]
    todo = [shard for shard in range(num_shards) if not paths[shard].exists()]
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    shard_rows = {
        shard: list(range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(images)))) for shard in mine
    }
    logger.info(
        f"{len(images)} inputs in {num_shards} shards: {num_shards - len(todo)} already written, {len(todo)} to "
        f"predict on {accelerator.num_processes} process(es)"
    )
    started = time.time()
    bar = progress(accelerator, total=sum(len(rows) for rows in shard_rows.values()), desc="Predicting", unit="img")
    errors = 0
    for shard, rows in shard_rows.items():
        results = predict_rows(model, image_processor, images, rows, args, class_names, bar)
        errors += sum(result["error"] is not None for result in results)
        write_shard(results, paths[shard], class_names)
    bar.close()
    computed = torch.tensor([sum(len(rows) for rows in shard_rows.values()), errors], device=accelerator.device)
    computed = accelerator.reduce(computed, reduction="sum").tolist()
    seconds = time.time() - started
    summary = {
        "output_dir": str(output),
        "rows": len(images),
        "shards": num_shards,
        "shards_written": len(todo),
        "shards_skipped": num_shards - len(todo),
        "predicted": computed[0],
        "unreadable": computed[1],
        "images_per_second": round(computed[0] / seconds, 2) if computed[0] else None,
        "processes": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(
            output / MANIFEST, json.dumps({**manifest, "complete": True, "summary": summary}, indent=2) + "\n"
        )
    return summary


def main(argv=None) -> dict:
    """The `emovlm-kd-predict` command (`train/predict.py`): parse, run, print the summary as JSON."""
    from transformers import HfArgumentParser

    from emovlm_kd.console import exit_with_error, run_dir_command, setup_logging
    from emovlm_kd.processes import end_processes, print_once

    setup_logging()
    parser = HfArgumentParser(PredictArguments, description=__doc__.split("\n\n")[0])
    try:
        (args,) = parser.parse_args_into_dataclasses(argv)
        check_output_dir(Path(args.output_dir))
    except ValueError as error:  # DataError included
        exit_with_error(error)
    try:
        with run_dir_command(args.output_dir):  # the lock; user errors and failed writes reported by path
            summary = run(args)
    finally:
        end_processes()
    print_once(json.dumps(summary, indent=2))
    return summary


__all__ = ["ARGUMENTS", "PathImages", "PredictArguments", "main", "open_inputs", "predict_rows", "run"]
