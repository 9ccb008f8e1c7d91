"""Stages and commands under `accelerate launch` with several real CPU processes: the documented batch semantics
(docs/multi-gpu.md), every stage at its paper batch size on 2 and 3 processes, the shipped configs of
`examples/accelerate/`, and two machines simulated on one host.

Several CPU processes come from `accelerate launch --multi_gpu` (or a MULTI_GPU config) with `ACCELERATE_USE_CPU=true`
(see `emovlm_kd.testing.accelerate_launch_command`), and Accelerate runs them as MULTI_CPU over gloo.
"""

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emovlm_kd.run_dir import read_complete
from emovlm_kd.stages import run_all
from emovlm_kd.testing import (
    accelerate_launch_command,
    add_bad_images,
    launch_processes,
    launch_two_processes,
    make_imagefolder,
    tiny_run_all_argv,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "examples" / "accelerate"
STAGE_SETTINGS = {
    # 45 training images -> 5 held out, 40 train: whole batches, so no process pads its last batch. The teacher's
    # batch is per process: 2 processes x 4 make the updates of 1 process x 8 (docs/multi-gpu.md); the head and gate
    # keep one image per update, the same updates on any number of processes.
    "teacher": {"epochs": 2, "eval_batch_size": 4, "batch_size": 8},
    "distill": {"epochs": 10, "head_dropout": 0, "feature_batch_size": 4},
    "gate": {"epochs": 10},
    "evaluate": {"calibration_min_images": 5},  # the temperature is fitted on the 5 held-out images
}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class={"train": 15, "test": 4})
    runs = {"two": tmp_path / "two-processes", "one": tmp_path / "one-process"}
    per_process = {**STAGE_SETTINGS, "teacher": {**STAGE_SETTINGS["teacher"], "batch_size": 4}}
    argv = {
        "two": tiny_run_all_argv(data, runs["two"], **per_process),
        "one": tiny_run_all_argv(data, runs["one"], **STAGE_SETTINGS),
    }
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
        assert two["batch"]["images_per_update"] == one["batch"]["images_per_update"], stage
        # the gathered validation metrics cover each of the 5 held-out images once
        assert two["val_metrics"]["num_examples"] == one["val_metrics"]["num_examples"] == 5
        for metric in ("accuracy", "macro_f1", "train_loss"):
            assert two["val_metrics"][metric] == pytest.approx(one["val_metrics"][metric], abs=1e-4), (stage, metric)
        trained_two, trained_one = load_file(runs["two"] / output / weights), load_file(runs["one"] / output / weights)
        for key in trained_one:
            torch.testing.assert_close(trained_two[key], trained_one[key], rtol=1e-4, atol=1e-4, msg=f"{stage} {key}")

    # the features computed by two processes (work split, then gathered) are those of one process, in order (the
    # teacher's files are named after its fingerprint, which holds its batch size: matched by kind and split)
    def cache_files(run) -> dict:
        return {path.name.rsplit("-", 1)[0]: path for path in (run / "cache").iterdir()}

    cache_two, cache_one = cache_files(runs["two"]), cache_files(runs["one"])
    assert sorted(cache_two) == sorted(cache_one) and len(cache_two) == 6
    for name, path in cache_two.items():
        features_two, features_one = load_file(path), load_file(cache_one[name])
        for key in features_one:
            torch.testing.assert_close(features_two[key], features_one[key], rtol=1e-4, atol=1e-5, msg=name)
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


# Every stage at its default (the paper's) batch size: stage 1 one image per process, the teacher 10 per process,
# the head and gate one image per update. 3 classes x 12 training images -> 32 train after the held-out val split:
# enough for 3 processes x 10 teacher images per step.
PAPER_BATCHES = {
    "instruction_tuning": {"epochs": 1, "batch_size": 1},
    "teacher": {"epochs": 1, "batch_size": 10, "eval_batch_size": 4},
    "distill": {"epochs": 1, "feature_batch_size": 4},
    "gate": {"epochs": 1},
    "export": {"verify_images": 2, "widget_images": 0},
}


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [2, 3])
def test_every_stage_at_its_paper_batch_size_on_n_processes(tmp_path, num_processes):
    """docs/multi-gpu.md's command, `accelerate launch --config_file examples/accelerate/multi_gpu.yaml
    train/run_all.py ...`, with the tiny models on CPU: every stage completes; each marker records the true process
    count and what an update was; the summary and the image check appear once, not once per process."""
    data = make_imagefolder(tmp_path / "data", per_class={"train": 12, "test": 1}, size=(32, 32))
    add_bad_images(data / "train" / "neutral")
    run_dir = tmp_path / "run"
    stages = ("instruction_tuning", "teacher", "distill", "gate", "evaluate", "export")
    argv = tiny_run_all_argv(data, run_dir, stages=stages, **PAPER_BATCHES)
    log = tmp_path / "launch.log"
    launch_processes(REPO_ROOT / "train" / "run_all.py", argv, log, num_processes, CONFIGS / "multi_gpu.yaml")

    for stage in stages:
        assert read_complete(run_dir, stage)["num_processes"] == num_processes, stage
    tuning = read_complete(run_dir, "instruction_tuning")
    assert tuning["batch"]["images_per_update"] == num_processes  # batch 1 per process
    assert f"one update = {num_processes} images" in tuning["summary"]["update"]
    assert read_complete(run_dir, "teacher")["batch"]["images_per_update"] == 10 * num_processes
    assert read_complete(run_dir, "distill")["batch"]["images_per_update"] == 1
    card = (run_dir / "model" / "README.md").read_text()
    assert f"one update = {num_processes} images" in card

    text = log.read_text()
    assert text.count('"total_seconds"') == 1  # the run's JSON summary, printed by the main process only
    assert text.count("teacher epoch 1/1: {") == 1
    # the data report: each unreadable image once per stage that loads the data (6 here), not once per process
    bad_images = json.loads((run_dir / "image_check.json").read_text())["bad_images"]
    skipped = [line for line in text.splitlines() if "Skipped unreadable image" in line]
    assert len(bad_images) == 3 and len(skipped) == 3 * 6, skipped


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_machines(script, argv, log_dir: Path, timeout: float = 600):
    """`script argv` as two simulated machines of one process each on this host (examples/accelerate/two_machines.yaml
    with `--machine_rank 0/1 --main_process_ip 127.0.0.1`), as docs/multi-gpu.md shows for real machines."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        machine = ["--num_machines", "2", "--machine_rank", str(rank)]
        machine += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        command, env = accelerate_launch_command(script, argv, 2, CONFIGS / "two_machines.yaml", machine)
        log = open(log_dir / f"machine{rank}.log", "w")
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in processes:
        returncode = process.wait(timeout=timeout)
        log.close()
        assert returncode == 0, (log_dir / f"machine{processes.index((process, log))}.log").read_text()[-5000:]


@pytest.mark.slow
def test_two_machines_simulated_on_one_host(tiny_folder, tmp_path):
    """Two `accelerate launch` machines over loopback: `predict` writes the rows of one process; the teacher with
    batch 4 per process makes the updates of one process with batch 8 (docs/multi-gpu.md)."""
    from datasets import load_dataset

    from emovlm_kd.predict import PredictArguments
    from emovlm_kd.predict import run as predict

    data = make_imagefolder(tmp_path / "data", per_class={"train": 15, "test": 3}, size=(32, 32))
    options = ["--batch-size", "2", "--shard-size", "4", "--num-workers", "0"]
    launch_two_machines(
        REPO_ROOT / "train" / "predict.py",
        ["--model", str(tiny_folder), "--inputs", str(data / "test"), "--output-dir", str(tmp_path / "two")] + options,
        tmp_path,
    )
    one = PredictArguments(
        model=str(tiny_folder),
        inputs=str(data / "test"),
        output_dir=str(tmp_path / "one"),
        batch_size=2,
        num_workers=0,
    )
    predict(one)
    rows = {
        name: list(load_dataset("parquet", data_files=f"{tmp_path / name}/*.parquet", split="train"))
        for name in ("one", "two")
    }
    assert json.loads((tmp_path / "two" / "predictions.json").read_text())["summary"]["processes"] == 2
    assert len(rows["one"]) == 9 and [row["input"] for row in rows["two"]] == [row["input"] for row in rows["one"]]
    for two, one in zip(rows["two"], rows["one"]):
        assert two["probabilities"] == pytest.approx(one["probabilities"], abs=1e-5)

    teacher = {"epochs": 2, "eval_batch_size": 4}
    launch_two_machines(
        REPO_ROOT / "train" / "run_all.py",
        tiny_run_all_argv(data, tmp_path / "run2", stages=("teacher",), teacher={**teacher, "batch_size": 4}),
        tmp_path,
    )
    run_all.run(
        *run_all.plan(
            tiny_run_all_argv(data, tmp_path / "run1", stages=("teacher",), teacher={**teacher, "batch_size": 8})
        )
    )
    two, one = read_complete(tmp_path / "run2", "teacher"), read_complete(tmp_path / "run1", "teacher")
    assert (two["num_processes"], two["batch"]["images_per_update"]) == (2, one["batch"]["images_per_update"])
    weights_two = load_file(tmp_path / "run2" / "teacher" / "model.safetensors")
    weights_one = load_file(tmp_path / "run1" / "teacher" / "model.safetensors")
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-4, atol=1e-4, msg=key)
