"""Honest class scores: temperature scaling, calibration metrics, reliability diagrams and selective prediction.

Temperature scaling (Guo et al., ICML 2017) divides a classifier's logits by one number `T`, fitted by minimising the
negative log-likelihood on held-out data: the predicted class never changes, only how confident the scores are.
Calibration is measured with `torchmetrics` (`multiclass_calibration_error`: expected calibration error over 15
equal-width confidence bins, L1, and the maximum calibration error), the negative log-likelihood
(`torch.nn.functional.cross_entropy`) and the multi-class Brier score (mean over images of the squared distance
between the probability vector and the one-hot label). Stage 5 (`emovlm_kd.stages.evaluate`) uses all of this.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15
MIN_CALIBRATION_IMAGES = 20
# The fitted temperature is kept within these bounds: on a perfectly separated validation split the likelihood keeps
# rising as T -> 0, and a temperature of 0 would make every score 0 or 1.
TEMPERATURE_BOUNDS = (0.05, 20.0)
COVERAGES = (1.0, 0.9, 0.8, 0.5)
CALIBRATION_METRICS = {
    "ece": "ECE",
    "mce": "max CE",
    "nll": "NLL",
    "brier": "Brier",
}


def check_finite(logits: torch.Tensor, name: str = "logits"):
    """`ValueError` naming `name` when `logits` hold NaN or infinite values (nothing can be calibrated from them)."""
    bad = int((~torch.isfinite(torch.as_tensor(logits))).sum())
    if bad:
        raise ValueError(
            f"{name}: {bad} non-finite value(s) (NaN or inf) among {torch.as_tensor(logits).numel()}; the scores "
            "cannot be calibrated or measured (a diverged model, or a wrong dtype?)"
        )


def skip_reason(labels, class_names: list[str], min_images: int = MIN_CALIBRATION_IMAGES) -> str | None:
    """Why a temperature cannot be fitted soundly on a validation split with these `labels` (None: it can)."""
    if labels is None:
        return "there is no validation split (a temperature is never fitted on the test split)"
    labels = np.asarray(labels)
    if len(labels) < min_images:
        return f"the validation split has {len(labels)} images, fewer than {min_images}"
    present = np.unique(labels)
    if len(present) < 2:
        name = class_names[int(present[0])] if len(present) else "none"
        return f"the validation split holds a single class ({name})"
    return None


def fit_temperature(logits: torch.Tensor, labels) -> float:
    """The temperature `T` within `TEMPERATURE_BOUNDS` minimising the NLL of `softmax(logits / T)` on `labels`.

    A bounded 1-D search on `log T` (scipy's Brent method, deterministic). The NLL is convex in `1 / T`, hence has a
    single minimum along `log T`; unlike a gradient method, the search also moves where the gradient vanishes (a
    validation split the logits already separate with a wide margin)."""
    from scipy.optimize import minimize_scalar

    check_finite(logits)
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(np.asarray(labels)).long()

    def nll(log_temperature: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_temperature), labels))

    bounds = tuple(math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-6})
    best = min((result.x, *bounds), key=nll)  # the search never evaluates the bounds themselves
    return float(math.exp(best))


def calibration_metrics(logits: torch.Tensor, labels, temperature: float = 1.0) -> dict[str, float]:
    """ECE (15 bins, L1) and max calibration error (`torchmetrics`), NLL and multi-class Brier score of
    `softmax(logits / temperature)`; `accuracy` for reference."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits = torch.as_tensor(logits).detach().double().cpu() / temperature
    labels = torch.as_tensor(np.asarray(labels)).long()
    probabilities = logits.softmax(-1)
    num_classes = logits.shape[-1]
    one_hot = F.one_hot(labels, num_classes).double()
    return {
        "ece": float(multiclass_calibration_error(probabilities, labels, num_classes, n_bins=ECE_BINS, norm="l1")),
        "mce": float(multiclass_calibration_error(probabilities, labels, num_classes, n_bins=ECE_BINS, norm="max")),
        "nll": float(F.cross_entropy(logits, labels)),
        "brier": float(((probabilities - one_hot) ** 2).sum(-1).mean()),
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
    }


def reliability_bins(logits: torch.Tensor, labels, temperature: float = 1.0, n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin (equal width, as `torchmetrics` bins them): image count, mean confidence and accuracy of
    `softmax(logits / temperature)`'s top class. Empty bins have NaN confidence and accuracy."""
    probabilities = (torch.as_tensor(logits).detach().double().cpu() / temperature).softmax(-1)
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == torch.as_tensor(np.asarray(labels)).long()).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins).double()
    with np.errstate(invalid="ignore"):
        mean_confidence = (torch.bincount(index, confidence, minlength=n_bins) / counts).numpy()
        accuracy = (torch.bincount(index, correct, minlength=n_bins) / counts).numpy()
    return {"edges": edges.numpy(), "counts": counts.numpy().astype(int), "confidence": mean_confidence,
            "accuracy": accuracy}  # fmt: skip


def risk_coverage(logits: torch.Tensor, labels, coverages=COVERAGES) -> list[dict]:
    """Selective prediction: for each coverage, the accuracy on the most confident fraction of the images (the least
    confident withheld) and the score threshold (`min_score`) that keeps them."""
    confidence, predicted = torch.as_tensor(logits).detach().double().cpu().softmax(-1).max(-1)
    correct = (predicted == torch.as_tensor(np.asarray(labels)).long()).numpy()
    order = np.argsort(-confidence.numpy(), kind="stable")
    rows = []
    for coverage in coverages:
        kept = order[: max(1, math.ceil(coverage * len(order)))]
        rows.append(
            {
                "coverage": coverage,
                "num_examples": int(len(kept)),
                "accuracy": float(correct[kept].mean()),
                "min_score": float(confidence[kept].min()),
            }
        )
    return rows


def plot_reliability(before: dict, after: dict, temperature: float, title: str, path):
    """A reliability diagram PNG: accuracy against confidence per bin (the diagonal is perfect calibration) over the
    bin counts, before and after temperature scaling side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a fixed layout: tight_layout would double the drawing time of these small figures (8 of them per evaluation)
    figure, axes = plt.subplots(
        2, 2, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08, "wspace": 0.25}
    )
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.09, top=0.88)
    for column, (name, bins) in enumerate((("before (T = 1)", before), (f"after (T = {temperature:.3g})", after))):
        edges, width = bins["edges"], 1 / (len(bins["edges"]) - 1)
        top, bottom = axes[0][column], axes[1][column]
        accuracy = np.nan_to_num(bins["accuracy"])
        top.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
        gap = np.nan_to_num(bins["confidence"]) - accuracy
        top.bar(edges[:-1], gap, bottom=accuracy, width=width, align="edge", color="tab:red", alpha=0.3,
                edgecolor="tab:red", label="gap to confidence")  # fmt: skip
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}, ECE {bins['ece']:.3f}")
        bottom.bar(edges[:-1], bins["counts"], width=width, align="edge", color="gray", edgecolor="black")
        bottom.set(xlabel="confidence (top class score)", ylabel="images")
    axes[0][0].legend(loc="upper left", fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def calibration_table(results: dict, split: str) -> str:
    """Markdown table of stage 5's calibration metrics on `split`: per branch, before and after temperature scaling
    (the fused model's temperature is the one applied; the others are reported only)."""
    from emovlm_kd.metrics import BRANCH_TITLES

    names = list(CALIBRATION_METRICS.values())
    header = "| model | T | " + " | ".join(f"{name} before | {name} after" for name in names) + " |"
    lines = [header, "|---|---:|" + "---:|" * (2 * len(names))]
    for branch, title in BRANCH_TITLES.items():
        calibration = results["splits"][split].get(branch, {}).get("calibration")
        if not calibration:
            continue
        cells = [
            f"{calibration['before'][key]:.4f} | {calibration['after'][key]:.4f}" for key in CALIBRATION_METRICS
        ]
        lines.append(f"| {title} | {calibration['temperature']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def risk_coverage_table(results: dict) -> str:
    """Markdown table of the fused model's accuracy at each coverage, per split, with the `min_score` that keeps it."""
    splits = [split for split, values in results["splits"].items() if "risk_coverage" in values]
    header = "| coverage | " + " | ".join(f"{split} accuracy | {split} min_score" for split in splits) + " |"
    lines = [header, "|---:|" + "---:|" * (2 * len(splits))]
    for index, coverage in enumerate(COVERAGES):
        cells = []
        for split in splits:
            row = results["splits"][split]["risk_coverage"][index]
            cells.append(f"{row['accuracy']:.4f} | {row['min_score']:.4f}")
        lines.append(f"| {coverage:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "CALIBRATION_METRICS",
    "COVERAGES",
    "ECE_BINS",
    "MIN_CALIBRATION_IMAGES",
    "TEMPERATURE_BOUNDS",
    "calibration_metrics",
    "calibration_table",
    "check_finite",
    "fit_temperature",
    "plot_reliability",
    "reliability_bins",
    "risk_coverage",
    "risk_coverage_table",
    "skip_reason",
]
