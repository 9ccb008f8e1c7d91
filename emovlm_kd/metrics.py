"""Classification metrics (scikit-learn: works offline, unlike `evaluate.load`) and the results table."""

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score

# What stage 5 measures: the teacher (for comparison only), the two inputs of the gate, and the fused model.
BRANCH_TITLES = {
    "teacher": "Teacher (timm)",
    "vlm": "VLM branch",
    "head": "Distilled head",
    "fused": "EmoVLM-KD (fused)",
}
BRANCHES = tuple(BRANCH_TITLES)


def classification_metrics(labels, predictions, class_names: list[str], per_class: bool = False) -> dict:
    """Accuracy and macro-F1 (over all classes, also those never predicted), optionally per class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    indices = list(range(len(class_names)))
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=indices, average="macro", zero_division=0)),
        "num_examples": int(len(labels)),
    }
    if per_class:
        report = classification_report(
            labels, predictions, labels=indices, target_names=class_names, output_dict=True, zero_division=0
        )
        metrics["per_class"] = {
            name: {key: float(report[name][key]) for key in ("precision", "recall", "f1-score", "support")}
            for name in class_names
        }
    return metrics


def majority_baseline(train_labels, eval_labels) -> float:
    """Accuracy on `eval_labels` of always predicting the most frequent class of `train_labels`."""
    majority = np.bincount(np.asarray(train_labels)).argmax()
    return float(np.mean(np.asarray(eval_labels) == majority))


def results_table(results: dict) -> str:
    """Markdown table of stage 5's results: accuracy / macro-F1 per branch and split, and the majority baseline."""
    splits = list(results["splits"])
    header = "| model | " + " | ".join(f"{split} accuracy | {split} macro-F1" for split in splits) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(splits))]
    for branch in BRANCHES:
        cells = [
            f"{results['splits'][split][branch]['accuracy']:.4f} | {results['splits'][split][branch]['macro_f1']:.4f}"
            for split in splits
        ]
        lines.append(f"| {BRANCH_TITLES[branch]} | " + " | ".join(cells) + " |")
    baseline = [f"{results['splits'][split]['majority_baseline_accuracy']:.4f} | –" for split in splits]
    lines.append("| majority-class baseline | " + " | ".join(baseline) + " |")
    return "\n".join(lines)


def image_classification_evaluator():
    """`evaluate.evaluator("image-classification")` that takes an image-classification pipeline object as it is.

    evaluate 0.4.6 asks `isinstance(model_or_pipeline, transformers.TFPreTrainedModel)` before it uses a pipeline
    object, and transformers 5 has no TensorFlow classes: the stock evaluator raises `AttributeError` for every
    pipeline object (a repo id instead would be loaded without `trust_remote_code`). This evaluator skips that one
    step; the rest (inputs, label mapping, metric, bootstrap) is evaluate's own. Needs `pip install evaluate`.

    Example:

    ```python
    from transformers import pipeline
    from emovlm_kd.metrics import image_classification_evaluator

    classifier = pipeline("image-classification", model=repo, trust_remote_code=True)
    image_classification_evaluator().compute(
        model_or_pipeline=classifier, data=dataset, metric="accuracy", label_mapping=classifier.model.config.label2id
    )
    ```
    """
    from evaluate.evaluator import ImageClassificationEvaluator

    class PipelineImageClassificationEvaluator(ImageClassificationEvaluator):
        def prepare_pipeline(self, model_or_pipeline, *args, **kwargs):
            if isinstance(model_or_pipeline, str) or model_or_pipeline is None:
                raise ValueError("Pass a pipeline object: pipeline('image-classification', model=...)")
            return model_or_pipeline

    return PipelineImageClassificationEvaluator()


__all__ = [
    "BRANCHES",
    "BRANCH_TITLES",
    "classification_metrics",
    "image_classification_evaluator",
    "majority_baseline",
    "results_table",
]
