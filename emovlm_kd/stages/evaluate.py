"""Stage 5: evaluate the teacher, the VLM branch, the distilled head and the fused model on val and test.

Accuracy and macro-F1 (scikit-learn), overall and per class, next to the majority-class baseline; from the feature
cache of stage 3 (computed here if missing). Writes `<run_dir>/eval/results.json` and one confusion-matrix PNG per
split (`confusion_<split>.png`, one panel per branch).
"""

import json
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from emovlm_kd.artifacts import (
    cached_vlm_predictions,
    fused_logits,
    gate_inputs,
    load_gate,
    load_head,
    read_head_spec,
    spec_vlm,
)
from emovlm_kd.cache import FeatureCache
from emovlm_kd.metrics import BRANCH_TITLES, BRANCHES, classification_metrics, majority_baseline
from emovlm_kd.run_dir import RESULTS_FILE, DataError, hash_json, upstream_fingerprint
from emovlm_kd.settings import NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage

logger = logging.getLogger(__name__)

STAGE = "evaluate"


@dataclass
class EvaluateArguments:
    AFFECTS: ClassVar[dict[str, Affects]] = {"splits": RESULT, "feature_batch_size": NOTHING}

    splits: list[str] = field(
        default_factory=lambda: ["val", "test"], metadata={"help": "Splits to evaluate (those that exist)"}
    )
    feature_batch_size: int = field(default=8, metadata={"help": "Images per VLM forward if features are not cached"})


ARGUMENTS = EvaluateArguments


def fingerprint(run_args, args: EvaluateArguments) -> str:
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            "teacher": upstream_fingerprint(run_args.run_dir, "teacher", STAGE),
            "gate": upstream_fingerprint(run_args.run_dir, "gate", STAGE),
            **{name: getattr(args, name) for name in fingerprint_fields(args)},
        }
    )


def predictions(features: dict, head_spec: dict, head, gate, gate_spec: dict) -> dict[str, np.ndarray]:
    """Predicted class per image of each branch, from a split's cached features."""
    head_output, vlm_scores = gate_inputs(head, features, head_spec, gate_spec)
    return {
        "teacher": features["teacher_logits"].argmax(-1).numpy(),
        "vlm": cached_vlm_predictions(features, head_spec["model_config"]["vlm_branch_mode"]).numpy(),
        "head": head_output.argmax(-1).numpy(),
        "fused": fused_logits(gate, head_output, vlm_scores).argmax(-1).numpy(),
    }


def plot_confusion_matrices(labels, predicted: dict[str, np.ndarray], class_names: list[str], title: str, path):
    """One confusion-matrix panel per branch, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(3.5, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(1, len(predicted), figsize=(size * len(predicted), size), squeeze=False)
    for ax, (branch, branch_predictions) in zip(axes[0], predicted.items()):
        ConfusionMatrixDisplay.from_predictions(
            labels,
            branch_predictions,
            labels=list(range(len(class_names))),
            display_labels=class_names,
            ax=ax,
            colorbar=False,
            xticks_rotation=45,
        )
        ax.set_title(f"{BRANCH_TITLES[branch]}\nacc {np.mean(branch_predictions == labels):.3f}")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(run_args, args: EvaluateArguments) -> dict:
    head_spec = read_head_spec(run_args.run_dir)
    stage_run = begin_stage(run_args, args, STAGE, fingerprint, class_names=head_spec["class_names"])
    accelerator, data = stage_run.accelerator, stage_run.data
    class_names = data.class_names
    splits = [split for split in args.splits if split in data.splits]
    if not splits:
        raise DataError(f"None of the splits {args.splits} exists in {data.root!r} (found {list(data.splits)})")

    cache = FeatureCache(accelerator, run_args.run_dir, data, args.feature_batch_size, run_args.num_workers)
    features = cache.get(head_spec, splits, upstream_fingerprint(run_args.run_dir, "teacher", STAGE))
    head = load_head(run_args.run_dir)
    gate, gate_spec = load_gate(run_args.run_dir)

    train_labels = data.splits["train"]["label"]
    results = {
        "class_names": class_names,
        "gate_type": gate_spec["gate_type"],
        "vlm": spec_vlm(run_args.run_dir, head_spec),
        "unreadable_images": data.bad_images,
        "splits": {},
    }
    predicted = {}
    for split in splits:
        labels = features[split]["labels"].numpy()
        predicted[split] = predictions(features[split], head_spec, head, gate, gate_spec)
        results["splits"][split] = {
            "num_examples": int(len(labels)),
            "majority_baseline_accuracy": majority_baseline(train_labels, labels),
            **{
                branch: classification_metrics(labels, branch_predictions, class_names, per_class=True)
                for branch, branch_predictions in predicted[split].items()
            },
        }
        summary = {
            f"{split}/{branch}/{metric}": results["splits"][split][branch][metric]
            for branch in BRANCHES
            for metric in ("accuracy", "macro_f1")
        }
        accelerator.log({f"eval/{key}": value for key, value in summary.items()})
        logger.info(f"Evaluation on {split}: {summary}")

    def save_results(output):
        output.mkdir(parents=True, exist_ok=True)
        for split, branch_predictions in predicted.items():
            labels = features[split]["labels"].numpy()
            title = f"{split} ({len(labels)} images)"
            plot_confusion_matrices(labels, branch_predictions, class_names, title, output / f"confusion_{split}.png")
        (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")

    output = complete_stage(stage_run, save_results, results=RESULTS_FILE)
    return {"stage": STAGE, "output": str(output), "results": results}


__all__ = ["ARGUMENTS", "STAGE", "EvaluateArguments", "fingerprint", "predictions", "run"]
