"""The model card (README.md) of an exported EmoVLM-KD repo: Hub metadata, usage, measured results."""

import html
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from emovlm_kd.metrics import results_table

TAGS = [
    "emotion-recognition",
    "visual-emotion-analysis",
    "emovlm-kd",
    "knowledge-distillation",
    "vision-language-model",
    "custom_code",
]

USAGE = """```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
classifier("photo.jpg")  # [{{"label": "...", "score": ...}}, ...]
# the same scores, plus the VLM's own reasoning about the image (generated on request: its words, not ground truth)
classifier("photo.jpg", explain=True)  # {{"predictions": [...], "explanation": "...", "explanation_labels": [...]}}
```

Or with the model and its image processor (which also writes the classification prompt):

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True).eval()
inputs = processor([Image.open("photo.jpg")])
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
    eval_results = []
    if results and dataset_name:
        fused = results["splits"][eval_split]["fused"]
        for metric, value in (("accuracy", fused["accuracy"]), ("f1", fused["macro_f1"])):
            eval_results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_name,
                    dataset_name=dataset_name,
                    dataset_split=eval_split,
                    metric_type=metric,
                    metric_name="macro-F1" if metric == "f1" else "accuracy",
                    metric_value=round(value, 4),
                )
            )
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
        "## Training",
        _training_section(training),
        "## Reference",
        "Lee, Lee & Park, *EmoVLM-KD*, CVPR Workshops 2025, arXiv:2505.07164. Trained and exported with the "
        "emovlm-kd training pipeline (`train/run_all.py`).",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _results_section(results: dict | None, dataset_name: str | None) -> str:
    if not results:
        return "Not evaluated."
    sizes = ", ".join(f"{split}: {values['num_examples']} images" for split, values in results["splits"].items())
    text = f"Measured on `{dataset_name or 'the training dataset'}` ({sizes}); macro-F1 over all classes.\n\n"
    text += results_table(results)
    text += "\n\nThe teacher is not part of this model (it only taught the head); it is listed for comparison. "
    text += "The VLM branch and the distilled head are the two inputs of the gate, whose output is the fused model."
    return text


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


def markdown_text(text: str) -> str:
    """`text` (a class name: data) shown literally in Markdown and in a table cell: HTML and Markdown characters
    escaped (a `|` would shift a table's columns), line breaks as spaces."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", html.escape(" ".join(str(text).split())))


def _training_section(training: dict) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in training.items() if value is not None)


__all__ = ["build_model_card"]
