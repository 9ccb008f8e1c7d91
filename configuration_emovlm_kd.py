# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD configuration (remote code: copied into every exported model repo).

The prompts of the method are defined here and nowhere else: instruction tuning (stage 1), feature caching and
scoring (stages 3-6), the exported processor and the model's `explain` all build their chat messages with
[`EmoVLMKDConfig.chat_messages`]. The config holds settings only: rendering and tokenising the chat is the
processor's (`processing_emovlm_kd.py`).
"""

import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .vlm_adapters_emovlm_kd import SUPPORTED_VLM_FAMILIES, get_adapter
except ImportError:  # imported from the installed package rather than from a model folder
    from vlm_adapters_emovlm_kd import SUPPORTED_VLM_FAMILIES, get_adapter

GATE_TYPES = ("concat_linear", "bilinear", "moe", "dynamic_weighting", "cross_gating")
VLM_BRANCH_MODES = ("score", "generate")
VLM_BRANCH_INPUTS = ("probs", "one_hot")
TASKS = ("observation", "inference", "classification")
# The tasks whose answers explain an image (what `explain` is asked for by the pipeline, the Endpoint and the Space).
EXPLANATION_TASKS = ("inference", "observation")

# Where a saved folder finds this package's classes: the Auto classes and the image-classification pipeline.
AUTO_MAP = {
    "AutoConfig": "configuration_emovlm_kd.EmoVLMKDConfig",
    "AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
    "AutoModelForImageClassification": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
}
CUSTOM_PIPELINES = {
    "image-classification": {
        "impl": "pipeline_emovlm_kd.EmoVLMKDImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "tf": [],
        "type": "image",
    }
}

# The published prompts (github.com/sange1104/EmoVLM-KD: data_utils.py SYSTEM_MESSAGE and get_final_task_message,
# train_vlm.py OBS_TASK_MESSAGE and INF_TASK_MESSAGE), character for character as the reference's source writes them.
# What its VLM saw differs in one place: `get_final_task_message` (data_utils.py:131-146) builds the classification
# prompt and returns nothing, so the reference's stage 1 and gate sent the text "None"; this package sends the prompt
# it builds (docs/fidelity.md).
SYSTEM_MESSAGE = "You are an AI visual assistant, and you are seeing a single image."
OBSERVATION_PROMPT = (
    "Observe the image and describe key elements of the image. "
    "Example: The dark sky serves as a dramatic background, emphasizing people holding tools. "
    "Objects resembling agricultural tools appear threatening, creating tension. "
    "The synchronized movement of the crowd and strong silhouette effects contribute to a striking atmosphere. "
    "The high contrast highlights the shapes of the tools as primary visual elements."
)
INFERENCE_PROMPT = (
    "Observe the image and describe the process of inferring the emotions conveyed in the image. "
    "Example: The crowd holding various tools suggests intense energy and the excitement of collective action. "
    "The silhouette contrasting with the dark sky evokes tension, potentially eliciting anxiety or fear. "
    "The threatening shapes of the tools and the collective behavior may hint at anger or hostility. "
    "The overall scene's organized yet uncertain atmosphere limits the possibility of comfort."
)
# The reference writes this prompt as an indented triple-quoted f-string: the newlines and the 8-space indents are
# part of the text the VLM was tuned on.
CLASSIFICATION_PROMPT = (
    "Observe the image and select the emotion category that best matches this image from the following "
    "<num_labels> categories <label_list>. Answer in dictionary form as follows\n"
    "        {'emotion':'<example_label_1>'} or {'emotion':'<example_label_2>'}\n"
    "        "
)
ANSWER_FORMAT = "{'emotion': '<label>'}"


def example_labels(labels: list[str]) -> list[str]:
    """The two classes named in the classification prompt's example answers.

    The rule reproduces the reference's prompts: `anger` first when it is a class (FI, EmoSet: `anger`, `amusement`;
    Emotion6: `anger`, `disgust`), then the first other class; without `anger`, the first two classes (Flickr,
    Instagram: `positive`, `negative`).
    """
    if "anger" in labels:
        return ["anger", next(label for label in labels if label != "anger")]
    return list(labels[:2])


def label_pattern(label: str) -> re.Pattern:
    """The label as a whole word, case-insensitive; `_`, `-` and spaces inside a label match one another (`very_sad`
    matches "very sad"). The rule of stage 0's check that a generated text does not give its label away."""
    words = [re.escape(word) for word in re.split(r"[\s_\-]+", label.strip()) if word]
    return re.compile(r"(?<!\w)" + r"[\s_\-]+".join(words) + r"(?!\w)", re.IGNORECASE)


class EmoVLMKDConfig(PreTrainedConfig):
    r"""
    Configuration of [`EmoVLMKDForImageClassification`]: a frozen instruction-tuned VLM, a head distilled from a
    conventional vision model onto the VLM's own image embeddings, and a gate fusing both predictions
    (EmoVLM-KD, Lee, Lee & Park, CVPRW 2025).

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision-language model (an `AutoModelForImageTextToText` family; `qwen2_vl` by default).
        id2label (`dict[int, str]`):
            The emotion classes, any number >= 2. Their order is the order of every output vector.
        label2id (`dict[str, int]`):
            The inverse of `id2label`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the head's and the gate's weights.
        system_message (`str`, *optional*, defaults to the reference's):
            The system turn that opens every chat; an empty string leaves it to the VLM's chat template.
        observation_prompt (`str`, *optional*, defaults to the reference's):
            The user turn of the observation task (describe the key visual elements), with its one-shot example.
        inference_prompt (`str`, *optional*, defaults to the reference's):
            The user turn of the inference task (explain how the elements lead to the emotion), with its example.
        classification_prompt (`str`, *optional*, defaults to the reference's):
            The user turn of the classification task, a template: `<num_labels>` becomes the number of classes,
            `<label_list>` the classes as a Python list (`['anger', 'fear']`), `<example_label_1>` and
            `<example_label_2>` the classes of the two example answers.
        classification_example_labels (`list[str]`, *optional*):
            The two classes of the example answers; by default [`example_labels`] picks them as the reference does.
        answer_format (`str`, *optional*, defaults to `"{'emotion': '<label>'}"`):
            The answer whose likelihood is scored per class (and that generated text is parsed for); `<label>` is
            replaced by the class name.
        answer_token_ids (`list[list[int]]`, *optional*):
            Tokenised answer of every class (answer format + end-of-turn token), filled in by
            `EmoVLMKDForImageClassification.from_vlm`; the model scores exactly these sequences.
        head_hidden_sizes (`list[int]`, *optional*, defaults to `[1024]`):
            Hidden layers of the distilled head (Linear-GELU-Dropout each, then Linear to the classes).
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout after every hidden layer of the head.
        head_input_deepstack (`bool`, *optional*, defaults to `False`):
            The head's input: the per-image mean of the LM-ready image embeddings (the paper's, default), or, for
            VLMs with deepstack features (Qwen3-VL), that mean concatenated with the mean of every deepstack level
            (`hidden_size * (1 + levels)` features).
        gate_type (`str`, *optional*, defaults to `"concat_linear"`):
            One of `concat_linear`, `bilinear`, `moe`, `dynamic_weighting`, `cross_gating` (the reference's gates).
        gate_num_experts (`int`, *optional*, defaults to 3):
            Number of experts of the `moe` gate.
        kd_temperature (`float`, *optional*, defaults to 2.0):
            Temperature `T` of the distillation loss `alpha * KL(teacher_T || head_T) * T^2 + (1 - alpha) * CE`.
        kd_alpha (`float`, *optional*, defaults to 0.5):
            Weight `alpha` of the KL term of the distillation loss.
        vlm_branch_mode (`str`, *optional*, defaults to `"score"`):
            `"score"`: exact log-likelihood of every class answer (one batched forward, no generation).
            `"generate"`: generation parsed into a one-hot vector, as the paper's code does.
        vlm_branch_input (`str`, *optional*, defaults to `"probs"`):
            What the gate sees from the VLM in `"score"` mode: its class distribution (`"probs"`) or a one-hot
            vector of its best class (`"one_hot"`, as in the paper).
        max_new_tokens (`int`, *optional*, defaults to 256):
            Generation budget of the `"generate"` mode and of `explain` (the reference's).
        generate_do_sample (`bool`, *optional*, defaults to `False`):
            Sample in the `"generate"` mode (the reference asks for it) instead of decoding greedily. Generation runs
            as `vlm.generate(do_sample=..., temperature=..., top_p=..., max_new_tokens=...)` would: these explicit
            settings over the VLM's own generation config (`vlm_generation_config`), through transformers' logits
            processors. With Qwen2-VL's (`top_k: 1`, `repetition_penalty: 1.05`) "sampling" keeps only the best
            token, which is what the reference really ran; `generate_top_k=0` samples for real.
        generate_temperature (`float`, *optional*, defaults to 0.8):
            Sampling temperature (the reference's).
        generate_top_p (`float`, *optional*, defaults to 1.0):
            Nucleus sampling mass (the reference's 1.0 keeps every token).
        generate_top_k (`int`, *optional*):
            Top-k of sampling; `None` keeps the VLM's generation config's (as the reference's `generate` call did),
            0 turns top-k off (true sampling with the temperature and top-p above).
        vlm_generation_config (`dict`, *optional*):
            The VLM's own generation config (its `generation_config.json`), recorded by
            `EmoVLMKDForImageClassification.from_vlm` so that an exported model generates as the VLM did.
        freeze_vlm (`bool`, *optional*, defaults to `True`):
            Keep the VLM frozen (no gradients, always in eval mode); only the head and the gate train.
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Temperature `T` the model's `logits` are divided by (temperature scaling): the gate's output / `T`, so
            that every softmax of `logits` (pipeline, Endpoint handler, Space, batch prediction) gives calibrated
            probabilities; the predicted class never changes. Fitted on the validation split by the evaluation
            stage; 1.0 leaves the gate's output as it is (and is what models saved without this field load with).

    Example:

    ```python
    >>> from configuration_emovlm_kd import EmoVLMKDConfig

    >>> config = EmoVLMKDConfig(id2label={0: "positive", 1: "negative"}, gate_type="moe")
    >>> config.prompt_text("classification").splitlines()[1].strip()
    "{'emotion':'positive'} or {'emotion':'negative'}"
    >>> config.answer_text("negative")
    "{'emotion': 'negative'}"
    >>> [message["role"] for message in config.chat_messages("inference")]
    ['system', 'user']
    ```
    """

    model_type = "emovlm_kd"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    initializer_range: float = 0.02
    system_message: str = SYSTEM_MESSAGE
    observation_prompt: str = OBSERVATION_PROMPT
    inference_prompt: str = INFERENCE_PROMPT
    classification_prompt: str = CLASSIFICATION_PROMPT
    classification_example_labels: list | None = None
    answer_format: str = ANSWER_FORMAT
    answer_token_ids: list | None = None
    head_hidden_sizes: list | None = None
    head_dropout: float = 0.1
    head_input_deepstack: bool = False
    gate_type: str = "concat_linear"
    gate_num_experts: int = 3
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    vlm_branch_mode: str = "score"
    vlm_branch_input: str = "probs"
    max_new_tokens: int = 256
    generate_do_sample: bool = False
    generate_temperature: float = 0.8
    generate_top_p: float = 1.0
    generate_top_k: int | None = None
    vlm_generation_config: dict | None = None
    freeze_vlm: bool = True
    calibration_temperature: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        adapter = get_adapter(self.vlm_config)  # refuses a family no adapter knows, or one scored wrongly
        if self.head_input_deepstack and not adapter.has_deepstack:
            raise ValueError(f"head_input_deepstack needs a VLM with deepstack features; {adapter.family} has none")
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
        examples = self.classification_example_labels
        if examples is not None and (len(examples) != 2 or not set(examples) <= set(self.labels)):
            raise ValueError(
                f"classification_example_labels must be two of the classes {self.labels}, got {examples!r}"
            )
        if "<label>" not in self.answer_format:
            raise ValueError(f"answer_format must contain '<label>', got {self.answer_format!r}")
        if not 0 < self.generate_top_p <= 1 or self.generate_temperature <= 0:
            raise ValueError(
                f"generate_temperature must be > 0 and generate_top_p in (0, 1], got {self.generate_temperature} "
                f"and {self.generate_top_p}"
            )
        if self.generate_top_k is not None and self.generate_top_k < 0:
            raise ValueError(f"generate_top_k must be None (the VLM's) or >= 0 (0: off), got {self.generate_top_k}")
        temperature = self.calibration_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < 1e30:
            raise ValueError(f"calibration_temperature must be a finite number > 0 (1.0: off), got {temperature!r}")
        self.calibration_temperature = float(temperature)
        # Saved folders load through the Auto classes and the pipeline by these entries (kept when already set, e.g.
        # by a config loaded from the Hub).
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.custom_pipelines = {**CUSTOM_PIPELINES, **(getattr(self, "custom_pipelines", None) or {})}

    @property
    def labels(self) -> list[str]:
        """Class names in output order."""
        return [self.id2label[i] for i in range(self.num_labels)]

    def prompt_text(self, task: str = "classification") -> str:
        """The user turn's text for `task` (one of `TASKS`); the classification template filled in."""
        if task == "observation":
            return self.observation_prompt
        if task == "inference":
            return self.inference_prompt
        if task != "classification":
            raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}")
        examples = self.classification_example_labels or example_labels(self.labels)
        fields = {
            "<num_labels>": str(self.num_labels),
            "<label_list>": str(self.labels),
            "<example_label_1>": examples[0],
            "<example_label_2>": examples[1],
        }
        text = self.classification_prompt
        for placeholder, value in fields.items():
            text = text.replace(placeholder, value)
        return text

    def labels_named_in(self, text: str) -> list[str]:
        """The classes that `text` names as whole words ([`label_pattern`]), in the order of their first mention.

        Applied to `explain`'s texts, it lets an application flag an explanation that names no class, or one the
        model did not predict; the text itself is never changed."""
        mentions = []
        for label in self.labels:
            match = label_pattern(label).search(text)
            if match is not None:
                mentions.append((match.start(), label))
        return [label for _, label in sorted(mentions)]

    def answer_text(self, label: str) -> str:
        return self.answer_format.replace("<label>", label)

    def chat_messages(self, task: str) -> list[dict]:
        """The chat for `task`, as the reference builds it: the system turn, then the user turn with the task's text
        before the image. `EmoVLMKDProcessor` renders and tokenises it with the VLM's chat template."""
        user = {"role": "user", "content": [{"type": "text", "text": self.prompt_text(task)}, {"type": "image"}]}
        if not self.system_message:
            return [user]
        return [{"role": "system", "content": [{"type": "text", "text": self.system_message}]}, user]


__all__ = ["EXPLANATION_TASKS", "SUPPORTED_VLM_FAMILIES", "EmoVLMKDConfig", "example_labels", "label_pattern"]
