"""The README's "run it" command: the offline quickstart, end to end, in a subprocess (with the learning check)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # subprocess runs of the examples


def test_quickstart_runs_offline_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert f"The model folder is {run_dir / 'model'}" in out
    for row in ("Teacher (timm)", "VLM branch", "Distilled head", "EmoVLM-KD (fused)", "majority-class baseline"):
        assert row in out
    # learning check on held-out test images: every trained branch beats the majority-class baseline
    baseline = float(re.search(r"\| majority-class baseline \| [\d.]+ \| – \| ([\d.]+) \|", out).group(1))
    for row in ("VLM branch", "Distilled head", "EmoVLM-KD \\(fused\\)"):
        test_accuracy = float(re.search(rf"\| {row} \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", out).group(1))
        assert test_accuracy > baseline + 0.2, (row, test_accuracy, baseline, out)
    predictions = re.findall(r"^\s+(\w+)/\S+\s+-> (\w+) \(([\d.]+)\)$", out, flags=re.MULTILINE)
    assert len(predictions) == 3 and all(0 <= float(score) <= 1 for _, _, score in predictions)
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "model" / "README.md").exists()

    # the README's equivalent with the all-stages script and the shipped recipe: the same model, byte for byte
    recipe_run = tmp_path / "recipe-run"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train" / "run_all.py"),
            "--config",
            "quickstart",
            "--data-dir",
            str(run_dir / "data"),
            "--run-dir",
            str(recipe_run),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    quickstart_weights = (run_dir / "model" / "model.safetensors").read_bytes()
    assert (recipe_run / "model" / "model.safetensors").read_bytes() == quickstart_weights
    assert (recipe_run / "run_config.yaml").exists()


BASS = REPO_ROOT.parent / "shared" / "data" / "bass"


def test_quickstart_on_a_real_dataset_given_by_relative_path(tmp_path):
    """The README's offline trial on your own data: `--data ../shared/data/bass` (583 real images)."""
    assert BASS.is_dir(), f"the shared bass dataset is expected at {BASS}"
    run_dir = tmp_path / "bass-run"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--data", "../shared/data/bass", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train=420, val=47, test=116" in result.stderr
    predictions = re.findall(r"^\s+(\w+)/\S+\.png\s+-> (negative|neutral|positive) \(", result.stdout, re.MULTILINE)
    assert [folder for folder, _ in predictions] == ["negative", "neutral", "positive"]
    assert (run_dir / "eval" / "results.json").exists() and (run_dir / "model" / "handler.py").exists()
