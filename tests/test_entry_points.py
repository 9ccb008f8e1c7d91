"""The console commands `setup.py` installs exist, import, and show their help; the pipeline works with evaluate."""

import ast
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from emovlm_kd.run_dir import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent


def console_scripts() -> dict[str, str]:
    """`{command: "module:function"}` from setup.py's `entry_points`, read without running setup.py."""
    for node in ast.walk(ast.parse((REPO_ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            return dict(tuple(part.strip() for part in entry.split("=")) for entry in entries)
    raise AssertionError("setup.py has no entry_points")


def test_a_command_for_every_job():
    stages = {f"emovlm-kd-{stage.replace('_', '-')}" for stage in STAGES}
    assert set(console_scripts()) == {"emovlm-kd-train", "emovlm-kd-predict", "emovlm-kd-demo", *stages}
    readme = (REPO_ROOT / "docs" / "training.md").read_text()  # the training guide lists the console commands
    assert all(command in readme for command in console_scripts())


@pytest.mark.parametrize(
    "command, target",
    [
        pytest.param(command, target, marks=[pytest.mark.slow] if command == "emovlm-kd-demo" else [])
        for command, target in sorted(console_scripts().items())
    ],  # the demo imports gradio (seconds)
)
def test_every_command_shows_its_help(command, target, monkeypatch, capsys):
    module, function = target.split(":")
    entry = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


METRIC_MODULE = """
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description="accuracy", citation="", inputs_description="", features=features)

    def _compute(self, predictions, references):
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
"""


def test_the_pipeline_works_with_evaluates_evaluator(tiny_folder, tmp_path):
    """With a metric module at hand (here a local one: `evaluate.load` fetches hosted ones from the Hub)."""
    import evaluate
    from datasets import ClassLabel, Dataset, Features, Image
    from transformers import pipeline

    from emovlm_kd.metrics import classification_metrics, image_classification_evaluator
    from emovlm_kd.testing import make_image

    rng = np.random.default_rng(0)
    classes = ["negative", "neutral", "positive"]
    labels = [index % 3 for index in range(6)]
    data = Dataset.from_dict(
        {"image": [make_image(label, rng) for label in labels], "label": labels},
        features=Features({"image": Image(), "label": ClassLabel(names=classes)}),
    )
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.py").write_text(METRIC_MODULE)
    metric = evaluate.load(str(tmp_path / "accuracy"))
    classifier = pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True)
    label2id = classifier.model.config.label2id

    # evaluate 0.4.6 refuses every pipeline object under transformers 5 (what docs/using.md says, and why)
    with pytest.raises(AttributeError, match="TFPreTrainedModel"):
        evaluate.evaluator("image-classification").compute(
            model_or_pipeline=classifier, data=data, metric=metric, label_mapping=label2id
        )
    results = image_classification_evaluator().compute(
        model_or_pipeline=classifier, data=data, metric=metric, label_mapping=label2id
    )
    predicted = [label2id[output[0]["label"]] for output in classifier(list(data["image"]))]
    assert results["accuracy"] == pytest.approx(classification_metrics(labels, predicted, classes)["accuracy"])
    assert results["samples_per_second"] > 0
