"""Stages 2-6 under `accelerate launch` with two real CPU processes equal a single-process run.

Two CPU processes come from `accelerate launch --multi_gpu` with `ACCELERATE_USE_CPU=true` (see
`emovlm_kd.testing.launch_two_processes`), and Accelerate runs them as MULTI_CPU over gloo. `--batch-size` is global
(split across processes), the augmentation of each image is seeded per (seed, epoch, image), and the head has no
dropout here, so both runs compute the same updates.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emovlm_kd.run_dir import read_complete
from emovlm_kd.stages import run_all
from emovlm_kd.testing import launch_two_processes, make_imagefolder, tiny_run_all_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE_SETTINGS = {
    # 45 training images -> 5 held out, 40 train: whole batches of 8, so no process pads its last batch
    "teacher": {"epochs": 2, "eval_batch_size": 4},
    "distill": {"epochs": 10, "head_dropout": 0, "feature_batch_size": 4},
    "gate": {"epochs": 10},
    "evaluate": {"calibration_min_images": 5},  # the temperature is fitted on the 5 held-out images
}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class={"train": 15, "test": 4})
    runs = {"two": tmp_path / "two-processes", "one": tmp_path / "one-process"}
    argv = {name: tiny_run_all_argv(data, run, **STAGE_SETTINGS) for name, run in runs.items()}
    launch_two_processes(REPO_ROOT / "train" / "run_all.py", argv["two"], tmp_path / "launch.log")
    run_all.run(*run_all.plan(argv["one"]))

    trained = {
        "teacher": ("teacher", "model.safetensors"),
        "distill": ("head", "head.safetensors"),
        "gate": ("gate", "gate.safetensors"),
    }
    for stage, (output, weights) in trained.items():
        two, one = read_complete(runs["two"], stage), read_complete(runs["one"], stage)
        assert (two["num_processes"], one["num_processes"]) == (2, 1)
        # the gathered validation metrics cover each of the 5 held-out images once
        assert two["val_metrics"]["num_examples"] == one["val_metrics"]["num_examples"] == 5
        for metric in ("accuracy", "macro_f1", "train_loss"):
            assert two["val_metrics"][metric] == pytest.approx(one["val_metrics"][metric], abs=1e-4), (stage, metric)
        trained_two, trained_one = load_file(runs["two"] / output / weights), load_file(runs["one"] / output / weights)
        for key in trained_one:
            torch.testing.assert_close(trained_two[key], trained_one[key], rtol=1e-4, atol=1e-4, msg=f"{stage} {key}")

    # the features computed by two processes (work split, then gathered) are those of one process, in order
    cache_two = sorted((runs["two"] / "cache").iterdir())
    assert [p.name for p in cache_two] == sorted(p.name for p in (runs["one"] / "cache").iterdir())
    assert len(cache_two) == 6
    for path in cache_two:
        features_two, features_one = load_file(path), load_file(runs["one"] / "cache" / path.name)
        for key in features_one:
            torch.testing.assert_close(features_two[key], features_one[key], rtol=1e-4, atol=1e-5, msg=path.name)
    assert json.loads((runs["two"] / "labels.json").read_text()) == json.loads(
        (runs["one"] / "labels.json").read_text()
    )

    # evaluation and export ran in both (no process waited for another forever); same measured results
    results = {name: json.loads((run / "eval" / "results.json").read_text()) for name, run in runs.items()}
    for split in ("val", "test"):
        for model in ("teacher", "vlm", "head", "fused"):
            assert (
                results["two"]["splits"][split][model]["accuracy"]
                == results["one"]["splits"][split][model]["accuracy"]
            )
    # a temperature fitted (on every process) and the same calibrated metrics. (Not the same temperature to the last
    # digit: 5 images the tiny model separates leave the likelihood flat below some T, where any T is a minimum.)
    assert results["two"]["calibration"]["fitted_on"] == results["one"]["calibration"]["fitted_on"] == "val"
    for split in ("val", "test"):
        two, one = (result["splits"][split]["fused"]["calibration"]["after"] for result in results.values())
        assert two == pytest.approx(one, abs=1e-4), split
    assert all((run / "model" / "model.safetensors").exists() for run in runs.values())
