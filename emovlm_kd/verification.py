"""The assembled model checked against the trained pipeline before export: its fused logits on a few images against
those that the cached features, the trained head and the trained gate give (what stage 5 evaluated).

With sampled VLM answers, which differ by design from draw to draw, the check compares its head logits with the
cached ones, and its fused logits with the trained gate applied to the cached head logits and its own VLM answers.
"""

import logging

import torch

from emovlm_kd.artifacts import fused_logits, gate_inputs, load_gate, load_head, read_head_spec
from emovlm_kd.cache import FeatureCache, samples_answers

logger = logging.getLogger(__name__)


def eval_split(data) -> str:
    return "test" if "test" in data.splits else "val"


def verification_data(accelerator, run_args, data, head_spec: dict, count: int):
    """(images, cached features) of the first `count` test (else val) images. Runs on every process."""
    split = eval_split(data)
    features = FeatureCache(accelerator, run_args.run_dir, data).get(head_spec, [split])[split]
    images = [data.image(split, index) for index in range(min(count, len(data.splits[split])))]
    return images, {name: value[: len(images)] for name, value in features.items()}


@torch.no_grad()
def verify_against_cache(run_dir, model, image_processor, images: list, features: dict) -> float:
    """Max |difference| between the assembled model's fused logits and the cached pipeline's on `images` (with
    sampled VLM answers: between its head logits and the cached ones, and between its fused logits and the trained
    gate applied to the cached head logits and the model's own VLM answers)."""
    gate, gate_spec = load_gate(run_dir)
    head_spec = read_head_spec(run_dir)
    head_output, vlm_scores = gate_inputs(load_head(run_dir), features, head_spec, gate_spec)
    inputs = image_processor(list(images), return_tensors="pt").to(model.device)
    outputs = model(**inputs)
    if samples_answers(head_spec):
        vlm_scores = outputs.vlm_scores.float().cpu()
        head_difference = (outputs.head_logits.float().cpu() - head_output).abs().max()
    else:
        head_difference = torch.zeros(())
    expected = fused_logits(gate, head_output, vlm_scores) / model.config.calibration_temperature
    actual = outputs.logits.float().cpu()
    difference = max(float((actual - expected).abs().max()), float(head_difference))
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if difference > tolerance:
        raise RuntimeError(
            f"The assembled model's logits differ from the trained pipeline's by {difference:.3g} (> {tolerance}) "
            f"on {len(images)} images: the exported model would not be the one evaluated"
        )
    logger.info(
        f"Assembled model matches the trained pipeline on {len(images)} images (max |Δlogit| {difference:.2e})"
    )
    return difference


__all__ = ["verification_data", "verify_against_cache"]
