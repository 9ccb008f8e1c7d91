"""Classification metrics (scikit-learn: works offline, unlike `evaluate.load`)."""

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


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


def confusion(labels, predictions, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, predictions, labels=list(range(num_classes)))


__all__ = ["classification_metrics", "confusion", "majority_baseline"]
