"""Classify images with an EmoVLM-KD model: the pipeline, then the model itself with every branch's output.

    python examples/inference.py                               # a tiny random model built offline, generated images
    python examples/inference.py MODEL --images a.jpg b.png --top-k 3

MODEL is a model folder or Hub repo id (e.g. one written by `train/export.py`). The model code ships with the model
(`trust_remote_code=True`); this script needs only transformers, torch and pillow unless it builds the tiny model.
For many images (a folder, a file list or any `datasets` source, on several GPUs, resumable), see
`train/predict.py`.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model folder or Hub repo id (default: a tiny random model)")
    parser.add_argument("--images", nargs="+", help="image files (default: a few generated images)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-json", help="also write the results to this file")
    return parser.parse_args()


def build_tiny_model_folder(folder: Path) -> str:
    """A tiny random-weight model saved as a model folder, built offline (its predictions mean nothing)."""
    from emovlm_kd.tiny import save_tiny_model_folder

    return save_tiny_model_folder(folder, ["negative", "neutral", "positive"])


def generate_images(folder: Path) -> list[str]:
    """Images of different sizes, modes and formats: the image processor handles all of them."""
    rng = np.random.default_rng(0)
    images = {
        "red.png": Image.new("RGB", (160, 120), (210, 40, 40)),
        "grey_gradient.jpg": Image.linear_gradient("L").resize((200, 200)),
        "noise.png": Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),
        "tall_green.jpg": Image.new("RGB", (60, 240), (30, 160, 60)),
        "palette.gif": Image.new("RGB", (100, 100), (40, 60, 200)).quantize(16),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(str(folder / name))
    return paths


def top_k(labels: list[str], probabilities: torch.Tensor, k: int) -> list[tuple[str, float]]:
    scores, indices = probabilities.topk(min(k, len(labels)))
    return [(labels[i], s) for s, i in zip(scores.tolist(), indices.tolist())]


def describe(ranked: list[tuple[str, float]]) -> str:
    return ", ".join(f"{label} {score:.3f}" for label, score in ranked)


def main():
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="emovlm-kd-inference-"))
    model_path = args.model or build_tiny_model_folder(workdir / "model")
    image_paths = args.images or generate_images(workdir)
    names = [Path(path).name for path in image_paths]

    # 1. The pipeline: one line, batched, top-k. Returns [{"label", "score"}, ...] per image, best first.
    classifier = pipeline("image-classification", model=model_path, trust_remote_code=True, device=args.device)
    pipeline_results = classifier(image_paths, top_k=args.top_k, batch_size=args.batch_size)
    print(f"== pipeline (top {args.top_k}, batch size {args.batch_size})")
    for name, result in zip(names, pipeline_results):
        print(f"{name:>20}: " + ", ".join(f"{r['label']} {r['score']:.3f}" for r in result))

    # 2. The model itself: the same fused prediction plus each branch and the gate's weights.
    model = AutoModelForImageClassification.from_pretrained(model_path, trust_remote_code=True)
    model.to(args.device).eval()
    image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    outputs = []
    with torch.inference_mode():
        starts = range(0, len(image_paths), args.batch_size)
        for start in tqdm(starts, desc="Model batches", disable=len(starts) < 3):
            inputs = image_processor(image_paths[start : start + args.batch_size], return_tensors="pt")
            outputs.append(model(**inputs.to(args.device)))
    fused = torch.cat([out.logits for out in outputs]).float().softmax(-1).cpu()
    vlm = torch.cat([out.vlm_scores for out in outputs]).float().cpu()  # what the gate sees of the VLM branch
    head = torch.cat([out.head_logits for out in outputs]).float().softmax(-1).cpu()
    gate_weights = None if outputs[0].gate_weights is None else torch.cat([out.gate_weights for out in outputs])

    print(f"\n== model outputs (gate: {model.config.gate_type}, VLM branch: {model.config.vlm_branch_mode})")
    results = []
    for row, name in enumerate(names):
        record = {
            "image": name,
            "fused": top_k(labels, fused[row], args.top_k),
            "vlm_branch": top_k(labels, vlm[row], args.top_k),
            "distilled_head": top_k(labels, head[row], args.top_k),
            "gate_weights": None if gate_weights is None else gate_weights[row].float().tolist(),
        }
        results.append(record)
        print(f"{name:>20}: fused   {describe(record['fused'])}")
        print(f"{'':>20}  VLM     {describe(record['vlm_branch'])}")
        print(f"{'':>20}  head    {describe(record['distilled_head'])}")
        if gate_weights is not None:
            print(f"{'':>20}  gate weights {np.round(record['gate_weights'], 3).tolist()}")
    if gate_weights is None:
        print(f"(the {model.config.gate_type} gate has no per-image weights; see its parameters in `model.gate`)")

    # The pipeline is the model's fused output, softmaxed: both paths agree.
    difference = max(
        abs(entry["score"] - fused[row, model.config.label2id[entry["label"]]].item())
        for row, result in enumerate(pipeline_results)
        for entry in result
    )
    print(f"\npipeline and model agree: max probability difference {difference:.2e}")
    if args.output_json:
        summary = {"labels": labels, "pipeline": pipeline_results, "model": results, "max_difference": difference}
        Path(args.output_json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
