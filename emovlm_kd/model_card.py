"""The model card (README.md) of an exported EmoVLM-KD repo: Hub metadata, usage, measured results, and the
description of how the run trained the model (base VLM, recipe, each stage's setup, the VLM branch's decoding), read
from the run directory's markers and specs."""

import html
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import GenerationConfig

from emovlm_kd.calibration import CALIBRATION_METRICS, COVERAGES, calibration_table, risk_coverage_table
from emovlm_kd.metrics import BRANCH_TITLES, results_table
from emovlm_kd.run_dir import STAGES, read_complete
from emovlm_kd.vlm import TINY_VLM_FAMILIES, is_tiny_vlm

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


EXPORT_STAGE = "export"  # the stage that writes the card: its recipe is the running one's


def _tuned_base(run_dir, head_spec: dict) -> tuple[bool, str | None]:
    """Whether the run's VLM is stage 1's output, and the VLM that stage 1 (or the run) started from."""
    if not head_spec.get("instruction_tuned"):
        return False, head_spec["vlm"]
    record = read_complete(run_dir, "instruction_tuning") or {}
    return True, record.get("summary", {}).get("vlm") or record.get("vlm")


def base_model_id(run_dir, head_spec: dict, override: str | None = None) -> str | None:
    """The Hub id of the base VLM for the card (`override` when given), when there is one (never a path on the
    training machine)."""
    if override:
        return override
    base = _tuned_base(run_dir, head_spec)[1]
    return None if base is None or is_tiny_vlm(base) or Path(base).exists() else base


def vlm_name(run_dir, head_spec: dict) -> str:
    """How the card names the VLM: its base name (never a path on the training machine), and whether it was tuned."""
    tuned, base = _tuned_base(run_dir, head_spec)
    base = base or "base VLM"
    if Path(base).exists():
        base = Path(base).name
    base = f"the built-in tiny random-init {TINY_VLM_FAMILIES[base]} VLM" if is_tiny_vlm(base) else base
    return f"{base}, LoRA instruction-tuned by stage 1" if tuned else base


RECIPE_DESCRIPTIONS = {
    None: "the package's defaults (the paper's hyper-parameters, with this package's documented improvements)",
    "paper": "every behaviour of the paper's reference implementation",
    "quickstart": "the offline quickstart's tiny random-init models",
}


def recipe_description(run_dir, run_args) -> str:
    """Which recipe trained the model: the one every stage recorded in its COMPLETE.json, or each stage's."""
    records = {stage: read_complete(run_dir, stage) for stage in STAGES if stage != EXPORT_STAGE}
    recipes = {stage: record.get("settings", {}).get("recipe_name") for stage, record in records.items() if record}
    recipes[EXPORT_STAGE] = run_args.recipe_name
    names = set(recipes.values())
    if len(names) == 1:
        name = names.pop()
        if name is None:
            return RECIPE_DESCRIPTIONS[None]
        return f"`{name}` ({RECIPE_DESCRIPTIONS[name]})" if name in RECIPE_DESCRIPTIONS else f"`{name}`"
    per_stage = ", ".join(f"{stage}: `{recipe or 'defaults'}`" for stage, recipe in recipes.items())
    return f"different per stage ({per_stage})"


def decoding_description(generation: GenerationConfig) -> str:
    """How the `generate` mode picks tokens, from the generation config it runs with (the model's
    `generate_mode_config()`: the run's settings over the VLM's own, e.g. Qwen2-VL's `top_k: 1` and
    `repetition_penalty: 1.05`, which make the reference's "sampling" greedy)."""
    penalty = generation.repetition_penalty
    with_penalty = [f"repetition penalty {penalty}"] if penalty not in (None, 1.0) else []
    if not generation.do_sample:
        return f"greedy ({with_penalty[0]})" if with_penalty else "greedy"
    if generation.top_k == 1:
        return "; ".join(["effectively greedy: sampling with top-k 1 keeps only the best token", *with_penalty])
    settings = [
        f"temperature {generation.temperature}",
        f"top-p {generation.top_p}",
        *([f"top-k {generation.top_k}"] if generation.top_k else []),
        *with_penalty,
    ]
    return f"sampled ({', '.join(settings)})"


def vlm_branch_description(
    model_config: dict, gate_spec: dict, resampled: bool, generation: GenerationConfig | None = None
) -> str:
    """The VLM branch as the gate saw it: exact class likelihoods, or a generated answer decoded as it ran
    (`generation`: the generation config of the `generate` mode)."""
    if model_config["vlm_branch_mode"] == "score":
        what = "probabilities" if gate_spec["vlm_branch_input"] == "probs" else "one-hot best class"
        return f"exact likelihood of every class's answer; the gate sees its {what}"
    epochs = ""
    if resampled and generation.do_sample and generation.top_k != 1:
        epochs = " (a fresh sample every epoch of gate training)"
    elif resampled:
        epochs = " (redrawn every epoch of gate training: the same answer each time)"
    return (
        f"generated answer ({decoding_description(generation)}, up to {model_config['max_new_tokens']} tokens) "
        f"parsed into a one-hot vector for the gate{epochs}"
    )


def _update_description(record: dict) -> str:
    """What one optimizer update of a training stage was (its batch on its process count), from its marker."""
    batch = record.get("batch")
    return f"; {batch['update']}" if batch else ""


def training_summary(
    run_dir, run_args, head_spec: dict, gate_spec: dict, vlm_description: str, generation: GenerationConfig | None
) -> dict:
    """The card's "Training" items: recipe, VLM, each training stage's setup, the VLM branch (`generation`: the
    generation config of the `generate` mode), the card settings."""
    teacher = read_complete(run_dir, "teacher") or {}
    tuning_record = read_complete(run_dir, "instruction_tuning") or {}
    tuning = tuning_record.get("settings")
    gate_settings = (read_complete(run_dir, "gate") or {}).get("settings", {})
    model_config = head_spec["model_config"]
    return {
        "Recipe": recipe_description(run_dir, run_args),
        "VLM": f"{vlm_description} (frozen in stages 3-6)",
        "Instruction tuning": (
            f"LoRA, loss on {'the whole sequence' if tuning.get('loss_on') == 'all' else 'answer tokens'}"
            + (", 4-bit NF4 base (QLoRA)" if tuning.get("load_in_4bit") else "")
            + _update_description(tuning_record)
            if tuning
            else None
        ),
        "Teacher": (
            f"`{teacher.get('teacher')}` fine-tuned for {teacher.get('epochs')} epochs" + _update_description(teacher)
            if teacher
            else None
        ),
        "Head": f"MLP {model_config['head_hidden_sizes']} distilled with alpha={model_config['kd_alpha']}, "
        f"T={model_config['kd_temperature']}",
        "Gate": f"`{gate_spec['gate_type']}` on the VLM branch",
        "VLM branch": vlm_branch_description(
            model_config, gate_spec, gate_settings.get("resample_vlm_answers", False), generation
        ),
        "Settings": card_settings(run_dir),
    }


__all__ = [
    "RECIPE_DESCRIPTIONS",
    "base_model_id",
    "build_model_card",
    "card_settings",
    "decoding_description",
    "recipe_description",
    "training_summary",
    "vlm_branch_description",
    "vlm_name",
]
