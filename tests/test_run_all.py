"""The all-stages command: option routing, skipping complete stages, re-running changed ones; the bass dataset."""

import json
import time
from pathlib import Path

import pytest

from emovlm_kd.data import read_complete
from emovlm_kd.stages import distill, run_all, teacher
from emovlm_kd.testing import make_imagefolder, tiny_run_all_argv

BASS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "bass"


def test_shared_options_reach_the_stages_that_have_them():
    args = run_all.build_parser().parse_args(
        ["--data-dir", "D", "--run-dir", "R", "--vlm", "tiny", "--teacher", "tiny", "--no-pretrained", "--seed", "7",
         "--no-resume", "--distill-args", "--epochs 3 --head-dropout 0"]
    )  # fmt: skip
    teacher_argv = run_all.stage_argv(args, "teacher", teacher.build_parser())
    assert teacher_argv[:4] == ["--data-dir", "D", "--run-dir", "R"]
    assert {"--no-pretrained", "--teacher", "tiny"} <= set(teacher_argv) and "--vlm" not in teacher_argv
    assert "--resume" not in teacher_argv and teacher_argv[teacher_argv.index("--seed") + 1] == "7"
    distill_args = distill.build_parser().parse_args(run_all.stage_argv(args, "distill", distill.build_parser()))
    assert (distill_args.vlm, distill_args.epochs, distill_args.head_dropout, distill_args.seed) == ("tiny", 3, 0.0, 7)
    # stage 0 runs only with an endpoint
    assert "instruction_data" not in run_all.selected_stages(args)
    with_endpoint = run_all.build_parser().parse_args(
        ["--data-dir", "D", "--run-dir", "R", "--base-url", "http://x/v1"]
    )
    assert run_all.selected_stages(with_endpoint)[0] == "instruction_data"


def test_complete_stages_are_skipped_and_changed_ones_rerun(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class={"train": 6, "test": 2})
    argv = tiny_run_all_argv(data, tmp_path / "run", stages=("teacher",), teacher="--epochs 1 --batch-size 8")

    def run(*extra):
        return run_all.run(run_all.build_parser().parse_args(argv + list(extra)))["teacher"]

    first = run()
    assert "skipped" not in first
    finished = read_complete(tmp_path / "run", "teacher")["finished_at"]
    assert run()["skipped"] == "complete"
    assert read_complete(tmp_path / "run", "teacher")["finished_at"] == finished
    assert "skipped" not in run("--force")
    assert "skipped" not in run("--teacher-args", "--epochs 2 --batch-size 8")  # new arguments: a new fingerprint
    (data / "test" / "neutral" / "neutral_000.jpg").unlink()  # changed data: a new fingerprint
    assert "skipped" not in run("--teacher-args", "--epochs 2 --batch-size 8")


@pytest.mark.skipif(not BASS.is_dir(), reason="the bass dataset (../shared/data/bass) is not present")
def test_all_stages_on_bass(tmp_path):
    """Stages 2-6 with the tiny models on 583 real images; the real-data robustness check."""
    run_dir = tmp_path / "bass-run"
    argv = tiny_run_all_argv(
        BASS, run_dir, teacher="--epochs 2 --learning-rate 1e-3 --batch-size 10",
        distill="--epochs 30 --learning-rate 1e-2 --head-hidden-sizes 64", gate="--epochs 10 --learning-rate 1e-2",
    )  # fmt: skip
    started = time.time()
    summary = run_all.run(run_all.build_parser().parse_args(argv))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    print(f"bass, tiny models: {time.time() - started:.0f} s; test: " + json.dumps(
        {m: round(results["splits"]["test"][m]["accuracy"], 4) for m in ("teacher", "vlm", "head", "fused")}
    ))  # fmt: skip
    assert results["splits"]["test"]["num_examples"] == 116 and results["splits"]["val"]["num_examples"] == 47
    assert results["unreadable_images"] == []
    assert (run_dir / "model" / "model.safetensors").exists() and summary["export"][
        "verified_max_logit_difference"
    ] < 1e-3
