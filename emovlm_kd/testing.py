"""Small generated datasets and images for tests and the quickstart (offline, seconds)."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from emovlm_kd.instruction_records import rewrite_records

# One base colour per class: the visual signal a model can learn.
CLASS_COLOURS = [(200, 40, 40), (40, 170, 40), (40, 60, 210), (200, 190, 40), (160, 40, 180), (40, 180, 180)]
# What the templated instruction data says about each colour: its name and what it suggests. The sentences are short,
# the same for every class around these words, and open with the colour, the one thing the image decides: a tiny VLM
# learns them in a few epochs. No emotion class names (stage 0 refuses texts that name the label).
COLOUR_EXPLANATIONS = [
    ("red", "intense energy"),
    ("green", "calm comfort"),
    ("blue", "quiet tension"),
    ("yellow", "collective action"),
    ("purple", "uncertain shapes"),
    ("cyan", "a quiet lake"),
]


def make_image(label: int, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """An image whose dominant colour is the class's (with noise, brightness jitter and a distractor square)."""
    width, height = size
    base = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.float64) * rng.uniform(0.7, 1.2)
    pixels = base + rng.normal(0, 25, size=(height, width, 3))
    side = int(min(width, height) * rng.uniform(0.2, 0.4))
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    pixels[top : top + side, left : left + side] = rng.uniform(0, 255, size=3)  # distractor of any colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def make_imagefolder(
    root: str | os.PathLike,
    class_names=("negative", "neutral", "positive"),
    per_class: dict[str, int] | int = 12,
    splits=("train", "test"),
    seed: int = 0,
    size: tuple[int, int] = (64, 64),
) -> Path:
    """Write an ImageFolder tree `root/<split>/<class>/<n>.png|jpg` with a class-dependent colour signal.

    `per_class` is an image count per class for every split, or `{split: count}`; half the images are JPEG.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        count = per_class[split] if isinstance(per_class, dict) else per_class
        for label, name in enumerate(class_names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                suffix = "png" if index % 2 else "jpg"
                make_image(label, rng, size).save(folder / f"{name}_{index:03d}.{suffix}")
    return root


def templated_explanation(label: int) -> dict[str, str]:
    """The observation and reasoning of the templated instruction data for class index `label` of a
    `make_imagefolder` dataset: they describe the class's colour, the signal its images carry."""
    colour, suggests = COLOUR_EXPLANATIONS[label % len(COLOUR_EXPLANATIONS)]
    return {
        "observation": f"{colour.capitalize()} colours fill the image, with one square.",
        "reasoning": f"{colour.capitalize()} colours suggest {suggests}.",
    }


def write_instruction_data(
    root: str | os.PathLike,
    path: str | os.PathLike,
    class_names=("negative", "neutral", "positive"),
    split: str = "train",
) -> Path:
    """Write stage 0's instruction-data file at `path` for the `split` images of a `make_imagefolder` dataset, from
    templates instead of an LLM (deterministic, offline): every image of class `class_names[i]` gets
    `templated_explanation(i)`. `class_names` must be in the order given to `make_imagefolder` (it fixes the colours).

    The records have stage 0's format (`emovlm_kd.instruction_records`), so stage 1 trains the observation and
    inference tasks on them.
    """
    root, path = Path(root), Path(path)
    records = {}
    for label, name in enumerate(class_names):
        folder = root / split / name
        if not folder.is_dir():
            raise ValueError(f"No class folder {str(folder)!r}: give the class names of the generated dataset")
        for image in sorted(folder.iterdir()):
            relative = image.relative_to(root).as_posix()
            records[relative] = {
                "image": relative,
                "label": name,
                "status": "done",
                **templated_explanation(label),
                "model": "template",
                "attempts": 0,
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    rewrite_records(path, records)
    return path


def add_bad_images(class_dir: str | os.PathLike) -> list[Path]:
    """Add three unreadable images to a class folder: a zero-byte file, a truncated JPEG, a text file named .jpg."""
    class_dir = Path(class_dir)
    empty = class_dir / "empty.jpg"
    empty.write_bytes(b"")
    truncated = class_dir / "truncated.jpg"
    make_image(0, np.random.default_rng(1), (64, 64)).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = class_dir / "notes.jpg"
    text.write_text("this is not an image\n")
    return [empty, truncated, text]


def imagefolder_to_dataset(root: str | os.PathLike):
    """An ImageFolder tree as a `datasets.DatasetDict` with an `image` (`Image`) and a `label` (`ClassLabel`) column:
    the files `emovlm_kd.data.load_imagefolder` lists, in its order, unreadable ones included. The rows hold the
    files' bytes (and their names), so what `save_to_disk` and `to_parquet` write is self-contained, as a Hub
    dataset is."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from emovlm_kd.data import SPLITS, _list_split

    root = Path(root)
    listed = {split: _list_split(root / split)[0] for split in SPLITS if (root / split).is_dir()}
    class_names = sorted(next(iter(listed.values())))
    features = Features({"image": Image(), "label": ClassLabel(names=class_names)})
    splits = {}
    for split, images in listed.items():
        rows = [(path, label) for label, name in enumerate(class_names) for path in images[name]]
        splits[split] = Dataset.from_dict(
            {
                "image": [{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path, _ in rows],
                "label": [label for _, label in rows],
            },
            features=features,
        )
    return DatasetDict(splits)


def save_dataset(dataset, output: str | os.PathLike, file_format: str) -> Path:
    """Write a `DatasetDict` as a `save_to_disk` folder (`disk`) or as one parquet file per split (`parquet`)."""
    output = Path(output)
    if file_format == "disk":
        dataset.save_to_disk(str(output))
    elif file_format == "parquet":
        output.mkdir(parents=True, exist_ok=True)
        for split, rows in dataset.items():
            rows.to_parquet(str(output / f"{split}.parquet"))
    else:
        raise ValueError(f"file_format must be 'disk' or 'parquet', got {file_format!r}")
    return output


def tiny_run_all_argv(
    data, run_dir, stages=("teacher", "distill", "gate", "evaluate", "export"), data_option="--data-dir", **overrides
):
    """`train/run_all.py` arguments for an offline run with the tiny VLM and teacher (the `quickstart` recipe) on
    `data` (an ImageFolder tree; any source with `data_option="--dataset"`).

    `overrides` are `{stage: {field: value}}` on top of the recipe, e.g. `distill={"epochs": 3}`.
    """
    argv = ["--config", "quickstart", data_option, str(data), "--run-dir", str(run_dir), "--stages", *stages]
    settings = [
        f"{stage}.{name}={json.dumps(value)}" for stage, values in overrides.items() for name, value in values.items()
    ]
    return argv + (["--set", *settings] if settings else [])


def accelerate_launch_command(
    script: str | os.PathLike, argv: list[str], num_processes: int = 2, config_file=None, launch_args=()
) -> tuple[list[str], dict]:
    """`(command, environment)` running `script argv` as `num_processes` CPU processes under `accelerate launch`,
    with `config_file` (e.g. one of `examples/accelerate/`) when given, and `launch_args` after it.

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x unless MPI is set up; several CPU
    processes come from the torch.distributed launcher with `ACCELERATE_USE_CPU=true` (what `--cpu` sets), i.e.
    `--multi_gpu` (or a MULTI_GPU config) on a machine without GPUs, and Accelerate then runs them as MULTI_CPU over
    gloo. Mixed precision is off (the configs' bf16 is for GPUs).
    """
    import sys

    repo_root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    if config_file is None:
        command += ["--multi_gpu", "--num_machines", "1"]
    else:
        command += ["--config_file", str(config_file)]
    command += ["--num_processes", str(num_processes), *launch_args]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--monitor_interval", "0.1", str(script), *argv]
    return command, env


def launch_processes(
    script: str | os.PathLike,
    argv: list[str],
    log: str | os.PathLike,
    num_processes: int = 2,
    config_file=None,
    timeout: float = 600,
):
    """Run `script argv` as `num_processes` CPU processes under `accelerate launch` (a subprocess; output to `log`;
    see `accelerate_launch_command`)."""
    import subprocess

    command, env = accelerate_launch_command(script, argv, num_processes, config_file)
    with open(log, "w") as output:
        result = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"accelerate launch failed ({result.returncode}):\n{Path(log).read_text()[-5000:]}")


def launch_two_processes(script: str | os.PathLike, argv: list[str], log: str | os.PathLike, timeout: float = 600):
    """Run `script argv` as two CPU processes under `accelerate launch` (see `launch_processes`)."""
    launch_processes(script, argv, log, 2, timeout=timeout)


def make_images() -> list[Image.Image]:
    """A few images of different sizes and modes."""
    return [
        Image.new("RGB", (100, 80), (200, 10, 10)),
        Image.linear_gradient("L").resize((300, 300)),
        Image.new("RGB", (30, 200), (0, 99, 1)),
    ]


EMOTIONS_8 = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]

__all__ = [
    "CLASS_COLOURS",
    "accelerate_launch_command",
    "COLOUR_EXPLANATIONS",
    "EMOTIONS_8",
    "add_bad_images",
    "imagefolder_to_dataset",
    "launch_processes",
    "launch_two_processes",
    "make_image",
    "make_imagefolder",
    "make_images",
    "save_dataset",
    "templated_explanation",
    "tiny_run_all_argv",
    "write_instruction_data",
]
