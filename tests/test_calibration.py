"""Temperature scaling, calibration metrics, reliability diagrams, selective prediction (`emovlm_kd.calibration`)."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from emovlm_kd.calibration import (
    TEMPERATURE_BOUNDS,
    calibration_metrics,
    check_finite,
    fit_temperature,
    plot_reliability,
    reliability_bins,
    risk_coverage,
    skip_reason,
)
from emovlm_kd.run_dir import DataError
from emovlm_kd.stages.evaluate import EvaluateArguments, branch_scores, fit_calibration
from modeling_emovlm_kd import GATES

OVERCONFIDENCE = 5.0
CLASSES = ["a", "b", "c", "d"]


def calibrated_classifier(num_images: int, seed: int):
    """Logits of a perfectly calibrated classifier and labels drawn from its own probabilities."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, len(CLASSES), generator=generator) * 1.5
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return logits, labels


def test_overconfident_classifier_is_calibrated_by_temperature_scaling():
    """Logits scaled x5: the temperature fitted on val undoes it (within 10 %), ECE and NLL fall on val and on test,
    and no prediction changes."""
    val_logits, val_labels = calibrated_classifier(3000, seed=0)
    test_logits, test_labels = calibrated_classifier(3000, seed=1)
    overconfident_val, overconfident_test = val_logits * OVERCONFIDENCE, test_logits * OVERCONFIDENCE

    temperature = fit_temperature(overconfident_val, val_labels)
    assert temperature == pytest.approx(OVERCONFIDENCE, rel=0.10)
    for logits, labels in ((overconfident_val, val_labels), (overconfident_test, test_labels)):
        before, after = calibration_metrics(logits, labels), calibration_metrics(logits, labels, temperature)
        assert after["ece"] < before["ece"] / 2 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
        assert after["accuracy"] == before["accuracy"]
        assert torch.equal((logits / temperature).argmax(-1), logits.argmax(-1))
    # deterministic: the same fit twice gives the same number
    assert fit_temperature(overconfident_val, val_labels) == temperature
    # an already calibrated classifier keeps a temperature near 1
    assert fit_temperature(val_logits, val_labels) == pytest.approx(1.0, abs=0.1)


def test_metrics_are_torchmetrics_and_the_definitions():
    logits, labels = calibrated_classifier(500, seed=2)
    metrics = calibration_metrics(logits * 3, labels)
    probabilities = (logits.double() * 3).softmax(-1)
    expected_ece = multiclass_calibration_error(probabilities, labels, len(CLASSES), n_bins=15, norm="l1")
    assert metrics["ece"] == pytest.approx(float(expected_ece))
    assert metrics["nll"] == pytest.approx(float(-probabilities[torch.arange(500), labels].log().mean()))
    one_hot = torch.nn.functional.one_hot(labels, len(CLASSES))
    assert metrics["brier"] == pytest.approx(float(((probabilities - one_hot) ** 2).sum(-1).mean()))
    assert metrics["mce"] >= metrics["ece"]
    # the diagram's bins are the metric's bins: their weighted gap is the ECE
    bins = reliability_bins(logits * 3, labels)
    filled = bins["counts"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    assert bins["counts"].sum() == 500
    assert float((bins["counts"][filled] / 500 * gap).sum()) == pytest.approx(metrics["ece"], abs=1e-6)


def test_reliability_diagram_is_a_png(tmp_path):
    logits, labels = calibrated_classifier(200, seed=3)
    before = {**reliability_bins(logits * 4, labels), "ece": 0.3}
    after = {**reliability_bins(logits, labels), "ece": 0.05}
    plot_reliability(before, after, 4.0, "test", tmp_path / "diagram.png")
    assert (tmp_path / "diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_risk_coverage_withholds_the_least_confident():
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.2, 0.0]])  # confidences fall; the last is wrong
    labels = [0, 0, 1, 1]
    rows = risk_coverage(logits, labels, coverages=(1.0, 0.75, 0.5))
    assert [row["num_examples"] for row in rows] == [4, 3, 2]
    assert [row["accuracy"] for row in rows] == [0.75, 1.0, 1.0]
    assert rows[1]["min_score"] == pytest.approx(float(torch.tensor([0.0, 3.0]).softmax(-1)[1]))


def test_too_small_single_class_or_missing_val_skips_scaling_with_a_warning(caplog):
    args = EvaluateArguments()
    logits, labels = calibrated_classifier(60, seed=4)
    cases = {
        "there is no validation split": (None, None),
        "the validation split has 10 images, fewer than 20": ({"fused": logits[:10]}, labels[:10].numpy()),
        "the validation split holds a single class (c)": ({"fused": logits[:30]}, np.full(30, 2)),
    }
    for reason, (scores, val_labels) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            calibration = fit_calibration(args, scores, val_labels, CLASSES)
        assert calibration["skipped"].startswith(reason) and calibration["temperature"] == 1.0
        assert reason in caplog.text
    assert skip_reason(labels.numpy(), CLASSES) is None
    fitted = fit_calibration(args, {"fused": logits * 3, "head": logits}, labels.numpy(), CLASSES)
    assert fitted["fitted_on"] == "val" and fitted["temperature"] > 1.5
    assert set(fitted["branch_temperatures"]) == {"fused", "head"}
    off = fit_calibration(EvaluateArguments(temperature_scaling=False), {"fused": logits * 3}, labels.numpy(), CLASSES)
    assert off["temperature"] == 1.0 and "turned off" in off["skipped"]


def test_separable_val_keeps_the_temperature_within_bounds():
    # every image right with a wide margin: the NLL falls (to 0 in float64) as T -> 0; the fit stays in bounds
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]] * 15)
    assert TEMPERATURE_BOUNDS[0] <= fit_temperature(logits, [0, 1] * 15) < 1
    # every image wrong: the NLL falls as T grows, up to the upper bound
    assert fit_temperature(-logits, [0, 1] * 15) == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3)


def test_non_finite_logits_are_refused():
    logits = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(logits, [0, 1])
    with pytest.raises(ValueError, match="1 non-finite value"):
        check_finite(logits)
    features = {"teacher_logits": torch.tensor([[float("inf"), 0.0]])}
    head_spec = {"model_config": {"vlm_branch_mode": "generate"}}
    with pytest.raises(DataError, match="Teacher"):
        with torch.no_grad():
            branch_scores(
                {**features, "image_embeds": torch.zeros(1, 4), "vlm_generated": torch.zeros(1, 2)},
                head_spec,
                torch.nn.Linear(4, 2),
                GATES["concat_linear"](2),
                {"vlm_branch_input": "probs"},
            )


# The exported model: the stored temperature in `logits`, the pipeline and the model agree, older folders load.


def tiny_folder_with_temperature(tiny_folder, destination, temperature):
    """A copy of the tiny model folder whose config.json holds `temperature` (None: no such field, as exported
    before calibration existed)."""
    import json
    import shutil

    shutil.copytree(tiny_folder, destination)
    config = json.loads((destination / "config.json").read_text())
    config.pop("calibration_temperature", None)
    if temperature is not None:
        config["calibration_temperature"] = temperature
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_exported_temperature_is_in_the_logits_and_the_pipeline_scores(tiny_folder, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers import pipeline as hf_pipeline

    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 200, 90))]
    logits = {}
    for name, temperature in (("old", None), ("calibrated", 2.5)):
        folder = tiny_folder_with_temperature(tiny_folder, tmp_path / name, temperature)
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert model.config.calibration_temperature == (temperature or 1.0)
        with torch.no_grad():
            outputs = model(**processor(images))
            gate_output = model.gate(outputs.head_logits, outputs.vlm_scores)[0]
        torch.testing.assert_close(outputs.logits, gate_output / (temperature or 1.0))
        logits[name] = outputs.logits
        if temperature is None:
            continue
        classifier = hf_pipeline("image-classification", model=str(folder), trust_remote_code=True)
        for image, probabilities in zip(images, outputs.logits.softmax(-1)):
            scores = {entry["label"]: entry["score"] for entry in classifier(image, top_k=3)}
            assert [scores[label] for label in model.config.labels] == pytest.approx(probabilities.tolist(), abs=1e-5)
    torch.testing.assert_close(logits["calibrated"] * 2.5, logits["old"])  # same model, same argmax, softer scores
    assert torch.equal(logits["calibrated"].argmax(-1), logits["old"].argmax(-1))


def test_pipeline_min_score_answers_uncertain_below_it(tiny):
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

    model, image_processor, _ = tiny
    classifier = EmoVLMKDImageClassificationPipeline(model=model, image_processor=image_processor)
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    plain = classifier(image)
    top = plain[0]
    answer = classifier(image, min_score=top["score"] - 1e-6)
    assert answer == {"label": top["label"], "score": top["score"], "uncertain": False, "predictions": plain}
    answer = classifier([image, image], min_score=1.0, top_k=1)
    assert [a["label"] for a in answer] == [None, None] and [a["predictions"] for a in answer] == [plain[:1]] * 2
    assert all(a["uncertain"] and a["score"] == top["score"] for a in answer)
    for bad in (1.5, -0.01, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"min_score must be a number in \[0, 1\]"):
            classifier(image, min_score=bad)
    with pytest.raises(ValueError, match="min_score applies to softmax probabilities"):
        classifier(image, min_score=0.5, function_to_apply="none")


def test_pipeline_refuses_non_finite_logits_and_config_a_bad_temperature(tiny, monkeypatch):
    from configuration_emovlm_kd import EmoVLMKDConfig
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

    model, image_processor, _ = tiny
    classifier = EmoVLMKDImageClassificationPipeline(model=model, image_processor=image_processor)
    forward = classifier._forward

    def broken(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        outputs["logits"][0, 0] = float("inf")
        return outputs

    monkeypatch.setattr(classifier, "_forward", broken)
    with pytest.raises(ValueError, match="non-finite logits"):
        classifier(Image.new("RGB", (64, 64)))
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="calibration_temperature must be a finite number > 0"):
            EmoVLMKDConfig(id2label={0: "a", 1: "b"}, calibration_temperature=bad)
