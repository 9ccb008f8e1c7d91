"""The all-stages command: recipes and overrides, skipping complete stages, re-running changed ones; the bass data."""

import json
import time
from pathlib import Path

import pytest
import yaml

from emovlm_kd.run_dir import read_complete
from emovlm_kd.stages import run_all
from emovlm_kd.testing import make_imagefolder, tiny_run_all_argv

BASS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "bass"


def settings(plans) -> dict:
    return {plan.stage: plan.args for plan in plans}


def test_recipe_then_command_line_override_the_defaults(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "run: {seed: 7, report_to: none}\n"
        "all: {vlm: tiny, learning_rate: 1e-3}\n"  # 1e-3 is a string to YAML 1.1: coerced to a float
        "stages: [teacher, distill]\n"
        "distill: {epochs: 3, head_hidden_sizes: 64}\n"
    )
    run_all_args, run_args, plans = run_all.plan(
        [
            "--config",
            str(recipe),
            "--run-dir",
            "R",
            "--data-dir",
            "D",
            "--seed",
            "9",
            "--set",
            "distill.head_dropout=0",
            "teacher.pretrained=false",
            "epochs=4",
        ]
    )
    stages = settings(plans)
    assert list(stages) == ["teacher", "distill"] and run_args.seed == 9 and run_args.report_to == "none"
    assert (run_args.run_dir, run_args.data_dir, run_args.num_workers) == ("R", "D", 2)
    assert stages["distill"].vlm == "tiny" and stages["distill"].head_hidden_sizes == [64]
    assert stages["distill"].learning_rate == stages["teacher"].learning_rate == 1e-3
    assert stages["distill"].head_dropout == 0.0 and stages["teacher"].pretrained is False
    assert stages["distill"].epochs == stages["teacher"].epochs == 4  # a bare --set key: every stage that has it
    assert stages["teacher"].resume and run_all_args.resume
    assert not settings(run_all.plan(["--run-dir", "R", "--no-resume", "--stages", "teacher"])[2])["teacher"].resume
    # the defaults are the paper's, and every stage is selected without a recipe
    _, defaults, plans = run_all.plan(["--run-dir", "R"])
    assert [plan.stage for plan in plans] == list(run_all.STAGES) and defaults.seed == 42
    assert settings(plans)["distill"].learning_rate == 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "distill.no_such=1"], "unknown setting 'no_such'"),
        (["--set", "gate.epochs=3"], "stage 'gate' is not among the selected stages"),
        (["--set", "epochs"], "expected KEY=VALUE"),
        (["--set", "distill.epochs=many"], "setting 'epochs'"),
        (["--set", "distill.vlm_branch_mode=sample"], "not one of"),
        (["--stages", "teacher", "distillation"], "Unknown stage"),
        (["--config", "no-such-recipe"], "neither a file nor a shipped recipe"),
    ],
)
def test_bad_settings_are_clear_errors(argv, message):
    selected = [] if "--stages" in argv else ["--stages", "teacher", "distill"]
    with pytest.raises(ValueError, match=message):
        run_all.plan(["--run-dir", "R", *selected, *argv])


def test_resolved_settings_are_written_as_a_reusable_recipe(tmp_path):
    argv = tiny_run_all_argv("D", tmp_path / "run", stages=("teacher", "distill"), distill={"epochs": 3})
    _, run_args, plans = run_all.plan(argv)
    path = run_all.write_run_config(run_args, plans)
    written = yaml.safe_load(path.read_text())
    assert written["stages"] == ["teacher", "distill"] and written["distill"]["epochs"] == 3
    assert written["teacher"]["teacher"] == "tiny" and written["run"]["data_dir"] == "D"
    _, again_run, again = run_all.plan(["--config", str(path)])
    assert again_run == run_args and settings(again) == settings(plans)


def test_credentials_are_never_written(tmp_path):
    from emovlm_kd.arguments import settings_dict

    argv = ["--run-dir", str(tmp_path / "run"), "--stages", "export", "--set", "export.hub_token=hf_SeCrEt"]
    _, run_args, plans = run_all.plan(argv)
    assert plans[0].args.hub_token == "hf_SeCrEt"  # used, but never recorded:
    assert "hf_SeCrEt" not in run_all.write_run_config(run_args, plans).read_text()
    assert "hf_SeCrEt" not in json.dumps(settings_dict(run_args, plans[0].args))


def test_instruction_data_runs_only_with_an_endpoint(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=3, splits=("train",))
    summary = run_all.run(
        *run_all.plan(["--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--stages", "instruction_data"])
    )
    assert "instruction_data" not in summary and not (tmp_path / "run" / "instruction_data.jsonl").exists()


def test_complete_stages_are_skipped_and_changed_ones_rerun(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class={"train": 6, "test": 2})
    argv = tiny_run_all_argv(data, tmp_path / "run", stages=("teacher",), teacher={"epochs": 1})

    def run(*extra):
        return run_all.run(*run_all.plan(argv + list(extra)))["teacher"]

    first = run()
    assert "skipped" not in first
    finished = read_complete(tmp_path / "run", "teacher")["finished_at"]
    assert run()["skipped"] == "complete"
    assert read_complete(tmp_path / "run", "teacher")["finished_at"] == finished
    assert "skipped" not in run("--force")
    assert "skipped" not in run("teacher.epochs=2")  # new settings: a new fingerprint
    (data / "test" / "neutral" / "neutral_000.jpg").unlink()  # changed data: a new fingerprint
    assert "skipped" not in run("teacher.epochs=2")


@pytest.mark.slow
def test_all_stages_on_bass(tmp_path):
    """Stages 2-6 with the tiny models on 583 real images; the real-data robustness check."""
    assert BASS.is_dir(), f"the shared bass dataset is expected at {BASS}"
    run_dir = tmp_path / "bass-run"
    argv = tiny_run_all_argv(
        BASS,
        run_dir,
        teacher={"epochs": 2, "batch_size": 10},
        distill={"epochs": 30, "head_hidden_sizes": [64]},
        gate={"epochs": 10},
    )
    started = time.time()
    summary = run_all.run(*run_all.plan(argv))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    accuracy = {
        branch: round(results["splits"]["test"][branch]["accuracy"], 4)
        for branch in results["splits"]["test"]
        if isinstance(results["splits"]["test"][branch], dict)
    }
    print(f"bass, tiny models: {time.time() - started:.0f} s; test accuracy: {json.dumps(accuracy)}")
    assert results["splits"]["test"]["num_examples"] == 116 and results["splits"]["val"]["num_examples"] == 47
    assert results["unreadable_images"] == []
    assert (run_dir / "model" / "model.safetensors").exists() and summary["export"][
        "verified_max_logit_difference"
    ] < 1e-3
