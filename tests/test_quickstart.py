"""The README's "run it" command: the offline quickstart, end to end, in a subprocess (with the learning check)."""

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from emovlm_kd.data import load_imagefolder
from emovlm_kd.testing import templated_explanation

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # subprocess runs of the examples


def run_script(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """A script of the repository in a fresh interpreter, offline; asserts that it succeeded."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def word_overlap(text: str, reference: str) -> float:
    """F1 of the two texts' word multisets (lower-cased): 1 for the same words, 0 for none in common."""
    words, reference_words = Counter(re.findall(r"\w+", text.lower())), Counter(re.findall(r"\w+", reference.lower()))
    common = sum((words & reference_words).values())
    if not common:
        return 0.0
    precision, recall = common / sum(words.values()), common / sum(reference_words.values())
    return 2 * precision * recall / (precision + recall)


def check_explanations_reproduce_training_texts(model_dir: Path, data_dir: Path):
    """The exported model's `explain`, on the images stage 1 trained on, says what their instruction data said.

    The bar, per image and task: the text's word overlap with its own class's training text is at least 0.9 and
    higher than with every other class's. The other classes' texts share the template's words (an observation has
    7 of 8 words in common with another class's: overlap 0.875), so only a text that names the image's own colour
    clears it; an untrained VLM's text has an overlap near 0.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    train = load_imagefolder(data_dir, val_fraction=0.1, seed=42).splits["train"]  # the quickstart's split
    inputs = image_processor(list(train["image_path"]))
    with torch.no_grad():
        hidden = model(**inputs, output_image_hidden_states=True).image_hidden_states
    classes = range(model.config.num_labels)
    overlaps = []
    for task, key in (("observation", "observation"), ("inference", "reasoning")):
        texts = model.explain(**inputs, task=task, max_new_tokens=32, image_hidden_states=hidden)
        for text, label in zip(texts, train["label"]):
            scores = [word_overlap(text, templated_explanation(other)[key]) for other in classes]
            own = scores[label]
            assert own >= 0.9 and own > max(scores[:label] + scores[label + 1 :]), (task, label, text, scores)
            overlaps.append(own)
    return sum(overlaps) / len(overlaps)


def check_calibration_outputs(run_dir: Path):
    """Stage 5's calibration report: its metrics per branch before and after scaling, reliability diagrams, and the
    card's section. The quickstart's validation split (about 7 images) is too small to fit a temperature on: scaling
    is skipped with the reason, and the model keeps temperature 1.0."""
    import json

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "fewer than 20" in results["calibration"]["skipped"]
    for split in ("val", "test"):
        for branch in ("teacher", "vlm", "head", "fused"):
            calibration = results["splits"][split][branch]["calibration"]
            for when in ("before", "after"):
                assert {"ece", "mce", "nll", "brier"} <= set(calibration[when]), (split, branch, when)
            assert (run_dir / "eval" / f"reliability_{split}_{branch}.png").read_bytes()[:4] == b"\x89PNG"
        assert len(results["splits"][split]["risk_coverage"]) == 4
    assert json.loads((run_dir / "model" / "config.json").read_text())["calibration_temperature"] == 1.0
    card = (run_dir / "model" / "README.md").read_text()
    assert "## Calibration" in card and "Temperature scaling was skipped" in card
    assert "](reliability_test_fused.png)" in card and (run_dir / "model" / "reliability_test_fused.png").is_file()


def test_quickstart_runs_offline_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = run_script("examples/quickstart.py", "--run-dir", run_dir, cwd=tmp_path).stdout
    assert f"The model folder is {run_dir / 'model'}" in out
    # stage 1 trained all three tasks on the generated instruction data
    assert "Instruction tuning (instruction data for 64 of 64 training images)" in out
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
    check_calibration_outputs(run_dir)
    # the reloaded model explains the held-out test images (pipeline `explain=True`, fresh process) in the words its
    # class was trained on
    explanations = re.findall(r"^\s+(\w+)/\S+\s+-> (['\"])(.*)\2$", out, flags=re.MULTILINE)
    classes = ["negative", "neutral", "positive"]
    assert [folder for folder, _, _ in explanations] == classes
    for folder, _, text in explanations:
        assert text == templated_explanation(classes.index(folder))["reasoning"], (folder, text)
    assert check_explanations_reproduce_training_texts(run_dir / "model", run_dir / "data") >= 0.95

    # the README's equivalent with the all-stages script and the shipped recipe: the same model, byte for byte
    recipe_run = tmp_path / "recipe-run"
    recipe_run.mkdir()
    shutil.copy(run_dir / "instruction_data.jsonl", recipe_run / "instruction_data.jsonl")
    run_script(
        "train/run_all.py",
        "--config",
        "quickstart",
        "--data-dir",
        run_dir / "data",
        "--run-dir",
        recipe_run,
        cwd=tmp_path,
    )
    quickstart_weights = (run_dir / "model" / "model.safetensors").read_bytes()
    assert (recipe_run / "model" / "model.safetensors").read_bytes() == quickstart_weights
    assert (recipe_run / "run_config.yaml").exists()


BASS = REPO_ROOT.parent / "shared" / "data" / "bass"


def test_quickstart_on_a_real_dataset_given_by_relative_path(tmp_path):
    """The README's offline trial on your own data: `--data ../shared/data/bass` (583 real images)."""
    assert BASS.is_dir(), f"the shared bass dataset is expected at {BASS}"
    run_dir = tmp_path / "bass-run"
    result = run_script("examples/quickstart.py", "--data", "../shared/data/bass", "--run-dir", run_dir, cwd=REPO_ROOT)
    assert "train=420, val=47, test=116" in result.stderr
    predictions = re.findall(r"^\s+(\w+)/\S+\.png\s+-> (negative|neutral|positive) \(", result.stdout, re.MULTILINE)
    assert [folder for folder, _ in predictions] == ["negative", "neutral", "positive"]
    assert (run_dir / "eval" / "results.json").exists() and (run_dir / "model" / "handler.py").exists()
