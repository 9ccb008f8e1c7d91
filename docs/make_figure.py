"""Draw the method figure of the README and the docs site: `python docs/make_figure.py` writes docs/method.png."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "method.png"
COLOURS = {"input": "#eceff1", "vlm": "#c5cae9", "head": "#ffe0b2", "gate": "#c8e6c9", "train": "#f5f5f5"}


def box(ax, x, y, width, height, text, colour, size=11, weight="normal", style="solid"):
    patch = FancyBboxPatch(
        (x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=colour,
        edgecolor="#37474f", linewidth=1.3, linestyle=style,
    )
    ax.add_patch(patch)
    ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=size, weight=weight, wrap=True)


def arrow(ax, start, end, text=None, style="solid", offset=(0, 0.17)):
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.4, color="#37474f",
                        linestyle=style, shrinkA=2, shrinkB=2)
    )
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, ha="center",
                va="bottom", fontsize=9.5, color="#37474f")


def draw():
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 22)
    ax.set_ylim(0, 10.4)
    ax.axis("off")

    title = "EmoVLM-KD at inference: one vision pass, two branches, a gate"
    ax.text(0.1, 10.0, title, fontsize=13, weight="bold", va="center")
    box(ax, 0.2, 5.2, 2.6, 2.0, "image", COLOURS["input"], size=12)
    box(ax, 3.7, 5.2, 3.6, 2.0, "VLM visual\nencoder\n(frozen, runs once)", COLOURS["vlm"], size=11)
    scoring = "VLM language model\n(prompt + image embeddings)\nexact log-likelihood of\n"
    scoring += "{'emotion': '<label>'} per class"
    box(ax, 8.4, 7.0, 4.8, 2.2, scoring, COLOURS["vlm"], size=9.8)
    box(ax, 8.4, 3.1, 4.8, 2.2, "distilled head\nmean-pool → MLP\n(d → 1024 → C)", COLOURS["head"], size=11)
    box(ax, 14.3, 5.2, 3.0, 2.0, "gate\n(concat_linear\nor 4 others)", COLOURS["gate"], size=11)
    box(ax, 18.3, 5.2, 3.5, 2.0, "emotion\nscores\n(C classes)", COLOURS["gate"], size=12, weight="bold")

    arrow(ax, (2.8, 6.2), (3.7, 6.2))
    arrow(ax, (7.3, 6.6), (8.4, 8.0))
    ax.text(5.6, 7.75, "image\nembeddings", ha="center", fontsize=9.5, color="#37474f")
    arrow(ax, (7.3, 5.8), (8.4, 4.3))
    arrow(ax, (13.2, 8.1), (14.3, 6.8), "VLM class\nprobabilities", offset=(0.9, 0.2))
    arrow(ax, (13.2, 4.2), (14.3, 5.6), "head logits", offset=(1.0, -0.75))
    arrow(ax, (17.3, 6.2), (18.3, 6.2))

    teacher = "ViT teacher (training only)\nknowledge distillation:\nKL(teacher ‖ head) + CE"
    box(ax, 8.4, 0.55, 4.8, 1.7, teacher, COLOURS["train"], size=10, style="dashed")
    arrow(ax, (10.8, 2.25), (10.8, 3.1), style="dashed")

    ax.text(14.3, 3.2, "Training, one script per stage:", fontsize=10.5, weight="bold")
    stages = [
        "0  instruction data (a chat VLM explains each image)",
        "1  LoRA instruction tuning of the VLM",
        "2  teacher (any timm model)",
        "3  distillation on cached features",
        "4  gate on cached features",
        "5  evaluation   6  export to a Hub repo",
    ]
    for row, stage in enumerate(stages):
        ax.text(14.3, 2.6 - row * 0.45, stage, fontsize=9.5, va="center", family="DejaVu Sans")
    fig.tight_layout(pad=0.2)
    fig.savefig(OUTPUT, dpi=150)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    draw()
