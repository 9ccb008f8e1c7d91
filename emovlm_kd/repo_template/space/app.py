# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""Gradio demo of an EmoVLM-KD emotion classifier (a Hugging Face Space app, shipped in every exported model repo).

Upload an image: the app shows the fused prediction, the VLM branch and the distilled head side by side, and how
the gate combined them (each branch's contribution to the fused logits). "Explain" also asks the VLM for its own
reasoning about the image (or the key visual elements it sees), generated only when asked: the model's words, shown
verbatim, with the classes they name so that disagreement with the scores stands out.

    python app.py [MODEL] [--host 0.0.0.0] [--port 7860] [--max-new-tokens 256]

MODEL is a model folder or Hub repo id. Without it: `$EMOVLM_KD_MODEL`, then the model repo this file sits in
(next to `config.json` or one folder below it), then - when the `emovlm_kd` package is installed - a tiny random
model built offline (for trying the app; its predictions mean nothing).

As a Space: a Gradio Space holding this file and `requirements.txt`, with the Space variable `EMOVLM_KD_MODEL` set to
the model repo (and `HF_TOKEN` as a secret if that repo is private).

"About this model" shows how far its scores can be trusted: the calibration temperature in its config and, when
the model repo holds it (exported by the training pipeline), the fused model's reliability diagram.

Uploads are read by the model's own image processor (raster formats only, never PostScript or PDF; at most
`--max-image-pixels`, default `$EMOVLM_KD_MAX_IMAGE_PIXELS` or the processor's 40 megapixels, checked before decoding),
and Gradio refuses uploads above `--max-upload-mb` (default 32).
"""

import argparse
import html
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version checks

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402

MODEL_ENV = "EMOVLM_KD_MODEL"
MAX_IMAGE_PIXELS_ENV = "EMOVLM_KD_MAX_IMAGE_PIXELS"
TINY_LABELS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
HEAD, VLM = "distilled head", "VLM branch"
EXPLANATION_TASKS = {"inference": "its reasoning towards the emotion", "observation": "the key visual elements"}
# The fused model's reliability diagram in an exported repo: on the test split, else on val.
RELIABILITY_DIAGRAMS = ("reliability_test_fused.png", "reliability_val_fused.png")


def resolve_model(model: str | None = None) -> tuple[str, bool]:
    """`(model folder or repo id, is_tiny)`: the argument, `$EMOVLM_KD_MODEL`, this file's repo, or a tiny model."""
    model = model or os.environ.get(MODEL_ENV)
    if model:
        return model, False
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "config.json").is_file():
            return str(folder), False
    try:
        return build_tiny_model_folder(), True
    except ImportError:
        raise SystemExit(
            f"No model given: pass a model folder or Hub repo id (`python app.py MODEL`) or set ${MODEL_ENV}."
        ) from None


def build_tiny_model_folder(labels=TINY_LABELS) -> str:
    """Save a tiny random EmoVLM-KD (built offline by the `emovlm_kd` package) to a temporary model folder."""
    from emovlm_kd.tiny import save_tiny_model_folder  # ImportError when only the PyPI packages are installed

    return save_tiny_model_folder(tempfile.mkdtemp(prefix="emovlm-kd-tiny-model-"), labels)


def reliability_diagram(model: str) -> str | None:
    """A local path to the fused model's reliability diagram in the model folder or Hub repo, or None."""
    for name in RELIABILITY_DIAGRAMS:
        if Path(model).is_dir():
            if (Path(model) / name).is_file():
                return str(Path(model) / name)
            continue
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(model, name)
        except Exception:  # not in the repo (an older export), offline, no access: the app works without it
            continue
    return None


def about_markdown(config, diagram: str | None) -> str:
    """What the scores mean: the calibration temperature, and what the reliability diagram shows."""
    temperature = getattr(config, "calibration_temperature", 1.0)
    if temperature == 1.0:
        text = (
            "The scores are the softmax of the gate's output, **not calibrated** (no temperature was fitted: "
            "`calibration_temperature` is 1.0), so a score of 0.8 need not mean right 8 times in 10."
        )
    else:
        text = (
            f"The scores are **calibrated** by temperature scaling: the gate's logits are divided by "
            f"`calibration_temperature` = {temperature:.3f}, fitted on the validation split, so that a score of 0.8 "
            "means right about 8 times in 10 on data like it. The predicted class is the same either way; the "
            "branch panels show each branch's own, uncalibrated scores."
        )
    if diagram:
        text += (
            "\n\nReliability diagram of the fused model on held-out images: accuracy against confidence per bin "
            "(the diagonal is perfect calibration), before and after scaling, with the images per bin below."
        )
    return text


def about_section(config, diagram: str | None):
    """The "About this model" section (inside a `gr.Blocks`): the calibration, and the reliability diagram if any."""
    with gr.Accordion("About this model", open=False, elem_id="about"):
        gr.Markdown(about_markdown(config, diagram), elem_id="about-calibration")
        if diagram:
            gr.Image(diagram, label="Reliability of the fused scores", interactive=False, elem_id="reliability")


class EmotionPredictor:
    """The model, its image processor and a `__call__(image)` returning every branch's output for one image.

    `max_image_pixels` (default `$EMOVLM_KD_MAX_IMAGE_PIXELS`, else the image processor's own) bounds the images
    accepted; 0 lifts the limit. `max_new_tokens` (default the model config's) bounds an explanation.
    `reliability_diagram`: the fused model's reliability diagram from the model repo (None when it has none).
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_image_pixels: int | None = None,
        max_new_tokens: int | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageClassification.from_pretrained(model, trust_remote_code=True, dtype="auto")
        self.model.to(self.device).eval()
        # The processor (the model repo's remote code) decodes and prepares uploads: formats, pixel limit, resizing.
        self.image_processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=True)
        if max_image_pixels is None and os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip():
            max_image_pixels = int(os.environ[MAX_IMAGE_PIXELS_ENV])
        if max_image_pixels is not None:
            self.image_processor.max_image_pixels = max_image_pixels
        self.config = self.model.config
        self.labels = self.config.labels
        self.max_new_tokens = max_new_tokens or self.config.max_new_tokens
        self.reliability_diagram = reliability_diagram(model)  # shown under "About this model" when the repo has it

    @torch.inference_mode()
    def __call__(self, image, explain_task: str | None = None) -> dict:
        """Class probabilities of the fused output and of each branch, the gate's view, and the time taken, for an
        image file path or PIL image (a `ValueError` naming the file when it is refused).

        With `explain_task` (`"inference"` or `"observation"`), also the VLM's explanation (`explanation`, verbatim),
        the classes it names (`explanation_labels`) and its generation time, from the same vision pass: the scores
        are the same as without it.
        """
        start = time.perf_counter()
        inputs = self.image_processor([image], return_tensors="pt").to(self.device)  # decodes and prepares it
        out = self.model(**inputs, output_image_hidden_states=explain_task is not None)
        seconds = time.perf_counter() - start
        head_logits, vlm_scores = out.head_logits[0].float(), out.vlm_scores[0].float()
        gate_weights = None if out.gate_weights is None else out.gate_weights[0].float()
        # The VLM branch as a distribution: its answer likelihoods when scored (also when the gate sees a one-hot).
        if out.vlm_log_likelihoods is not None:
            vlm_probs = out.vlm_log_likelihoods[0].float().softmax(-1)
        else:
            vlm_probs = vlm_scores
        prediction = {
            "fused": out.logits[0].float().softmax(-1),
            "vlm": vlm_probs,
            "head": head_logits.softmax(-1),
            "logits": out.logits[0].float(),
            "contributions": branch_contributions(self.model, head_logits, vlm_scores, gate_weights),
            "gate_weights": gate_weights,
            "seconds": seconds,
            "device": self.device.type.upper(),
        }
        if explain_task is not None:
            start = time.perf_counter()
            text = self.model.explain(
                **inputs,
                task=explain_task,
                max_new_tokens=self.max_new_tokens,
                image_hidden_states=out.image_hidden_states,
            )[0]
            prediction.update(
                explanation=text,
                explanation_labels=self.config.labels_named_in(text),
                explanation_seconds=time.perf_counter() - start,
            )
        return prediction


def branch_contributions(model, head_logits, vlm_scores, gate_weights) -> dict | None:
    """Exact split of the fused logits into `head + vlm + bias` (each `(num_labels,)`), or None for the bilinear gate.
    Each part is divided by the model's calibration temperature, as the fused logits are.

    Every gate but the bilinear one is linear in each branch once its own weights are fixed. `concat_linear`
    (`fc(cat(head, vlm))`) and `moe` (its experts mixed by the routing weights) apply one `Linear(2C -> C)`, whose
    weight columns split into a head half and a VLM half; `dynamic_weighting` (`fc(w0 * head + w1 * vlm)`) and
    `cross_gating` (`fc(g1 * head + g2 * vlm)`) apply their output layer `fc` to the sum of the weighted branches.
    """
    gate, gate_type, num_labels = model.gate, model.config.gate_type, model.config.num_labels
    head_logits, vlm_scores = head_logits.float(), vlm_scores.float()
    temperature = getattr(model.config, "calibration_temperature", 1.0)
    if gate_type in ("dynamic_weighting", "cross_gating"):
        weight, bias = gate.fc.weight.detach().float(), gate.fc.bias.detach().float()
        return {
            "head": weight @ (gate_weights[0] * head_logits) / temperature,
            "vlm": weight @ (gate_weights[1] * vlm_scores) / temperature,
            "bias": bias / temperature,
        }
    if gate_type == "concat_linear":
        weight, bias = gate.fc.weight.detach().float(), gate.fc.bias.detach().float()
    elif gate_type == "moe":
        weight = sum(w * expert.weight.detach().float() for w, expert in zip(gate_weights, gate.experts))
        bias = sum(w * expert.bias.detach().float() for w, expert in zip(gate_weights, gate.experts))
    else:
        return None
    return {
        "head": weight[:, :num_labels] @ head_logits / temperature,
        "vlm": weight[:, num_labels:] @ vlm_scores / temperature,
        "bias": bias / temperature,
    }


def as_label(labels: list[str], values: torch.Tensor) -> dict[str, float]:
    return {label: float(value) for label, value in zip(labels, values.tolist())}


def gate_summary(prediction: dict) -> dict[str, float] | None:
    """Each branch's share of the absolute contribution to the predicted class's fused logit."""
    parts = prediction["contributions"]
    if parts is None:
        return None
    winner = int(prediction["fused"].argmax())
    head, vlm = abs(float(parts["head"][winner])), abs(float(parts["vlm"][winner]))
    total = head + vlm
    return {HEAD: head / total, VLM: vlm / total} if total > 0 else {HEAD: 0.5, VLM: 0.5}


def markdown_text(text: str) -> str:
    """`text` (a class name: data) shown literally in Markdown and in a table cell: HTML and Markdown characters
    escaped (a `|` would shift a table's columns), line breaks as spaces."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", html.escape(" ".join(str(text).split())))


def gate_markdown(prediction: dict, labels: list[str], gate_type: str) -> str:
    """The gate's own weights (when it has any) and a per-class table of the fused logit's parts."""
    labels = [markdown_text(label) for label in labels]
    fused, parts, weights = prediction["fused"], prediction["contributions"], prediction["gate_weights"]
    winner = int(fused.argmax())
    lines = [f"**Gate:** `{gate_type}`, prediction **{labels[winner]}** ({float(fused[winner]):.1%})."]
    if gate_type == "dynamic_weighting":
        lines.append(f"Per-image weights: {HEAD} {float(weights[0]):.3f}, {VLM} {float(weights[1]):.3f}.")
    elif gate_type == "moe":
        routing = ", ".join(f"expert {index + 1} {float(weight):.3f}" for index, weight in enumerate(weights))
        lines.append(f"Expert routing: {routing}.")
    elif gate_type == "cross_gating":
        lines.append(
            f"Mean per-class gate: on the {HEAD} {float(weights[0].mean()):.3f}, "
            f"on the {VLM} {float(weights[1].mean()):.3f}."
        )
    if parts is None:
        lines.append("The bilinear gate multiplies the two branches together, so its output has no per-branch split.")
        return "\n\n".join(lines)
    lines.append(f"Fused logit = from {HEAD} + from {VLM} + bias:")
    table = [
        f"| class | {HEAD} prob | {VLM} prob | from head | from VLM | bias | fused logit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for index, label in enumerate(labels):
        name = f"**{label}**" if index == winner else label
        table.append(
            f"| {name} | {float(prediction['head'][index]):.3f} | {float(prediction['vlm'][index]):.3f} "
            f"| {float(parts['head'][index]):+.3f} | {float(parts['vlm'][index]):+.3f} "
            f"| {float(parts['bias'][index]):+.3f} | {float(prediction['logits'][index]):+.3f} |"
        )
    lines.append("\n".join(table))
    lines.append(f"_{prediction['seconds'] * 1000:.0f} ms on {prediction['device']}._")
    return "\n\n".join(lines)


def explanation_markdown(prediction: dict, labels: list[str], task: str, max_new_tokens: int) -> str:
    """What to read the explanation as: the classes it names against the prediction, and what it cost."""
    predicted, named = labels[int(prediction["fused"].argmax())], prediction["explanation_labels"]
    predicted, named = markdown_text(predicted), [markdown_text(label) for label in named]
    if not named:
        check = "The text names no class."
    elif named == [predicted]:
        check = f"The text names **{predicted}**, the predicted class."
    else:
        check = f"⚠️ The text names {', '.join(f'**{label}**' for label in named)}; the model predicts **{predicted}**."
    return (
        f"{check} The VLM's own words ({EXPLANATION_TASKS[task]}), generated and shown verbatim: not ground truth."
        f"\n\n_{prediction['explanation_seconds'] * 1000:.0f} ms on {prediction['device']}, greedy, at most "
        f"{max_new_tokens} new tokens._"
    )


def make_example_images(folder: str | os.PathLike) -> list[str]:
    """A few procedurally drawn scenes (no files to ship, nothing to download)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size, rng = 224, np.random.default_rng(0)
    rows = np.linspace(0, 1, size)[:, None, None]

    def gradient(top, bottom):
        return Image.fromarray((np.array(top) * (1 - rows) + np.array(bottom) * rows).repeat(size, 1).astype(np.uint8))

    sunset = gradient((255, 140, 40), (90, 30, 120))
    ImageDraw.Draw(sunset).ellipse((80, 120, 144, 184), fill=(255, 220, 90))
    storm = gradient((40, 40, 50), (90, 90, 100))
    noise = rng.normal(0, 18, (size, size, 3))
    storm = Image.fromarray(np.clip(np.asarray(storm) + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.BLUR)
    ImageDraw.Draw(storm).line([(120, 0), (100, 70), (130, 90), (95, 180)], fill=(250, 250, 210), width=5)
    meadow = gradient((120, 190, 255), (200, 230, 255))
    draw = ImageDraw.Draw(meadow)
    draw.ellipse((-60, 130, 290, 400), fill=(70, 160, 60))
    for x, y in rng.integers((0, 160), (size, size), (40, 2)):
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 220, 0))
    night = gradient((5, 10, 40), (20, 30, 80))
    draw = ImageDraw.Draw(night)
    for x, y in rng.integers(0, size, (60, 2)):
        draw.point((int(x), int(y)), fill=(255, 255, 255))
    paths = []
    for name, image in {"sunset": sunset, "storm": storm, "meadow": meadow, "night": night}.items():
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def header_markdown(config, labels: list[str], model_name: str, tiny: bool) -> str:
    """The page's title and what the model is (family, classes, branches, gate)."""
    vlm_family = config.vlm_config.model_type  # (its _name_or_path is a path on the training machine)
    notice = (
        "\n\n> This is a **tiny randomly initialised model** built offline to try the app: its predictions mean "
        f"nothing. Pass a trained model: `python app.py MODEL` or set `{MODEL_ENV}`."
        if tiny
        else ""
    )
    vlm_branch = "exact likelihood of each answer" if config.vlm_branch_mode == "score" else "generated answer"
    return (
        f"# EmoVLM-KD: which emotion does this image evoke?\n"
        f"Model `{model_name}` ({vlm_family} VLM, {len(labels)} classes: {', '.join(map(markdown_text, labels))}). "
        f"The **VLM branch** ({vlm_branch}) and the **distilled head** (an MLP on the VLM's own image "
        f"embeddings) each predict; the **gate** (`{config.gate_type}`) fuses them.{notice}"
    )


def build_demo(predictor: EmotionPredictor, model_name: str, example_paths: list[str] = (), tiny: bool = False):
    labels, config = predictor.labels, predictor.config
    num_labels = len(labels)

    def predict(image, explain_task=None) -> dict:
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            return predictor(image, explain_task=explain_task)
        except ValueError as error:  # refused or unreadable upload: say why in the page
            raise gr.Error(str(error)) from None

    def panels(prediction: dict) -> tuple:
        return (
            as_label(labels, prediction["fused"]),
            as_label(labels, prediction["vlm"]),
            as_label(labels, prediction["head"]),
            gate_summary(prediction),
            gate_markdown(prediction, labels, config.gate_type),
        )

    def classify(image):
        return *panels(predict(image)), "", ""  # an explanation of an earlier image would mislead: cleared

    def explain(image, task):
        if image is None:
            raise gr.Error("Upload an image first.")
        # the progress state, while the VLM generates (the panels keep what they show)
        yield *[gr.skip()] * 5, "", f"_Generating {EXPLANATION_TASKS[task]} with the VLM ..._"
        prediction = predict(image, explain_task=task)
        status = explanation_markdown(prediction, labels, task, predictor.max_new_tokens)
        yield *panels(prediction), prediction["explanation"], status

    with gr.Blocks(title="EmoVLM-KD emotion classifier") as demo:
        gr.Markdown(header_markdown(config, labels, model_name, tiny))
        with gr.Row():
            with gr.Column():
                # A file path, not a PIL image: Gradio then opens only the header and the model's image processor does
                # all the decoding (raster formats only, pixel limit first, any mode with transparency onto white).
                image = gr.Image(
                    type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], elem_id="image"
                )
                submit = gr.Button("Classify", variant="primary", elem_id="submit")
                if example_paths:
                    gr.Examples([[path] for path in example_paths], inputs=image, label="Examples (generated)")
            fused = gr.Label(num_top_classes=num_labels, label="Prediction (fused by the gate)", elem_id="fused")
        with gr.Row(equal_height=True):
            vlm = gr.Label(num_top_classes=num_labels, label=VLM, elem_id="vlm-branch")
            head = gr.Label(num_top_classes=num_labels, label=HEAD, elem_id="head-branch")
            share = gr.Label(label="Share of the predicted class's fused logit", elem_id="gate-share")
        with gr.Row():
            task = gr.Radio(
                [("Reasoning (inference)", "inference"), ("Key visual elements (observation)", "observation")],
                value="inference",
                label="What the VLM explains",
                elem_id="explain-task",
            )
            explain_button = gr.Button("Explain", elem_id="explain")
        explanation = gr.Textbox(
            label="The VLM's explanation (generated, verbatim)", interactive=False, lines=3, elem_id="explanation"
        )
        explanation_status = gr.Markdown(elem_id="explanation-status")
        gate_table = gr.Markdown(elem_id="gate-table")
        about_section(config, predictor.reliability_diagram)
        outputs = [fused, vlm, head, share, gate_table, explanation, explanation_status]
        submit.click(classify, inputs=image, outputs=outputs, api_name="classify")
        explain_button.click(explain, inputs=[image, task], outputs=outputs, api_name="explain")
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help=f"model folder or Hub repo id (default: ${MODEL_ENV})")
    parser.add_argument("--host", default=None, help="server address (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help=f"largest image accepted, in pixels; 0: no limit (default: ${MAX_IMAGE_PIXELS_ENV}, else the model's)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=32, help="largest upload accepted (default: 32 MB)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest explanation, in tokens (default: the model's, 256)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tiny = resolve_model(args.model)
    print(f"Loading {model}{' (tiny random model)' if tiny else ''}", flush=True)
    predictor = EmotionPredictor(
        model, device=args.device, max_image_pixels=args.max_image_pixels, max_new_tokens=args.max_new_tokens
    )
    example_folder = Path(tempfile.gettempdir()) / "emovlm-kd-space-examples"
    examples = make_example_images(example_folder)
    demo = build_demo(predictor, model if not tiny else "tiny (random)", examples, tiny=tiny)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        show_error=True,
        allowed_paths=[str(example_folder)],
        max_file_size=int(args.max_upload_mb * 2**20),
    )


if __name__ == "__main__":
    sys.exit(main())
