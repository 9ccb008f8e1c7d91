"""The model card (README.md) of an exported EmoVLM-KD repo: Hub metadata, usage, measured results."""

import html
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from emovlm_kd.calibration import CALIBRATION_METRICS, COVERAGES, calibration_table, risk_coverage_table
from emovlm_kd.metrics import BRANCH_TITLES, results_table
from emovlm_kd.run_dir import STAGES, read_complete

TAGS = [
    "emotion-recognition",
    "visual-emotion-analysis",
    "emovlm-kd",
    "knowledge-distillation",
    "vision-language-model",
    "custom_code",
]

# The fused model's calibration metrics (after temperature scaling) in the card's model-index results.
CARD_CALIBRATION_METRICS = {
    "ece": "expected calibration error (15 bins)",
    "nll": "negative log-likelihood",
    "brier": "Brier score",
}

USAGE = """```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
classifier("photo.jpg")  # [{{"label": "...", "score": ...}}, ...]
# "uncertain" (label None) when the top score is below min_score; predictions: the list above
classifier("photo.jpg", min_score=0.6)  # {{"label": ..., "score": ..., "uncertain": ..., "predictions": [...]}}
# the same scores, plus the VLM's own reasoning about the image (generated on request: its words, not ground truth)
classifier("photo.jpg", explain=True)  # {{"predictions": [...], "explanation": "...", "explanation_labels": [...]}}
```

Or with the model and its processor (the image processor, which also writes the classification prompt, and the
VLM's tokenizer):

```python
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True).eval()
inputs = processor(images=[Image.open("photo.jpg")])
with torch.no_grad():
    outputs = model(**inputs)
print(model.config.id2label[outputs.logits.argmax(-1).item()])
# outputs.vlm_scores: the VLM branch; outputs.head_logits: the distilled head
# outputs.gate_weights: the gate's own weights (moe, dynamic_weighting, cross_gating; None for concat_linear, bilinear)
```"""


def build_model_card(
    repo_id: str,
    class_names: list[str],
    results: dict | None,
    base_model: str | None,
    dataset_name: str | None,
    training: dict,
    license: str = "apache-2.0",
    vlm_description: str | None = None,
    widget: list[dict] | None = None,
    vlm_branch_mode: str = "score",
) -> ModelCard:
    """A `huggingface_hub.ModelCard` with YAML metadata (pipeline tag, library, base model, datasets, metrics, tags,
    model-index results, widget examples with their precomputed outputs) and a body with usage, classes, the
    measured results table and the training setup."""
    eval_split = None
    if results:
        eval_split = "test" if "test" in results["splits"] else next(iter(results["splits"]))
    eval_results = _eval_results(results, eval_split, dataset_name) if results and dataset_name else []
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        metrics=["accuracy", "f1"],
        tags=TAGS,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        widget=widget or None,
    )
    # stage 1's entry is None when the run did not instruction-tune the VLM
    tuned = "instruction-tuned " if training.get("Instruction tuning") else ""
    sections = [
        f"# {repo_id.split('/')[-1]}",
        "An **EmoVLM-KD** visual emotion classifier (Lee, Lee & Park, CVPR Workshops 2025, "
        f"[arXiv 2505.07164](https://arxiv.org/abs/2505.07164)): a frozen {tuned}vision-language model "
        f"(`{base_model or vlm_description or 'see config.json'}`), a small head distilled from a conventional "
        "vision model onto the VLM's own image embeddings, and a gate fusing both predictions. The image goes "
        "through the visual encoder once; "
        + (
            "the VLM branch is the exact likelihood of each class's answer (no sampling)."
            if vlm_branch_mode == "score"
            else "the VLM branch is a generated answer parsed into a one-hot vector, as in the paper's code."
        ),
        "## Usage",
        USAGE.format(repo_id=repo_id),
        "## Classes",
        ", ".join(markdown_text(name) for name in class_names),
        *(["## Examples", _widget_section(widget)] if widget else []),
        "## Results",
        _results_section(results, dataset_name),
        *(["## Calibration", _calibration_section(results, eval_split)] if _calibrated(results) else []),
        "## Training",
        _training_section(training),
        "## Reference",
        "Lee, Lee & Park, *EmoVLM-KD*, CVPR Workshops 2025, arXiv:2505.07164. Trained and exported with the "
        "emovlm-kd training pipeline (`train/run_all.py`).",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _eval_results(results: dict, eval_split: str, dataset_name: str) -> list[EvalResult]:
    """The fused model's accuracy and macro-F1, and its calibration metrics after scaling, as model-index results."""
    fused = results["splits"][eval_split]["fused"]
    metrics = [("accuracy", "accuracy", fused["accuracy"]), ("f1", "macro-F1", fused["macro_f1"])]
    calibrated = fused.get("calibration", {}).get("after", {})
    metrics += [(key, name, calibrated[key]) for key, name in CARD_CALIBRATION_METRICS.items() if key in calibrated]
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=eval_split,
            metric_type=metric,
            metric_name=name,
            metric_value=round(value, 4),
        )
        for metric, name, value in metrics
    ]


def _results_section(results: dict | None, dataset_name: str | None) -> str:
    if not results:
        return "Not evaluated."
    sizes = ", ".join(f"{split}: {values['num_examples']} images" for split, values in results["splits"].items())
    text = f"Measured on `{dataset_name or 'the training dataset'}` ({sizes}); macro-F1 over all classes.\n\n"
    text += results_table(results)
    text += "\n\nThe teacher is not part of this model (it only taught the head); it is listed for comparison. "
    text += "The VLM branch and the distilled head are the two inputs of the gate, whose output is the fused model."
    return text


def _calibrated(results: dict | None) -> bool:
    return bool(results) and "calibration" in results


def _calibration_section(results: dict, split: str) -> str:
    """What the scores mean: the temperature, calibration per branch, risk-coverage and the reliability diagrams."""
    calibration = results["calibration"]
    if calibration["skipped"]:
        text = (
            f"Temperature scaling was skipped ({calibration['skipped']}): the scores are the gate's raw softmax "
            "(`calibration_temperature` 1.0 in `config.json`)."
        )
    else:
        text = (
            f"The scores are calibrated by temperature scaling: the gate's logits are divided by "
            f"`calibration_temperature` = {calibration['temperature']:.4f} (in `config.json`), fitted on the "
            f"validation split ({calibration['num_examples']} images) by minimising the negative log-likelihood. "
            "It never changes the predicted class. The other branches' temperatures are reported, not applied."
        )
    names = ", ".join(CALIBRATION_METRICS.values())
    text += (
        f"\n\n{names} on `{split}` (lower is better; ECE over 15 equal-width confidence bins, computed with "
        "`torchmetrics`), before and after each branch's temperature:\n\n" + calibration_table(results, split)
    )
    coverages = "/".join(f"{coverage:.0%}" for coverage in COVERAGES)
    text += (
        f"\n\nSelective prediction: the fused model's accuracy when only its most confident predictions are kept "
        f"({coverages} coverage), and the score threshold that keeps them (the pipeline's `min_score`):\n\n"
        + risk_coverage_table(results)
    )
    diagrams = [
        f"![Reliability diagram of the {BRANCH_TITLES[branch]} on {split}](reliability_{split}_{branch}.png)"
        for branch in BRANCH_TITLES
        if "calibration" in results["splits"][split].get(branch, {})
    ]
    text += "\n\nReliability diagrams on `" + split + "` (accuracy against confidence; the diagonal is perfect "
    text += "calibration; the bars below count the images per bin), before and after scaling:\n\n"
    return text + "\n\n".join(diagrams)


def _widget_section(widget: list[dict]) -> str:
    text = (
        "The examples on this page are images of the dataset's test split (never of its train or val split) with "
        "their true class as the title. The Hub's inference widget "
        "does not run custom code, so their outputs were computed by this model's image-classification pipeline "
        "when the repo was exported, and are stored in the card's metadata:\n\n"
    )
    rows = [
        f"| `{entry['src']}` | {markdown_text(entry['example_title'])} | {markdown_text(entry['output'][0]['label'])} "
        f"({entry['output'][0]['score']:.2f}) |"
        for entry in widget
    ]
    return text + "| image | true class | predicted |\n|---|---|---|\n" + "\n".join(rows)


def card_settings(run_dir) -> str | None:
    """The settings declared `CARD` (`emovlm_kd.settings`) of every completed stage, as each recorded them:
    "`name`: value" items, once per name (the first stage's value wins; stages share e.g. the VLM inputs)."""
    items = {}
    for stage in STAGES:
        for name, value in ((read_complete(run_dir, stage) or {}).get("card_settings") or {}).items():
            items.setdefault(name, value)
    return ", ".join(f"`{name}`: {value!r}" for name, value in items.items()) or None


def markdown_text(text: str) -> str:
    """`text` (a class name: data) shown literally in Markdown and in a table cell: HTML and Markdown characters
    escaped (a `|` would shift a table's columns), line breaks as spaces."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", html.escape(" ".join(str(text).split())))


def _training_section(training: dict) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in training.items() if value is not None)


__all__ = ["build_model_card", "card_settings"]
