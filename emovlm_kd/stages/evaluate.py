"""Stage 5: evaluate the teacher, the VLM branch, the distilled head and the fused model on val and test.

Accuracy and macro-F1 (scikit-learn), overall and per class, next to the majority-class baseline; from the feature
cache of stage 3 (computed here if missing). Writes `<run_dir>/eval/results.json` and one confusion-matrix PNG per
split (`confusion_<split>.png`, one panel per model).
"""

import argparse
import json
import logging
import sys

import numpy as np

from emovlm_kd.cache import get_features, vlm_predictions
from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.data import stage_output, write_complete
from emovlm_kd.metrics import classification_metrics, majority_baseline
from emovlm_kd.stages import (
    add_run_args,
    dataset_fingerprint,
    finish_stage,
    load_run_data,
    make_accelerator,
    start_stage,
    upstream_fingerprint,
)
from emovlm_kd.stages.distill import load_head, read_spec
from emovlm_kd.stages.gate import fused_logits, gate_inputs, load_gate

logger = logging.getLogger(__name__)

STAGE = "evaluate"
RESULTS_FILE = "results.json"
MODELS = ("teacher", "vlm", "head", "fused")
MODEL_TITLES = {
    "teacher": "Teacher (timm)",
    "vlm": "VLM branch",
    "head": "Distilled head",
    "fused": "EmoVLM-KD (fused)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(parser)
    parser.add_argument("--splits", nargs="+", default=["val", "test"], help="Splits to evaluate (those that exist)")
    parser.add_argument("--feature-batch-size", type=int, default=8, help="Images per VLM forward if not cached")
    return parser


def fingerprint(args) -> str:
    return hash_of(
        {
            "stage": STAGE,
            "data": dataset_fingerprint(args),
            "teacher": upstream_fingerprint(args.run_dir, "teacher", STAGE),
            "gate": upstream_fingerprint(args.run_dir, "gate", STAGE),
            "splits": args.splits,
        }
    )


def predictions(features: dict, spec: dict, head, gate, gate_config: dict) -> dict[str, np.ndarray]:
    """Predicted class per image of each model, from a split's cached features."""
    head_out, vlm_scores = gate_inputs(head, features, spec, gate_config)
    return {
        "teacher": features["teacher_logits"].argmax(-1).numpy(),
        "vlm": vlm_predictions(features, spec["model_config"]["vlm_branch_mode"]).numpy(),
        "head": head_out.argmax(-1).numpy(),
        "fused": fused_logits(gate, head_out, vlm_scores).argmax(-1).numpy(),
    }


def plot_confusion_matrices(labels, predicted: dict[str, np.ndarray], class_names: list[str], title: str, path):
    """One confusion-matrix panel per model, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(3.5, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(1, len(predicted), figsize=(size * len(predicted), size), squeeze=False)
    for ax, (model, preds) in zip(axes[0], predicted.items()):
        ConfusionMatrixDisplay.from_predictions(
            labels, preds, labels=list(range(len(class_names))), display_labels=class_names, ax=ax, colorbar=False,
            xticks_rotation=45,
        )  # fmt: skip
        ax.set_title(f"{MODEL_TITLES[model]}\nacc {np.mean(preds == labels):.3f}")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(args) -> dict:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args, STAGE)
    set_seed(args.seed)
    spec = read_spec(args.run_dir)
    data = load_run_data(args, accelerator, class_names=spec["class_names"])
    stage_fingerprint = fingerprint(args)
    start_stage(accelerator, args.run_dir, STAGE)
    class_names = data.class_names
    splits = [split for split in args.splits if split in data.splits]
    if not splits:
        raise ValueError(f"None of the splits {args.splits} exists in {args.data_dir!r} (found {list(data.splits)})")

    features = get_features(
        accelerator, args.run_dir, data, spec, splits,
        teacher_fingerprint=upstream_fingerprint(args.run_dir, "teacher", STAGE),
        batch_size=args.feature_batch_size, num_workers=args.num_workers,
    )  # fmt: skip
    head = load_head(args.run_dir)
    gate, gate_config = load_gate(args.run_dir)

    output = stage_output(args.run_dir, STAGE)
    train_labels = data.splits["train"]["label"]
    results = {
        "class_names": class_names, "gate_type": gate_config["gate_type"], "vlm": spec["vlm"],
        "unreadable_images": data.bad_images, "splits": {},
    }  # fmt: skip
    for split in splits:
        labels = features[split]["labels"].numpy()
        predicted = predictions(features[split], spec, head, gate, gate_config)
        results["splits"][split] = {
            "num_examples": int(len(labels)),
            "majority_baseline_accuracy": majority_baseline(train_labels, labels),
            **{
                model: classification_metrics(labels, preds, class_names, per_class=True)
                for model, preds in predicted.items()
            },
        }
        summary = {
            f"{split}/{m}/{k}": results["splits"][split][m][k] for m in MODELS for k in ("accuracy", "macro_f1")
        }
        accelerator.log({f"eval/{k}": v for k, v in summary.items()})
        logger.info(f"Evaluation on {split}: {summary}")
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            plot_confusion_matrices(
                labels, predicted, class_names, f"{split} ({len(labels)} images)", output / f"confusion_{split}.png"
            )

    if accelerator.is_main_process:
        (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        write_complete(args.run_dir, STAGE, stage_fingerprint, results=str(output / RESULTS_FILE))
    finish_stage(accelerator, args, STAGE)
    return {"stage": STAGE, "output": str(output), "results": results}


def read_results(run_dir) -> dict:
    return json.loads((stage_output(run_dir, STAGE) / RESULTS_FILE).read_text())


def results_table(results: dict) -> str:
    """Markdown table: accuracy / macro-F1 per model and split."""
    splits = list(results["splits"])
    header = "| model | " + " | ".join(f"{s} accuracy | {s} macro-F1" for s in splits) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(splits))]
    for model in MODELS:
        cells = [
            f"{results['splits'][s][model]['accuracy']:.4f} | {results['splits'][s][model]['macro_f1']:.4f}"
            for s in splits
        ]
        lines.append(f"| {MODEL_TITLES[model]} | " + " | ".join(cells) + " |")
    baseline = [f"{results['splits'][s]['majority_baseline_accuracy']:.4f} | –" for s in splits]
    lines.append("| majority-class baseline | " + " | ".join(baseline) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = ["MODELS", "build_parser", "fingerprint", "predictions", "read_results", "results_table", "run"]
