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


__all__ = ["BRANCHES", "BRANCH_TITLES", "classification_metrics", "majority_baseline", "results_table"]
