"""The paper's public inference path, re-implemented on the benchmark's weights: the baseline to beat.

What the reference code (github.com/sange1104/EmoVLM-KD, `train_gate.py` / `distill_model.py`) does per image:
  1. caps the image's longest side at 1024 px (LANCZOS; `data_utils.resize_image`) and builds the chat prompt with
     the image through the VLM processor;
  2. *generates* the answer with sampling (`do_sample=True, temperature=0.8, top_p=1.0, max_new_tokens=256`),
     decodes it, finds `{'emotion': '...'}` with a regular expression and turns the label into a one-hot vector
     (all zeros when the answer names no class; the reference's own `LabelBinarizer` gives two-class datasets the first
     class's one-hot instead, which the 8-class benchmark never meets);
  3. runs a *second copy* of the VLM's visual encoder (its distillation model owns one), mean-pools the merged image
     tokens and applies the distilled head;
  4. feeds (head logits, one-hot) to the gate;
always one image at a time. This module does the same with the benchmark model's own VLM, head and gate, so every
contender shares the weights.
"""

import copy

import torch
from bench_utils import to_device

from image_processing_emovlm_kd import limit_longest_side
from processing_emovlm_kd import render_chat

# The reference's parse (the first `{'emotion':\s*'...'}` in the text, its label must be a class), as the model's
# `"generate"` mode applies it.
from modeling_emovlm_kd import parse_generated_answer as parse_answer


class ReferencePipeline:
    """Per-image sampled generation + regex one-hot + a second visual encoder for the head.

    Args:
        model: an `EmoVLMKDForImageClassification`; its VLM, head and gate are shared, its visual encoder copied.
        vlm_processor: the VLM's processor (prompt with the chat template, image preprocessing).
        max_new_tokens / min_new_tokens: generation budget. A random-init VLM never stops by itself, so benchmarks
            set both to the token count of a real answer to time a realistic generation length.
        temperature: the reference's sampling temperature.
        visual_encoder_copy: reuse another pipeline's encoder copy (same pipeline, other generation budget).
    """

    def __init__(
        self,
        model,
        vlm_processor,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        temperature: float = 0.8,
        visual_encoder_copy=None,
    ):
        self.vlm = model.vlm
        self.processor = vlm_processor
        self.visual_encoder_copy = visual_encoder_copy or copy.deepcopy(model.vlm.model.visual).eval()
        self.head, self.gate = model.head, model.gate
        self.labels = model.config.labels
        # the reference's chat messages, rendered with the assistant header (as this model's image processor does;
        # the reference omits it, docs/fidelity.md), so both contenders get the same prompt
        self.prompt = render_chat(model.config, "classification", vlm_processor)
        tokenizer = vlm_processor.tokenizer
        self.generation_kwargs = {
            "do_sample": True,
            "temperature": temperature,
            "top_p": 1.0,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }

    def prepare(self, images, device=None, dtype=None) -> list[dict]:
        """Per-image VLM inputs, built as the reference builds them (1024-px cap, chat template + processor, batch of
        one)."""
        prepared = []
        for image in images:
            inputs = self.processor(text=[self.prompt], images=[limit_longest_side(image)], return_tensors="pt")
            prepared.append(to_device(inputs, device, dtype))
        return prepared

    def distilled_logits(self, inputs: dict) -> torch.Tensor:
        """The distillation model: its own visual encoder, mean-pooled merged tokens, the head. `(1, C)`."""
        with torch.no_grad():  # the copied encoder is frozen
            features = self.visual_encoder_copy(
                inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]
            ).pooler_output
        return self.head(features.mean(dim=0, keepdim=True))

    @torch.no_grad()
    def vlm_one_hot(self, inputs: dict) -> tuple[torch.Tensor, str]:
        """Sampled generation, decoded and parsed into a one-hot `(1, C)` vector, and the answer text."""
        generated = self.vlm.generate(**inputs, **self.generation_kwargs)
        answer = self.processor.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )[0]
        label = parse_answer(answer, self.labels)
        one_hot = torch.zeros(1, len(self.labels), device=generated.device)
        if label is not None:
            one_hot[0, label] = 1.0
        return one_hot, answer

    def predict_one(self, inputs: dict) -> torch.Tensor:
        head_logits = self.distilled_logits(inputs)
        one_hot, _ = self.vlm_one_hot(inputs)
        fused, _ = self.gate(head_logits, one_hot.to(head_logits.dtype))
        return fused

    def predict(self, prepared: list[dict]) -> torch.Tensor:
        """Fused logits `(num_images, C)`, one image at a time as the reference does."""
        return torch.cat([self.predict_one(inputs) for inputs in prepared])

    def modules(self) -> tuple:
        """The modules whose weights this pipeline holds: the VLM, the encoder copy, the head and the gate."""
        return (self.vlm, self.visual_encoder_copy, self.head, self.gate)
