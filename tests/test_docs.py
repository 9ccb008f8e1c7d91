"""The training commands and recipes the README and examples/train_your_dataset.md show are valid; the offline ones
run."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from emovlm_kd.arguments import load_recipe, parse_stage_args
from emovlm_kd.stages import run_all

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "examples" / "train_your_dataset.md"]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


def commands(block: str) -> list[str]:
    """Shell lines of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def training_commands() -> list[tuple[str, str, list[str]]]:
    """`(doc, script stage, argv)` of every `train/<stage>.py` command in the docs."""
    found = []
    for path in DOCS:
        for block in code_blocks(path, "bash"):
            for line in commands(block):
                match = re.search(r"train/(\w+)\.py(.*)", line)
                if match:
                    found.append((path.name, match.group(1), shlex.split(match.group(2))))
    return found


def doc_recipe(tmp_path: Path) -> Path:
    """The `fi.yaml` recipe written out in train_your_dataset.md."""
    block = next(b for b in code_blocks(DOCS[1], "yaml") if b.startswith("# fi.yaml"))
    path = tmp_path / "fi.yaml"
    path.write_text(block)
    return path


def test_the_docs_show_every_script():
    scripts = {stage for _, stage, _ in training_commands()}
    assert scripts >= {"run_all", "instruction_data", "instruction_tuning", "teacher", "distill", "gate", "evaluate"}


@pytest.mark.parametrize("doc, stage, argv", training_commands(), ids=lambda value: str(value)[:40])
def test_every_training_command_in_the_docs_parses(doc, stage, argv, tmp_path):
    argv = [str(doc_recipe(tmp_path)) if arg == "fi.yaml" else arg for arg in argv]
    if stage == "predict":  # batch prediction, not a stage
        from transformers import HfArgumentParser

        from emovlm_kd.predict import PredictArguments

        assert HfArgumentParser(PredictArguments).parse_args_into_dataclasses(argv)[0].output_dir
    elif stage == "run_all":
        _, run_args, plans = run_all.plan(argv)
        assert run_args.run_dir and plans
    else:
        run_args, args = parse_stage_args(importlib.import_module(f"emovlm_kd.stages.{stage}"), argv)
        assert run_args.run_dir


def test_the_recipes_in_the_docs_are_valid(tmp_path):
    recipe = load_recipe(str(doc_recipe(tmp_path)))
    plans = run_all.plan(["--config", str(tmp_path / "fi.yaml"), "--run-dir", "R"])[2]
    plans = {plan.stage: plan.args for plan in plans}
    assert recipe["instruction_tuning"]["load_in_4bit"] and plans["instruction_tuning"].load_in_4bit
    assert plans["distill"].vlm == "Qwen/Qwen2-VL-7B-Instruct" and plans["export"].push_to_hub
    readme_recipe = tmp_path / "readme.yaml"
    readme_recipe.write_text(code_blocks(DOCS[0], "yaml")[0])
    plans = {plan.stage: plan.args for plan in run_all.plan(["--config", str(readme_recipe), "--run-dir", "R"])[2]}
    assert plans["gate"].gate_type == "moe" and plans["distill"].epochs == 10


def run_as_written(lines: list[str], tmp_path: Path):
    """Run doc command lines in `tmp_path` (their `runs/` under it; `python` is this interpreter)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    for line in lines:
        line = line.replace("runs/", f"{tmp_path}/runs/").replace("train/", f"{REPO_ROOT}/train/")
        line = line.replace("examples/", f"{REPO_ROOT}/examples/")
        argv = shlex.split(line)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
        assert result.returncode == 0, (line, result.stderr[-3000:])


@pytest.mark.slow
def test_the_offline_walkthrough_runs(tmp_path):
    """train_your_dataset.md's "Try the pipeline offline first", run as written (under a temporary `runs/`)."""
    block = next(b for b in code_blocks(DOCS[1], "bash") if "--config quickstart" in b)
    run_as_written(commands(block), tmp_path)
    assert (tmp_path / "runs" / "toy" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_the_readme_offline_dataset_commands_run(tmp_path):
    """The README's offline equivalent of the Hub dataset command (parquet files), then batch prediction."""
    lines = [
        line
        for block in code_blocks(DOCS[0], "bash")
        for line in commands(block)
        if line.startswith("python") and "runs/toy-" in line
    ]
    assert [line.split()[1] for line in lines] == ["-c", "train/run_all.py", "train/predict.py"]
    run_as_written(lines, tmp_path)
    results = json.loads((tmp_path / "runs" / "toy-parquet-run" / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["num_examples"] == 18
    predictions = list((tmp_path / "runs" / "toy-predictions").glob("*.parquet"))
    assert (
        predictions
        and json.loads((tmp_path / "runs" / "toy-predictions" / "predictions.json").read_text())["complete"]
    )
