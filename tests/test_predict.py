"""Batch prediction: every input once, in order, with every branch's probabilities; resumable; N processes = 1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset

from emovlm_kd.predict import PredictArguments, run
from emovlm_kd.run_dir import DataError
from emovlm_kd.testing import (
    add_bad_images,
    imagefolder_to_dataset,
    launch_two_processes,
    make_imagefolder,
    save_dataset,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["negative", "neutral", "positive"]


def predict_args(model, inputs, output_dir, **overrides) -> PredictArguments:
    settings = {"batch_size": 3, "shard_size": 4, "num_workers": 0, **overrides}
    return PredictArguments(model=str(model), inputs=str(inputs), output_dir=str(output_dir), **settings)


def read_rows(output_dir) -> list[dict]:
    return list(load_dataset("parquet", data_files=f"{output_dir}/*.parquet", split="train"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """9 readable test images and 3 unreadable ones (an empty file, a truncated JPEG, a text file named .jpg)."""
    root = make_imagefolder(tmp_path_factory.mktemp("predict") / "data", CLASSES, {"test": 3}, splits=("test",))
    add_bad_images(root / "test" / "neutral")
    return root


def test_predictions_of_a_folder(tiny_folder, images, tmp_path):
    from transformers import pipeline

    output = tmp_path / "out"
    summary = run(predict_args(tiny_folder, images, output))
    assert (summary["rows"], summary["shards"], summary["predicted"], summary["unreadable"]) == (12, 3, 12, 3)
    assert summary["images_per_second"] > 0
    rows = read_rows(output)
    paths = sorted(str(p) for p in images.rglob("*.*"))
    assert [row["index"] for row in rows] == list(range(12)) and [row["input"] for row in rows] == paths
    bad = {row["input"]: row for row in rows if row["error"] is not None}
    assert {Path(path).name for path in bad} == {"empty.jpg", "truncated.jpg", "notes.jpg"}
    assert all(row["label"] is None and row["probabilities"] is None for row in bad.values())
    readable = [row for row in rows if row["error"] is None]
    classifier = pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True)
    expected = classifier([row["input"] for row in readable], top_k=1, batch_size=len(readable))
    for row, [top] in zip(readable, expected, strict=True):
        for column in ("probabilities", "vlm_probabilities", "head_probabilities"):
            assert list(row[column]) == CLASSES and sum(row[column].values()) == pytest.approx(1, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["label"] == top["label"] and row["score"] == pytest.approx(top["score"], abs=1e-5)
    manifest = json.loads((output / "predictions.json").read_text())
    assert manifest["complete"] and manifest["settings"]["class_names"] == CLASSES

    # resume: a missing shard is predicted again, the others are not touched
    shards = sorted(output.glob("predictions-*.parquet"))
    written = {path.name: path.stat().st_mtime_ns for path in shards}
    shards[1].unlink()
    again = run(predict_args(tiny_folder, images, output))
    assert (again["shards_written"], again["shards_skipped"], again["predicted"]) == (1, 2, 4)
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == {
        name: mtime for name, mtime in written.items() if name != shards[1].name
    }
    assert read_rows(output) == rows

    # other settings are refused unless told to start over
    with pytest.raises(DataError, match=r"other settings \(\['shard_size'\] changed\).*--overwrite"):
        run(predict_args(tiny_folder, images, output, shard_size=5))
    assert run(predict_args(tiny_folder, images, output, shard_size=5, overwrite=True))["shards"] == 3
    assert len(list(output.glob("predictions-*.parquet"))) == 3
    assert_same_rows(read_rows(output), rows)  # other batches: the same predictions up to float noise


def assert_same_rows(rows: list[dict], expected: list[dict]):
    assert [(row["index"], row["input"], row["label"], row["error"]) for row in rows] == [
        (row["index"], row["input"], row["label"], row["error"]) for row in expected
    ]
    for row, reference in zip(rows, expected):
        for column in ("probabilities", "vlm_probabilities", "head_probabilities"):
            if reference[column] is not None:
                assert row[column] == pytest.approx(reference[column], abs=1e-5), (row["input"], column)


def test_datasets_sources_and_file_lists_give_the_same_predictions(tiny_folder, images, tmp_path):
    folder_rows = {
        row["input"]: row for row in read_rows_after(run(predict_args(tiny_folder, images, tmp_path / "a")))
    }
    parquet = save_dataset(imagefolder_to_dataset(images), tmp_path / "parquet", "parquet")
    rows = read_rows_after(run(predict_args(tiny_folder, parquet, tmp_path / "b", split="test")))
    assert [row["input"] for row in rows] == [f"test[{index}]" for index in range(12)]
    by_name = dict(zip(sorted(str(p) for p in images.rglob("*.*")), rows))
    for path, row in by_name.items():
        expected = folder_rows[path]
        assert (row["label"], row["error"] is None) == (expected["label"], expected["error"] is None), path
        if row["error"] is None:
            assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    listed = tmp_path / "list" / "inputs.txt"
    listed.parent.mkdir()
    listed.write_text(
        "# two images\n" + "\n".join(os.path.relpath(path, listed.parent) for path in list(folder_rows)[:2])
    )
    rows = read_rows_after(run(predict_args(tiny_folder, listed, tmp_path / "c")))
    assert [row["label"] for row in rows] == [row["label"] for row in list(folder_rows.values())[:2]]


def read_rows_after(summary: dict) -> list[dict]:
    return read_rows(summary["output_dir"])


def test_bad_arguments_are_clear_errors(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="Required: --inputs, --output-dir"):
        PredictArguments(model="m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        run(predict_args(tiny_folder, tmp_path / "empty", tmp_path / "out"))


def predict_command(model, inputs, output, *extra) -> list[str]:
    return [
        "--model",
        str(model),
        "--inputs",
        str(inputs),
        "--output-dir",
        str(output),
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        *extra,
    ]


@pytest.mark.slow
def test_two_processes_and_an_interrupted_run_write_the_rows_of_one(tiny_folder, tmp_path):
    data = make_imagefolder(tmp_path / "data", CLASSES, {"test": 16}, splits=("test",))
    script = REPO_ROOT / "train" / "predict.py"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    result = subprocess.run(
        [sys.executable, str(script), *predict_command(tiny_folder, data, one)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{") :])["processes"] == 1
    launch_two_processes(script, predict_command(tiny_folder, data, two), tmp_path / "two.log")
    assert json.loads((two / "predictions.json").read_text())["summary"]["processes"] == 2
    reference = read_rows(one)
    assert len(reference) == 48 and read_rows(two) == reference

    # killed after a few shards, then run again: complete, nothing duplicated, finished shards kept
    process = subprocess.Popen([sys.executable, str(script), *predict_command(tiny_folder, data, killed)], env=env)
    deadline = time.time() + 300
    while len(list(killed.glob("predictions-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    finished = {path.name: path.stat().st_mtime_ns for path in killed.glob("predictions-*.parquet")}
    assert 3 <= len(finished) < 24, len(finished)
    summary = run(predict_args(tiny_folder, data, killed, batch_size=2, shard_size=2))
    assert summary["shards_skipped"] == len(finished) and summary["shards_written"] == 24 - len(finished)
    assert {name: (killed / name).stat().st_mtime_ns for name in finished} == finished
    assert_same_rows(read_rows(killed), reference)  # the in-process rerun uses 2 threads: float noise only
    assert not list(killed.glob(".*tmp"))
