# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD configuration (remote code: copied into every exported model repo)."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

GATE_TYPES = ("concat_linear", "bilinear", "moe", "dynamic_weighting", "cross_gating")
VLM_BRANCH_MODES = ("score", "generate")
VLM_BRANCH_INPUTS = ("probs", "one_hot")
# VLM families whose internals (3D rope index, LM-ready image features, language model) the model drives directly.
# Qwen3-VL injects "deepstack" visual features inside the language model and needs its own scoring path.
SUPPORTED_VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

DEFAULT_PROMPT = (
    "Which emotion does this image evoke? Choose one of the following emotions: <labels>. "
    "Answer in the format {'emotion': '<label>'}."
)
DEFAULT_ANSWER_FORMAT = "{'emotion': '<label>'}"


class EmoVLMKDConfig(PreTrainedConfig):
    r"""
    Configuration of [`EmoVLMKDForImageClassification`]: a frozen instruction-tuned VLM, a head distilled from a
    conventional vision model onto the VLM's own image embeddings, and a gate fusing both predictions
    (EmoVLM-KD, Lee, Lee & Park, CVPRW 2025).

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision-language model (an `AutoModelForImageTextToText` family; `qwen2_vl` by default).
        id2label / label2id (`dict`):
            The emotion classes, any number >= 2. Their order is the order of every output vector.
        classification_prompt (`str`):
            The question asked next to the image. `<labels>` is replaced by the comma-separated class names.
        answer_format (`str`):
            The answer whose likelihood is scored per class; `<label>` is replaced by the class name.
        answer_token_ids (`list[list[int]]`):
            Tokenised answer of every class (answer format + end-of-turn token), filled in by
            `EmoVLMKDForImageClassification.from_vlm`; the model scores exactly these sequences.
        head_hidden_sizes (`list[int]`, defaults to `[1024]`):
            Hidden layers of the distilled head (Linear-GELU-Dropout each, then Linear to the classes).
        head_dropout (`float`, defaults to 0.1):
            Dropout after every hidden layer of the head.
        gate_type (`str`, defaults to `"concat_linear"`):
            One of `concat_linear`, `bilinear`, `moe`, `dynamic_weighting`, `cross_gating`.
        gate_num_experts (`int`, defaults to 3):
            Number of experts of the `moe` gate.
        kd_temperature / kd_alpha (`float`, defaults to 2.0 / 0.5):
            Distillation loss `alpha * KL(teacher_T || head_T) * T^2 + (1 - alpha) * CE(head, labels)`.
        vlm_branch_mode (`str`, defaults to `"score"`):
            `"score"`: exact log-likelihood of every class answer (one batched forward, no generation).
            `"generate"`: greedy generation parsed into a one-hot vector, as the paper's code does.
        vlm_branch_input (`str`, defaults to `"probs"`):
            What the gate sees from the VLM: its class distribution (`"probs"`) or a one-hot vector (`"one_hot"`, paper).
        max_new_tokens (`int`, defaults to 32):
            Generation budget of the `"generate"` mode.
        freeze_vlm (`bool`, defaults to `True`):
            Keep the VLM frozen (no gradients, always in eval mode); only the head and the gate train.
    """

    model_type = "emovlm_kd"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    classification_prompt: str = DEFAULT_PROMPT
    answer_format: str = DEFAULT_ANSWER_FORMAT
    answer_token_ids: list | None = None
    head_hidden_sizes: list | None = None
    head_dropout: float = 0.1
    gate_type: str = "concat_linear"
    gate_num_experts: int = 3
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    vlm_branch_mode: str = "score"
    vlm_branch_input: str = "probs"
    max_new_tokens: int = 32
    freeze_vlm: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vlm_config.model_type not in SUPPORTED_VLM_FAMILIES:
            raise ValueError(
                f"VLM family {self.vlm_config.model_type!r} is not supported; supported: {SUPPORTED_VLM_FAMILIES}"
            )
        if self.head_hidden_sizes is None:
            self.head_hidden_sizes = [1024]
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.vlm_branch_mode not in VLM_BRANCH_MODES:
            raise ValueError(f"vlm_branch_mode must be one of {VLM_BRANCH_MODES}, got {self.vlm_branch_mode!r}")
        if self.vlm_branch_input not in VLM_BRANCH_INPUTS:
            raise ValueError(f"vlm_branch_input must be one of {VLM_BRANCH_INPUTS}, got {self.vlm_branch_input!r}")
        if self.num_labels < 2:
            raise ValueError(f"EmoVLM-KD needs at least 2 classes, got {self.num_labels}")
        if self.answer_token_ids is not None and len(self.answer_token_ids) != self.num_labels:
            raise ValueError(
                f"answer_token_ids has {len(self.answer_token_ids)} entries but there are {self.num_labels} labels"
            )

    @property
    def labels(self) -> list[str]:
        """Class names in output order."""
        return [self.id2label[i] for i in range(self.num_labels)]

    def prompt_text(self) -> str:
        return self.classification_prompt.replace("<labels>", ", ".join(self.labels))

    def answer_text(self, label: str) -> str:
        return self.answer_format.replace("<label>", label)


__all__ = ["EmoVLMKDConfig"]
