"""Stage 5: calibrate the fused scores on val, then evaluate the teacher, the VLM branch, the distilled head and the
fused model on val and test.

First, temperature scaling: one temperature for the fused logits, fitted on the validation split only (never on
test; skipped with a warning when val is missing, under `calibration_min_images` images or a single class, or with
`--temperature-scaling false`); it is recorded in `results.json` and export stores it in the model's config
(`calibration_temperature`). Each branch's own temperature is reported, not applied (the gate sees the raw
branches). Then per branch and split: accuracy and macro-F1 (scikit-learn), overall and per class, next to the
majority-class baseline; ECE, max calibration error, NLL and Brier score before and after scaling
(`emovlm_kd.calibration`); the fused model's accuracy at 100/90/80/50 % coverage. From the feature cache of stage 3
(computed here if missing). Writes `<run_dir>/eval/results.json`, one confusion-matrix PNG per split
(`confusion_<split>.png`, one panel per branch) and one reliability diagram per split and branch
(`reliability_<split>_<branch>.png`, before and after scaling).
"""

import json
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

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
from emovlm_kd.calibration import (
    MIN_CALIBRATION_IMAGES,
    TEMPERATURE_BOUNDS,
    calibration_metrics,
    check_finite,
    fit_temperature,
    plot_reliability,
    reliability_bins,
    risk_coverage,
    skip_reason,
)
from emovlm_kd.metrics import BRANCH_TITLES, BRANCHES, classification_metrics, majority_baseline
from emovlm_kd.run_dir import RESULTS_FILE, DataError, hash_json, upstream_fingerprint
from emovlm_kd.settings import CARD, NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage

logger = logging.getLogger(__name__)

STAGE = "evaluate"


@dataclass
class EvaluateArguments:
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "splits": RESULT,
        "feature_batch_size": NOTHING,
        "temperature_scaling": RESULT | CARD,  # the fitted temperature reaches the exported config
        "calibration_min_images": RESULT,
    }

    splits: list[str] = field(
        default_factory=lambda: ["val", "test"], metadata={"help": "Splits to evaluate (those that exist)"}
    )
    feature_batch_size: int = field(default=8, metadata={"help": "Images per VLM forward if features are not cached"})
    temperature_scaling: bool = field(
        default=True,
        metadata={
            "help": "Fit a temperature for the fused scores on the validation split (stored in the exported model's "
            "config); false: the scores stay the gate's raw softmax (temperature 1.0)"
        },
    )
    calibration_min_images: int = field(
        default=MIN_CALIBRATION_IMAGES,
        metadata={"help": "Fewest validation images to fit a temperature on (fewer: scaling skipped, with a warning)"},
    )


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


def branch_scores(features: dict, head_spec: dict, head, gate, gate_spec: dict) -> dict[str, torch.Tensor]:
    """Each branch's raw class scores (logits; the VLM's answer log-likelihoods) from a split's cached features. The
    VLM branch is left out in the `generate` mode: its one-hot answers carry no confidence to calibrate."""
    head_output, vlm_scores = gate_inputs(head, features, head_spec, gate_spec)
    scores = {
        "teacher": features["teacher_logits"].float(),
        "head": head_output,
        "fused": fused_logits(gate, head_output, vlm_scores),
    }
    if head_spec["model_config"]["vlm_branch_mode"] == "score":
        scores["vlm"] = features["vlm_log_likelihoods"].float()
    for branch, logits in scores.items():
        try:
            check_finite(logits, f"{BRANCH_TITLES[branch]}'s scores")
        except ValueError as error:
            raise DataError(str(error)) from None
    return {branch: scores[branch] for branch in BRANCHES if branch in scores}


def fit_calibration(args: EvaluateArguments, val_scores: dict | None, val_labels, class_names: list[str]) -> dict:
    """The temperatures fitted on the validation split: the fused model's (which the exported model applies) and every
    branch's (reported only). Temperature 1.0, with the reason, when scaling is off or val cannot support a fit."""
    if not args.temperature_scaling:
        reason = "turned off (--temperature-scaling false)"
        logger.info(f"Temperature scaling {reason}: the fused scores stay the gate's raw softmax")
    else:
        reason = skip_reason(val_labels, class_names, args.calibration_min_images)
        if reason:
            logger.warning(f"Temperature scaling skipped: {reason}; the fused scores stay the gate's raw softmax")
    if reason:
        return {"fitted_on": None, "skipped": reason, "temperature": 1.0, "branch_temperatures": {}}
    temperatures = {branch: fit_temperature(logits, val_labels) for branch, logits in val_scores.items()}
    low, high = TEMPERATURE_BOUNDS
    at_bound = [branch for branch, value in temperatures.items() if not low * 1.01 < value < high * 0.99]
    if at_bound:
        logger.warning(f"The temperature of {at_bound} reached its bounds {TEMPERATURE_BOUNDS} (a too easy val split?)")
    logger.info(f"Temperature scaling on val ({len(val_labels)} images): {temperatures}")
    return {
        "fitted_on": "val",
        "num_examples": int(len(val_labels)),
        "skipped": None,
        "temperature": temperatures["fused"],
        "branch_temperatures": temperatures,
    }


def calibration_results(scores: dict[str, torch.Tensor], labels, calibration: dict) -> dict[str, dict]:
    """Per branch: its temperature (1.0 when none was fitted) and its calibration metrics before and after it."""
    results = {}
    for branch, logits in scores.items():
        temperature = calibration["branch_temperatures"].get(branch, 1.0)
        results[branch] = {
            "temperature": temperature,
            "before": calibration_metrics(logits, labels),
            "after": calibration_metrics(logits, labels, temperature),
        }
    return results


def plot_reliability_diagrams(labels, scores: dict, split_results: dict, title: str, output, split: str):
    """`reliability_<split>_<branch>.png`: each branch's reliability diagram before and after its temperature."""
    for branch, logits in scores.items():
        calibration = split_results[branch]["calibration"]
        before = {**reliability_bins(logits, labels), "ece": calibration["before"]["ece"]}
        after = {**reliability_bins(logits, labels, calibration["temperature"]), "ece": calibration["after"]["ece"]}
        name = f"{BRANCH_TITLES[branch]}, {title}"
        plot_reliability(before, after, calibration["temperature"], name, output / f"reliability_{split}_{branch}.png")


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
    has_val = "val" in data.splits and len(data.splits["val"]) > 0

    cache = FeatureCache(accelerator, run_args.run_dir, data, args.feature_batch_size, run_args.num_workers)
    features = cache.get(
        head_spec,
        list(dict.fromkeys(splits + (["val"] if has_val else []))),  # val for the temperature, even if not evaluated
        upstream_fingerprint(run_args.run_dir, "teacher", STAGE),
    )
    head = load_head(run_args.run_dir)
    gate, gate_spec = load_gate(run_args.run_dir)
    scores = {split: branch_scores(features[split], head_spec, head, gate, gate_spec) for split in features}
    calibration = fit_calibration(
        args, scores.get("val"), features["val"]["labels"].numpy() if has_val else None, class_names
    )

    train_labels = data.splits["train"]["label"]
    results = {
        "class_names": class_names,
        "gate_type": gate_spec["gate_type"],
        "vlm": spec_vlm(run_args.run_dir, head_spec),
        "unreadable_images": data.bad_images,
        "calibration": calibration,
        "splits": {},
    }
    predicted = {}
    for split in splits:
        labels = features[split]["labels"].numpy()
        predicted[split] = predictions(features[split], head_spec, head, gate, gate_spec)
        results["splits"][split] = split_results = {
            "num_examples": int(len(labels)),
            "majority_baseline_accuracy": majority_baseline(train_labels, labels),
            **{
                branch: classification_metrics(labels, branch_predictions, class_names, per_class=True)
                for branch, branch_predictions in predicted[split].items()
            },
            "risk_coverage": risk_coverage(scores[split]["fused"] / calibration["temperature"], labels),
        }
        for branch, values in calibration_results(scores[split], labels, calibration).items():
            split_results[branch]["calibration"] = values
        summary = {
            f"{split}/{branch}/{metric}": split_results[branch][metric]
            for branch in BRANCHES
            for metric in ("accuracy", "macro_f1")
        }
        calibrated = split_results["fused"]["calibration"]["after"]
        summary.update({f"{split}/fused/{key}_calibrated": calibrated[key] for key in ("ece", "nll", "brier")})
        accelerator.log({f"eval/{key}": value for key, value in summary.items()})
        logger.info(f"Evaluation on {split}: {summary}")

    def save_results(output):
        output.mkdir(parents=True, exist_ok=True)
        for split, branch_predictions in predicted.items():
            labels = features[split]["labels"].numpy()
            title = f"{split} ({len(labels)} images)"
            plot_confusion_matrices(labels, branch_predictions, class_names, title, output / f"confusion_{split}.png")
            plot_reliability_diagrams(labels, scores[split], results["splits"][split], title, output, split)
        (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")

    output = complete_stage(
        stage_run, save_results, results=RESULTS_FILE, calibration_temperature=calibration["temperature"]
    )
    return {"stage": STAGE, "output": str(output), "results": results}


__all__ = [
    "ARGUMENTS",
    "STAGE",
    "EvaluateArguments",
    "branch_scores",
    "calibration_results",
    "fingerprint",
    "fit_calibration",
    "predictions",
    "run",
]
