# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD model (remote code: copied into every exported model repo).

One forward runs the VLM's visual encoder once per image. The LM-ready image embeddings feed both
  * the VLM branch: the exact log-likelihood of every class's answer string given image and prompt, computed in one
    language-model pass over the prompt followed by a token trie of all answers (tree-shaped attention mask), and
  * the distilled head: an MLP on the per-image mean of the same embeddings;
and a gate fuses the two predictions into `logits`. `explain` asks the VLM, from the same embeddings, for its own
description or reasoning of an image.
"""

import copy
import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, AutoTokenizer, DynamicCache, GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessorList
from transformers.utils import ModelOutput, cached_file, can_return_tuple

try:
    from .configuration_emovlm_kd import GATE_TYPES, TASKS, EmoVLMKDConfig
    from .image_processing_emovlm_kd import left_padded_prompts, padding_token_id
    from .processing_emovlm_kd import chat_token_ids

    # Imported so that transformers copies the pipeline file (a relative import) into every saved model folder and
    # into its module cache when loading one; `config.custom_pipelines` names it.
    from .pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline  # noqa: F401
    from .vlm_adapters_emovlm_kd import (
        NO_SPLIT_MODULES,
        ImageEmbeds,
        check_attention_backend,
        check_sliding_window,
        get_adapter,
    )
except ImportError:  # imported from the installed package rather than from a model folder
    from configuration_emovlm_kd import GATE_TYPES, TASKS, EmoVLMKDConfig
    from image_processing_emovlm_kd import left_padded_prompts, padding_token_id
    from processing_emovlm_kd import chat_token_ids
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline  # noqa: F401
    from vlm_adapters_emovlm_kd import (
        NO_SPLIT_MODULES,
        ImageEmbeds,
        check_attention_backend,
        check_sliding_window,
        get_adapter,
    )

# The file whose presence in a model folder or repo means the VLM's tokenizer was saved with the model.
TOKENIZER_FILE = "tokenizer_config.json"
# Keyword arguments of `from_pretrained` that also say where to find the tokenizer.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


@dataclass
class EmoVLMKDOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the fused cross-entropy (when `labels` are given) and the distillation loss of the head (when
        `teacher_logits` are given).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Fused class scores (before softmax): the gate's output divided by `config.calibration_temperature`, so that
        their softmax is the calibrated class probabilities.
    head_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Class scores of the distilled head.
    vlm_scores (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        The VLM branch as the gate sees it: class probabilities, or a one-hot vector (all zeros when a generated
        answer names no class).
    vlm_log_likelihoods (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        Log-likelihood of each class's full answer given image and prompt (`"score"` mode only).
    gate_weights (`torch.FloatTensor`, *optional*):
        How the gate weighed its inputs, for the gates that have such weights: `moe`: the router's softmax
        `(batch_size, num_experts)`; `dynamic_weighting`: `(batch_size, 2)`, the weights of (head, VLM);
        `cross_gating`: `(batch_size, 2, num_labels)`, the sigmoid gates on the head (computed from the VLM) and on
        the VLM (computed from the head).
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Mean-pooled LM-ready image embeddings, the head's input.
    image_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
        The LM-ready image embeddings of every image, `(num_image_tokens_i, hidden_size)` each (when
        `output_image_hidden_states=True`), as an `ImageEmbeds` tuple that also carries the deepstack features of
        the VLMs that have them (Qwen3-VL): pass it as it is to `explain` to reuse this forward's vision pass.
    distillation_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The head's KD loss, when `teacher_logits` are given.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    head_logits: Optional[torch.FloatTensor] = None
    vlm_scores: Optional[torch.FloatTensor] = None
    vlm_log_likelihoods: Optional[torch.FloatTensor] = None
    gate_weights: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    image_hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    distillation_loss: Optional[torch.FloatTensor] = None


def distillation_loss(student_logits, teacher_logits, labels=None, temperature=2.0, alpha=0.5):
    """The paper's KD loss: `alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, y)`.

    Without labels the loss is the KL term alone (weight 1).
    """
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if labels is None:
        return kl
    return alpha * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)


def vlm_scores_from_log_likelihoods(vlm_log_likelihoods: torch.Tensor, vlm_branch_input: str = "probs"):
    """The VLM branch as the gate sees it in `"score"` mode: the class probabilities (`"probs"`), or a one-hot vector
    of the most likely class (`"one_hot"`, as in the paper)."""
    if vlm_branch_input == "one_hot":
        return F.one_hot(vlm_log_likelihoods.argmax(-1), vlm_log_likelihoods.shape[-1]).float()
    return vlm_log_likelihoods.float().softmax(dim=-1)


class EmoVLMKDHead(nn.Module):
    """The distilled head: [Linear - GELU - Dropout] per hidden size, then Linear to the classes."""

    def __init__(self, in_features: int, hidden_sizes: list[int], num_labels: int, dropout: float):
        super().__init__()
        layers = []
        for hidden in hidden_sizes:
            layers += [nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_labels))
        self.mlp = nn.Sequential(*layers)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.mlp(image_embeds)


# The gates of the reference (train_gate.py), with its parameter shapes and submodule names, so its state dicts load.
# Each takes v1 = the head's logits and v2 = the VLM branch's scores, both (batch, C), and returns
# (fused logits (batch, C), the gate's own weights or None).
class ConcatLinearGate(nn.Module):
    """`fc(cat(v1, v2))`, fc: Linear(2C -> C). The paper's default and best gate."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.fc = nn.Linear(2 * num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        return self.fc(torch.cat([head_logits, vlm_scores], dim=-1)), None


class BilinearGate(nn.Module):
    """`fc(bilinear(v1, v2))`, bilinear: Bilinear(C, C -> C), fc: Linear(C -> C)."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.bilinear = nn.Bilinear(num_labels, num_labels, num_labels)
        self.fc = nn.Linear(num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        return self.fc(self.bilinear(head_logits, vlm_scores)), None


class MoEGate(nn.Module):
    """`sum_e w_e * expert_e(x)` with `x = cat(v1, v2)`, experts: Linear(2C -> C), `w = softmax(gate(x))`, gate:
    Linear(2C -> experts). Weights: the routing `w`, `(batch, experts)`."""

    def __init__(self, num_labels: int, num_experts: int = 3, **_):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2 * num_labels, num_labels) for _ in range(num_experts))
        self.gate = nn.Linear(2 * num_labels, num_experts)

    def forward(self, head_logits, vlm_scores):
        features = torch.cat([head_logits, vlm_scores], dim=-1)
        weights = self.gate(features).softmax(dim=-1)
        experts = torch.stack([expert(features) for expert in self.experts], dim=1)  # (batch, experts, C)
        return (weights.unsqueeze(-1) * experts).sum(dim=1), weights


class DynamicWeightingGate(nn.Module):
    """`fc(w0 * v1 + w1 * v2)` with `w = softmax(gate(cat(v1, v2)))`, gate: Linear(2C -> 2), fc: Linear(C -> C).
    Weights: `w`, `(batch, 2)` for (head, VLM)."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.gate = nn.Linear(2 * num_labels, 2)
        self.fc = nn.Linear(num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        weights = self.gate(torch.cat([head_logits, vlm_scores], dim=-1)).softmax(dim=-1)
        return self.fc(weights[:, :1] * head_logits + weights[:, 1:] * vlm_scores), weights


class CrossGatingGate(nn.Module):
    """`fc(g1 * v1 + g2 * v2)` with `g1 = sigmoid(gate1(v2))`, `g2 = sigmoid(gate2(v1))`; gate1, gate2, fc:
    Linear(C -> C). Each branch is gated per class by the other. Weights: `(g1, g2)`, `(batch, 2, C)`."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.gate1 = nn.Linear(num_labels, num_labels)
        self.gate2 = nn.Linear(num_labels, num_labels)
        self.fc = nn.Linear(num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        head_gate = torch.sigmoid(self.gate1(vlm_scores))
        vlm_gate = torch.sigmoid(self.gate2(head_logits))
        fused = self.fc(head_gate * head_logits + vlm_gate * vlm_scores)
        return fused, torch.stack([head_gate, vlm_gate], dim=1)


# Keyed by the config's `GATE_TYPES`, in that order, so the two cannot name different gates.
GATES = dict(
    zip(GATE_TYPES, (ConcatLinearGate, BilinearGate, MoEGate, DynamicWeightingGate, CrossGatingGate), strict=True)
)


class AnswerTrie:
    """Prefix tree of the tokenised class answers, flattened in an order where parents precede children.

    `tokens[i]`, `parents[i]` (-1 for a child of the prompt) and `depths[i]` describe node `i`; `paths[c]` marks the
    nodes on class `c`'s answer. Shared prefixes (`{'emotion': '`, `sad` of `sad`/`sadness`) are scored once.
    Only nodes with children (`context`) enter the language model: a node is predicted from its parent's hidden
    state, so a leaf's own hidden state (the end-of-turn token closing each answer) would never be used.
    """

    def __init__(self, answers: list[list[int]]):
        index, self.tokens, self.parents, self.depths = {}, [], [], []
        paths = []
        for answer in answers:
            path, parent = [], -1
            for depth, token in enumerate(answer):
                key = (parent, token)
                if key not in index:
                    index[key] = len(self.tokens)
                    self.tokens.append(token)
                    self.parents.append(parent)
                    self.depths.append(depth)
                parent = index[key]
                path.append(parent)
            paths.append(path)
        self.paths = paths
        self._tensors = {}

    def __len__(self):
        return len(self.tokens)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Index tensors on `device` (cached): tokens, parents, each parent as an index into the context nodes (those
        with children), the context nodes' tokens, depths and ancestor-or-self mask, and the class paths."""
        if device not in self._tensors:
            n = len(self.tokens)
            ancestors = torch.eye(n, dtype=torch.bool)
            for node, parent in enumerate(self.parents):
                if parent >= 0:
                    ancestors[node] |= ancestors[parent]
            context = sorted({parent for parent in self.parents if parent >= 0})  # parents precede children
            parent_slot = [context.index(parent) if parent >= 0 else -1 for parent in self.parents]
            paths = torch.zeros(len(self.paths), n)
            for label, path in enumerate(self.paths):
                paths[label, path] = 1.0
            self._tensors[device] = {
                "tokens": torch.tensor(self.tokens, device=device),
                "parents": torch.tensor(self.parents, device=device),
                "parent_slot": torch.tensor(parent_slot, device=device),
                "context_tokens": torch.tensor([self.tokens[i] for i in context], dtype=torch.long, device=device),
                "context_depths": torch.tensor([self.depths[i] for i in context], dtype=torch.long, device=device),
                "context_ancestors": ancestors[context][:, context].to(device),
                "paths": paths.to(device),
            }
        return self._tensors[device]


class EmoVLMKDPreTrainedModel(PreTrainedModel):
    config: EmoVLMKDConfig
    config_class = EmoVLMKDConfig
    base_model_prefix = "vlm"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    # Scoring passes a tree-shaped 4D mask that only sdpa and eager attention take (`_attention_mask_for_backend`):
    # no other registered attention backend (flash, flex, kernels) may be chosen at loading.
    _supports_attention_backend = False
    # The losses are means over the batch, not sums to be divided by Trainer's `num_items_in_batch`: Trainer then
    # passes no loss kwargs and scales the loss for gradient accumulation itself.
    accepts_loss_kwargs = False
    _no_split_modules = NO_SPLIT_MODULES  # every VLM family's (vlm_adapters_emovlm_kd)

    def _init_weights(self, module):
        # Only the head and the gates live here (the VLM, a PreTrainedModel, initialises its own modules). Their
        # Linear layers take transformers' default (normal with `initializer_range`, zero bias); the bilinear gate's
        # nn.Bilinear, which the default does not cover, the same.
        super()._init_weights(module)
        if isinstance(module, nn.Bilinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class EmoVLMKDForImageClassification(EmoVLMKDPreTrainedModel):
    r"""
    EmoVLM-KD: a (frozen) VLM, a head distilled onto the VLM's image embeddings, and a gate fusing both.

    Inputs are what [`EmoVLMKDProcessor`] (its [`EmoVLMKDImageProcessor`]) produces: `pixel_values` `(num_patches, patch_dim)`,
    `image_grid_thw` `(batch, 3)`, `input_ids` / `attention_mask` / `mm_token_type_ids` `(batch, seq_len)`
    (the classification prompt, left-padded). The VLM's tokenizer, attached as `model.tokenizer` by `from_vlm` and
    `from_pretrained`, decodes generated text (the `"generate"` branch mode and `explain`).

    Example:

    ```python
    >>> import torch
    >>> from PIL import Image
    >>> from transformers import AutoModelForImageClassification, AutoProcessor

    >>> repo = "your-name/emovlm-kd-fi"  # any exported EmoVLM-KD model folder or Hub repo
    >>> model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

    >>> inputs = processor(images=Image.open("storm.jpg"))
    >>> with torch.no_grad():
    ...     outputs = model(**inputs, output_image_hidden_states=True)
    >>> model.config.id2label[outputs.logits.argmax(-1).item()]
    'fear'
    >>> model.explain(**inputs, image_hidden_states=outputs.image_hidden_states)  # no second vision pass
    ['The dark clouds and the lightning over the empty field ...']
    ```
    """

    # The scoring pass (prompt + trie) is padded to a multiple of this many tokens (1: no padding); see score_answers.
    scoring_pad_multiple = 8

    def __init__(self, config: EmoVLMKDConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        self.head = EmoVLMKDHead(
            head_in_features(config), config.head_hidden_sizes, config.num_labels, config.head_dropout
        )
        self.gate = GATES[config.gate_type](config.num_labels, num_experts=config.gate_num_experts)
        self._trie = AnswerTrie(config.answer_token_ids) if config.answer_token_ids else None
        self.tokenizer = None  # the VLM's; attached by `from_vlm` and `from_pretrained`
        if config.vlm_generation_config:  # the VLM's generation_config.json, which a model built from config lacks
            self.vlm.generation_config = GenerationConfig.from_dict(config.vlm_generation_config)
        if config.freeze_vlm:
            self.vlm.requires_grad_(False)
        self.post_init()

    @classmethod
    def from_vlm(cls, vlm, processor, labels: list[str] | dict[int, str], **config_kwargs):
        """Wrap a VLM with a fresh head and gate for a label set.

        Args:
            vlm (`str` or `PreTrainedModel`):
                An `AutoModelForImageTextToText` checkpoint name or folder (e.g. `"Qwen/Qwen2-VL-2B-Instruct"`), or
                an already loaded model. Its weights are used as they are.
            processor (`ProcessorMixin` or `None`):
                The VLM's processor (e.g. `Qwen2VLProcessor`). Its tokenizer tokenises the class answers and is
                attached to the model (`model.tokenizer`) to decode generated text. `None` loads it from `vlm` when
                `vlm` is a name.
            labels (`list[str]` or `dict[int, str]`):
                The classes, as names in output order or as `{index: name}`.
            config_kwargs:
                Any [`EmoVLMKDConfig`] field (`gate_type`, `head_hidden_sizes`, prompts, ...), and `dtype` for
                loading `vlm` by name.

        Returns the model; build the matching image processor with
        `EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)`.
        """
        if not labels:
            raise ValueError("from_vlm needs the class labels (a list of names or {index: name})")
        if isinstance(vlm, str):
            if processor is None:
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(vlm)
            vlm = AutoModelForImageTextToText.from_pretrained(vlm, dtype=config_kwargs.pop("dtype", "auto"))
        if processor is None:
            raise ValueError("from_vlm needs the VLM's processor to tokenise the class answers")
        if config_kwargs.get("vlm_branch_mode", "score") == "score":  # checked before the config takes vlm.config
            check_attention_backend(get_adapter(vlm.config).language_model(vlm))
        id2label = dict(enumerate(labels)) if isinstance(labels, (list, tuple)) else dict(labels)
        config = EmoVLMKDConfig(
            vlm_config=vlm.config,
            id2label=id2label,
            label2id={name: index for index, name in id2label.items()},
            **config_kwargs,
        )
        config.answer_token_ids = tokenize_answers(processor.tokenizer, config)
        if getattr(vlm, "generation_config", None) is not None:
            settings = vlm.generation_config.to_diff_dict().items()
            metadata = ("_from_model_config", "transformers_version")
            config.vlm_generation_config = {key: value for key, value in settings if key not in metadata}
        with torch.device("meta"):  # skip building (and initialising) a second, random VLM
            model = cls(config)
        model.vlm = vlm
        device = next(vlm.parameters()).device
        for module in (model.head, model.gate):
            module.to_empty(device=device)
            for submodule in module.modules():
                model._init_weights(submodule)
        model.set_trainable(head=True, gate=True, vlm=not config.freeze_vlm)
        model.tokenizer = tokenizer_with_chat_template(processor)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, which also attaches the tokenizer stored with the model (when the folder
        or repo has one) and refuses checkpoints whose head or gate weights do not fit this code's definitions."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        check_head_and_gate_loaded(loading_info, model.config.gate_type, pretrained_model_name_or_path)
        model.tokenizer = load_tokenizer(pretrained_model_name_or_path, model.config.vlm_config, kwargs)
        return (model, loading_info) if output_loading_info else model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vlm:
            self.vlm.eval()  # a frozen VLM scores deterministically, also inside a Trainer loop
        return self

    def set_trainable(self, head: bool = True, gate: bool = True, vlm: bool = False):
        """Choose what receives gradients. `vlm=True` also sets `config.freeze_vlm = False`."""
        self.head.requires_grad_(head)
        self.gate.requires_grad_(gate)
        self.vlm.requires_grad_(vlm)
        self.config.freeze_vlm = not vlm

    @property
    def vlm_adapter(self):
        """What this model knows about its VLM's family (`vlm_adapters_emovlm_kd`)."""
        return get_adapter(self.config.vlm_config)

    def get_image_embeds(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> ImageEmbeds:
        """The single pass of the visual encoder: LM-ready embeddings, one `(tokens_i, hidden)` tensor per image
        (an `ImageEmbeds` tuple, which also carries Qwen3-VL's deepstack features)."""
        return self.vlm_adapter.image_features(self.vlm, pixel_values, image_grid_thw)

    def pool_image_embeds(self, image_embeds: ImageEmbeds) -> torch.Tensor:
        """The head's input `(batch, features)`: the per-image mean of the LM-ready image embeddings, followed by
        the mean of every deepstack level when `config.head_input_deepstack`."""
        pooled = torch.stack([embeds.mean(dim=0) for embeds in image_embeds])
        if not self.config.head_input_deepstack:
            return pooled
        if getattr(image_embeds, "deepstack", None) is None:
            raise ValueError("head_input_deepstack needs the image embeddings' deepstack features (get_image_embeds)")
        levels = torch.stack([levels.mean(dim=1).flatten() for levels in image_embeds.deepstack])
        return torch.cat([pooled, levels.to(pooled.dtype)], dim=-1)

    def forward_head(self, pooled_image_embeds: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_image_embeds.to(self.head.mlp[0].weight.dtype))

    def forward_gate(self, head_logits: torch.Tensor, vlm_scores: torch.Tensor):
        return self.gate(head_logits, vlm_scores.to(head_logits.dtype))

    def _prompt_embeds(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        """Prompt embeddings with the image embeddings scattered in, the family's 3D rope positions
        `(3, batch, seq_len)`, and the image positions `(batch, seq_len)` (where deepstack features go)."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("EmoVLM-KD expects left-padded prompts (the processor's default)")
        inputs_embeds = self.vlm.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.vlm_config.image_token_id
        flat = torch.cat(tuple(image_embeds), dim=0).to(inputs_embeds.dtype)
        if int(image_mask.sum()) != flat.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image placeholder tokens but {flat.shape[0]} image embeddings")
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
        if mm_token_type_ids is None:
            mm_token_type_ids = image_mask.long()
        position_ids = self.vlm_adapter.rope_index(
            self.vlm, input_ids, mm_token_type_ids, image_grid_thw, attention_mask
        )
        return inputs_embeds, position_ids, image_mask

    def _attention_mask_for_backend(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tree-shaped 4D mask in the form the attention backend takes (boolean for SDPA, additive for eager);
        an implementation that would drop it is refused."""
        language_model = self.vlm_adapter.language_model(self.vlm)
        check_attention_backend(language_model)
        check_sliding_window(language_model, allowed.shape[-1])
        if language_model.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    def score_answers(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        """Exact log-likelihood `(batch, num_labels)` of every class's answer given image and prompt.

        One language-model pass over `[prompt ; trie of all answers]`: trie nodes attend to the prompt and to their
        own ancestors only, and sit at the text positions they would have right after the prompt, so each node's
        hidden state equals the one of a separate forward over prompt + that answer. Leaves are left out of the pass
        (nothing is predicted from them). The pass is padded to a multiple of `scoring_pad_multiple` tokens with
        dummy nodes that attend to themselves only and are never read (CPU bf16 kernels are slow on odd row counts).
        """
        if self._trie is None:
            raise ValueError("config.answer_token_ids is empty; build the model with `from_vlm` to tokenise answers")
        trie = self._trie.tensors(input_ids.device)
        prompt_embeds, position_ids, image_mask = self._prompt_embeds(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds
        )
        batch, length, _ = prompt_embeds.shape
        node_tokens, node_depths, node_ancestors = self._padded_trie_nodes(trie, length)
        nodes = len(node_tokens)

        node_embeds = self.vlm.get_input_embeddings()(node_tokens).unsqueeze(0).expand(batch, -1, -1)
        inputs_embeds = torch.cat([prompt_embeds, node_embeds.to(prompt_embeds.dtype)], dim=1)
        next_position = position_ids.amax(dim=(0, 2)) + 1  # (batch,): first text position after the prompt
        node_positions = (next_position[:, None] + node_depths[None, :]).unsqueeze(0).expand(3, -1, -1)
        position_ids = torch.cat([position_ids, node_positions], dim=2)

        keys_valid = attention_mask.bool()
        allowed = torch.zeros(batch, length + nodes, length + nodes, dtype=torch.bool, device=input_ids.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        allowed[:, :length, :length] = causal & keys_valid[:, None, :]
        allowed[:, length:, :length] = keys_valid[:, None, :]
        allowed[:, length:, length:] = node_ancestors
        allowed |= torch.eye(length + nodes, dtype=torch.bool, device=input_ids.device)  # padding rows: no NaN
        mask = self._attention_mask_for_backend(allowed.unsqueeze(1), inputs_embeds.dtype)

        # deepstack features (Qwen3-VL) go to the prompt's image positions only, never to trie nodes
        image_mask = torch.cat([image_mask, image_mask.new_zeros(batch, nodes)], dim=1)
        hidden = self.vlm_adapter.run_language_model(
            self.vlm, inputs_embeds, mask, position_ids, image_mask=image_mask, image_embeds=image_embeds
        )
        # node i is predicted from its parent's hidden state (the last prompt token for first answer tokens)
        predicted_from = torch.where(trie["parents"] < 0, length - 1, length + trie["parent_slot"])
        positions, which = torch.unique(predicted_from, return_inverse=True)
        log_probs = self.vlm.get_output_embeddings()(hidden[:, positions]).float().log_softmax(dim=-1)
        node_log_probs = log_probs[:, which, trie["tokens"]]  # (batch, nodes)
        return node_log_probs @ trie["paths"].T

    def _padded_trie_nodes(self, trie: dict, prompt_length: int):
        """The trie's context nodes (tokens, depths, ancestor mask) followed by the dummy nodes that round the scoring
        pass up to a multiple of `scoring_pad_multiple`: each its own only ancestor, at depth 0, never attended to."""
        tokens, depths, ancestors = trie["context_tokens"], trie["context_depths"], trie["context_ancestors"]
        pad = -(prompt_length + len(tokens)) % max(1, self.scoring_pad_multiple)
        if pad == 0 or len(tokens) == 0:
            return tokens, depths, ancestors
        padded = torch.eye(len(tokens) + pad, dtype=torch.bool, device=ancestors.device)
        padded[: len(tokens), : len(tokens)] = ancestors
        return torch.cat([tokens, tokens[:1].expand(pad)]), torch.cat([depths, depths.new_zeros(pad)]), padded

    def stop_token_ids(self) -> list[int]:
        """Tokens that end a generated answer: the end-of-turn token and the VLM's end-of-sequence tokens."""
        eos = getattr(getattr(self.vlm, "generation_config", None), "eos_token_id", None)
        stop = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if self.config.answer_token_ids:
            stop.add(self.config.answer_token_ids[0][-1])
        if not stop:
            raise ValueError("No end-of-turn token is known: build the model with `from_vlm`")
        return sorted(stop)

    @torch.no_grad()
    def generate_tokens(
        self,
        input_ids,
        attention_mask,
        mm_token_type_ids,
        image_grid_thw,
        image_embeds,
        max_new_tokens: Optional[int] = None,
        do_sample: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
    ) -> list[list[int]]:
        """Generate after the prompt from already computed image embeddings (no second vision pass).

        Tokens are chosen as `self.vlm.generate(**self.generate_kwargs(do_sample, max_new_tokens))` chooses them:
        the VLM's generation config under these explicit settings, through transformers' own logits processors
        (repetition penalty, top-k, ...; see [`generate_mode_config`]), greedy or sampled (`do_sample`, default
        `config.generate_do_sample`); `generator` makes sampling reproducible. A list of one generator per row makes
        each row's sample independent of the batch it is in.
        Returns every row's new tokens up to, not including, its first stop token.
        """
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        do_sample = self.config.generate_do_sample if do_sample is None else do_sample
        generation_config, processors = self.token_selection(input_ids, do_sample, max_new_tokens)
        history = input_ids  # what generate() shows the logits processors: prompt and tokens so far
        inputs_embeds, position_ids, image_mask = self._prompt_embeds(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds
        )
        adapter, embed = self.vlm_adapter, self.vlm.get_input_embeddings()
        language_model = adapter.language_model(self.vlm)
        stop = torch.tensor(self.stop_token_ids(), device=input_ids.device)
        cache = DynamicCache(config=language_model.config)
        next_position = position_ids.amax(dim=(0, 2)) + 1
        mask = attention_mask
        generated, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            hidden = adapter.run_language_model(  # the image (and its deepstack features) only in the prompt step
                self.vlm, inputs_embeds, mask, position_ids, image_mask if step == 0 else None, image_embeds, cache
            )
            logits = self.vlm.get_output_embeddings()(hidden[:, -1]).float()
            token = self._next_token(history, logits, processors, generation_config.do_sample, generator)
            token = torch.where(done, stop[0], token)
            history = torch.cat([history, token[:, None]], dim=1)
            generated.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            inputs_embeds = embed(token).unsqueeze(1)
            position_ids = (next_position + step).view(1, -1, 1).expand(3, -1, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        stop_ids = set(stop.tolist())
        rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(input_ids.shape[0])]
        return [row[: next((i for i, token in enumerate(row) if token in stop_ids), len(row))] for row in rows]

    def generate_kwargs(self, do_sample: Optional[bool] = None, max_new_tokens: Optional[int] = None) -> dict:
        """The keyword arguments of `vlm.generate` that the `"generate"` mode stands for (the reference passes
        `do_sample=True, temperature=0.8, top_p=1.0, max_new_tokens=256`, train_gate.py:67-73); the sampling ones
        only when sampling, as they mean nothing otherwise."""
        do_sample = self.config.generate_do_sample if do_sample is None else do_sample
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens or self.config.max_new_tokens}
        if do_sample:
            kwargs.update(temperature=self.config.generate_temperature, top_p=self.config.generate_top_p)
            if self.config.generate_top_k is not None:
                kwargs["top_k"] = self.config.generate_top_k
        return kwargs

    def generate_mode_config(self, do_sample: Optional[bool] = None, max_new_tokens: Optional[int] = None):
        """The `GenerationConfig` that `vlm.generate(**generate_kwargs)` runs with: every field not passed comes
        from the VLM's own generation config (`config.vlm_generation_config`), e.g. Qwen2-VL's `top_k: 1` and
        `repetition_penalty: 1.05`. (Named apart from
        `generation_config`, transformers' own attribute, which `Trainer` and `generate` read.)"""
        # generate()'s own merge (private API, pinned by tests/test_fidelity.py against `vlm.generate`)
        kwargs = self.generate_kwargs(do_sample, max_new_tokens)
        generation_config, _ = self.vlm._prepare_generation_config(None, **kwargs)
        return generation_config

    def token_selection(self, input_ids, do_sample: bool, max_new_tokens: int):
        """`(generation config, logits processors)` as `vlm.generate` builds them for this prompt."""
        generation_config = self.generate_mode_config(do_sample, max_new_tokens)
        self.vlm._prepare_special_tokens(generation_config, True, device=input_ids.device)
        processors = self.vlm._get_logits_processor(
            generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            device=input_ids.device,
        )
        return generation_config, processors

    @staticmethod
    def _next_token(
        history: torch.Tensor,
        logits: torch.Tensor,
        processors: LogitsProcessorList,
        do_sample: bool,
        generator,
    ) -> torch.Tensor:
        """generate()'s token choice: processed scores, then argmax or a draw (from this loop's seeded `generator`,
        which generate() cannot take)."""
        scores = processors(history, logits)
        if not do_sample:
            return scores.argmax(-1)
        probs = scores.softmax(dim=-1)
        if isinstance(generator, (list, tuple)):  # one per row: a row's draws do not depend on its batch
            return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def decode(self, tokens: list[list[int]]) -> list[str]:
        """Generated token ids to text, as the reference decodes them (special tokens skipped)."""
        if self.tokenizer is None:
            raise ValueError(
                "Decoding generated text needs the VLM's tokenizer, and this model has none: build it with "
                "`from_vlm`, load it from a folder or repo that holds the tokenizer files, or set `model.tokenizer`."
            )
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate_answers(
        self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds, generator=None
    ) -> tuple[torch.Tensor, list[str]]:
        """The paper's VLM branch: generate an answer to the classification prompt (greedy, or sampled when
        `config.generate_do_sample`), decode it and parse it with the reference's rule (`parse_generated_answer`).

        Returns the one-hot vector `(batch, num_labels)`, all zeros for an answer that names no class, and the
        decoded answers.
        """
        tokens = self.generate_tokens(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds, generator=generator
        )
        texts = self.decode(tokens)
        one_hot = torch.zeros(len(texts), self.config.num_labels, device=input_ids.device)
        for row, text in enumerate(texts):
            label = parse_generated_answer(text, self.config.labels, self.config.answer_format)
            if label is not None:
                one_hot[row, label] = 1.0
        return one_hot, texts

    @torch.no_grad()
    def explain(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        task: str = "inference",
        max_new_tokens: Optional[int] = None,
        do_sample: bool = False,
        seed: Optional[int] = None,
        image_hidden_states: Optional[tuple[torch.Tensor, ...]] = None,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
    ) -> list[str]:
        r"""The VLM's own words about each image: its reasoning towards the emotion (`task="inference"`) or the key
        visual elements it sees (`task="observation"`), asked with the prompts of instruction tuning (the config's).

        Args:
            pixel_values (`torch.Tensor`, *optional*):
                The image processor's patches; not needed when `image_hidden_states` are given.
            image_grid_thw (`torch.LongTensor` of shape `(batch_size, 3)`):
                The image processor's patch grid of every image.
            task (`str`, *optional*, defaults to `"inference"`):
                `"inference"`, `"observation"` or `"classification"` (the classification answer as text).
            max_new_tokens (`int`, *optional*):
                Generation budget per image; `config.max_new_tokens` (256) by default.
            do_sample (`bool`, *optional*, defaults to `False`):
                Sample with the config's temperature and top-p (the reference's 0.8 and 1.0) instead of greedy; the
                VLM's generation config applies either way, as in `vlm.generate` (see `generate_tokens`).
            seed (`int`, *optional*):
                Seed of the sampling: the same seed gives the same texts.
            image_hidden_states (`tuple[torch.Tensor]`, *optional*):
                A forward's `image_hidden_states` (`output_image_hidden_states=True`) for the same images, as
                returned (Qwen3-VL's carry their deepstack features): reused, so the visual encoder does not run again.
            input_ids, attention_mask, mm_token_type_ids:
                The image processor's classification prompt, accepted so that `**image_processor(images)` can be
                passed; the task's own prompt replaces it.

        Returns one generated text per image, verbatim (special tokens removed).
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}")
        if image_grid_thw is None:
            raise ValueError("explain needs `image_grid_thw` (pass the image processor's output)")
        if self.tokenizer is None:
            self.decode([])  # raises the error that says how to attach a tokenizer
        device = self.vlm.device
        image_grid_thw = image_grid_thw.to(device)
        if image_hidden_states is None:
            if pixel_values is None:
                raise ValueError("explain needs `pixel_values` or a forward's `image_hidden_states`")
            image_hidden_states = self.get_image_embeds(pixel_values.to(device), image_grid_thw)
        if len(image_hidden_states) != len(image_grid_thw):
            raise ValueError(f"{len(image_hidden_states)} image_hidden_states for {len(image_grid_thw)} images")

        prefix, suffix = chat_token_ids(self.config, task, self.tokenizer)
        num_image_tokens = [len(embeds) for embeds in image_hidden_states]
        image_token_id, pad_token_id = self.config.vlm_config.image_token_id, padding_token_id(self.tokenizer)
        prompt = left_padded_prompts(prefix, suffix, image_token_id, pad_token_id, num_image_tokens)
        prompt = {name: value.to(device) for name, value in prompt.items()}
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        tokens = self.generate_tokens(
            prompt["input_ids"],
            prompt["attention_mask"],
            prompt["mm_token_type_ids"],
            image_grid_thw,
            image_hidden_states,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            generator=generator,
        )
        return self.decode(tokens)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        teacher_logits: Optional[torch.FloatTensor] = None,
        output_image_hidden_states: bool = False,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ) -> EmoVLMKDOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(num_patches, patch_dim)`):
            The patches of all images, as the image processor makes them.
        image_grid_thw (`torch.LongTensor` of shape `(batch_size, 3)`):
            The patch grid (time, height, width) of every image.
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            The classification prompt, left-padded, with one image placeholder per LM-ready image embedding.
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
            1 for prompt tokens, 0 for left padding.
        mm_token_type_ids (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
            1 at image placeholders (derived from `input_ids` when not given).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices; adds the cross-entropy of the gate's output (the fused logits before the calibration
            temperature) and the CE part of the KD loss to `loss`.
        teacher_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            Logits of the conventional vision model; adds the head's distillation loss to `loss`.
        output_image_hidden_states (`bool`, *optional*, defaults to `False`):
            Also return the per-image LM-ready image embeddings (for `explain`).
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
            Random source of the `"generate"` mode's sampling (`config.generate_do_sample`), for reproducible runs;
            one per image makes each image's answer independent of the batch it is in.

        Any other keyword is refused (a misspelt `label=` would otherwise silently give `loss=None`).
        """
        if kwargs:
            raise TypeError(unknown_arguments_message(type(self).forward, kwargs))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vlm_grad = torch.enable_grad() if torch.is_grad_enabled() and not self.config.freeze_vlm else torch.no_grad()
        log_likelihoods = None
        with vlm_grad:
            image_embeds = self.get_image_embeds(pixel_values, image_grid_thw)
            branch_inputs = (input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds)
            if self.config.vlm_branch_mode == "score":
                log_likelihoods = self.score_answers(*branch_inputs)
                vlm_scores = vlm_scores_from_log_likelihoods(log_likelihoods, self.config.vlm_branch_input)
            else:
                vlm_scores, _ = self.generate_answers(*branch_inputs, generator=generator)
            pooled = self.pool_image_embeds(image_embeds)

        head_logits = self.forward_head(pooled)
        gate_logits, gate_weights = self.forward_gate(head_logits, vlm_scores)
        # Temperature scaling (fitted on validation data; 1.0 = off): calibrated probabilities, the same argmax.
        logits = gate_logits / self.config.calibration_temperature

        loss, kd_loss = self.losses(head_logits, gate_logits, labels, teacher_logits)
        return EmoVLMKDOutput(
            loss=loss,
            logits=logits,
            head_logits=head_logits,
            vlm_scores=vlm_scores,
            vlm_log_likelihoods=log_likelihoods,
            gate_weights=gate_weights,
            image_embeds=pooled,
            image_hidden_states=image_embeds if output_image_hidden_states else None,
            distillation_loss=kd_loss,
        )


    def losses(self, head_logits, gate_logits, labels=None, teacher_logits=None):
        """`(loss, distillation_loss)`: the head's KD loss with `teacher_logits`, plus the cross-entropy of the gate's
        own output (before the calibration temperature: what stage 4 trains) with `labels`; None where not given."""
        loss = kd_loss = None
        if teacher_logits is not None:
            kd_loss = distillation_loss(
                head_logits.float(),
                teacher_logits.float(),
                labels,
                temperature=self.config.kd_temperature,
                alpha=self.config.kd_alpha,
            )
            loss = kd_loss
        if labels is not None:
            fused_loss = F.cross_entropy(gate_logits.float(), labels)
            loss = fused_loss if loss is None else loss + fused_loss
        return loss, kd_loss

def unknown_arguments_message(function, kwargs: dict) -> str:
    """What `function` was given that it does not take, the closest names it does take, and all of them."""
    accepted = [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    hints = []
    for name in kwargs:
        close = difflib.get_close_matches(name, accepted, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"{function.__qualname__} got unexpected keyword argument(s) {', '.join(hints)}; it takes {accepted}"


def head_in_features(config: EmoVLMKDConfig) -> int:
    """Width of the head's input: the LM's hidden size, times `1 + deepstack levels` with `head_input_deepstack`."""
    hidden_size = config.vlm_config.get_text_config().hidden_size
    if not config.head_input_deepstack:
        return hidden_size
    return hidden_size * (1 + get_adapter(config.vlm_config).deepstack_levels(config.vlm_config))


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: `<|im_end|>` for Qwen, else the tokenizer's end of sequence."""
    token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if token is None or token == tokenizer.unk_token_id:
        token = tokenizer.eos_token_id
    return token


def tokenize_answers(tokenizer, config: EmoVLMKDConfig) -> list[list[int]]:
    """Token ids of every class's answer followed by the end-of-turn token (so `sad` and `sadness` differ)."""
    end_token = end_of_turn_id(tokenizer)
    return [
        tokenizer(config.answer_text(label), add_special_tokens=False)["input_ids"] + [end_token]
        for label in config.labels
    ]


def answer_pattern(answer_format: str) -> re.Pattern:
    """The reference's parsing rule (`{'emotion':\\s*'.*?'}`) for any answer format: the format's text with any
    whitespace where it has whitespace, and the label as the shortest text in place of `<label>`."""
    before, after = answer_format.split("<label>", 1)

    def literal(text: str) -> str:
        return r"\s*".join(re.escape(part) for part in re.split(r"\s+", text))

    return re.compile(literal(before) + "(.*?)" + literal(after))


def parse_generated_answer(text: str, labels: list[str], answer_format: str = "{'emotion': '<label>'}"):
    """Index of the class a generated answer names, or None.

    As the reference parses (train_gate.py): the first answer-shaped match in the text counts, and its label must be
    one of the classes exactly.
    """
    match = answer_pattern(answer_format).search(text)
    if match is None or match.group(1) not in labels:
        return None
    return labels.index(match.group(1))


def tokenizer_with_chat_template(processor):
    """The processor's tokenizer, carrying the processor's chat template when it has none of its own (`explain`
    renders its prompts with it, and it is saved with the tokenizer)."""
    tokenizer = processor.tokenizer
    chat_template = getattr(processor, "chat_template", None)
    if getattr(tokenizer, "chat_template", None) is None and chat_template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    return tokenizer


def load_tokenizer(pretrained_model_name_or_path, vlm_config, from_pretrained_kwargs: dict):
    """The tokenizer saved with a model (folder or Hub repo), or None when there is none. It is the VLM's: the VLM's
    config tells `AutoTokenizer` its family (rather than this model's remote-code config)."""
    if pretrained_model_name_or_path is None:
        return None
    hub_kwargs = {name: from_pretrained_kwargs[name] for name in HUB_KWARGS if name in from_pretrained_kwargs}
    found = cached_file(
        pretrained_model_name_or_path,
        TOKENIZER_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if not found:
        return None
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, config=vlm_config, **hub_kwargs)


def check_head_and_gate_loaded(loading_info: dict, gate_type: str, source) -> None:
    """Refuse a checkpoint whose head or gate weights do not match this code's modules.

    transformers would initialise missing weights randomly and drop unexpected ones, silently changing the model.
    The case this guards: folders saved before the gates matched the reference's definitions (bilinear and
    dynamic_weighting had no `fc`, cross_gating fused through Linear(2C -> C), parameters had other names).
    """
    own = ("head.", "gate.")
    missing = sorted(key for key in loading_info["missing_keys"] if key.startswith(own))
    unexpected = sorted(key for key in loading_info["unexpected_keys"] if key.startswith(own))
    mismatched = sorted(str(entry[0]) for entry in loading_info["mismatched_keys"] if str(entry[0]).startswith(own))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The head/gate weights of {str(source)!r} do not fit this code's {gate_type!r} gate and head (missing: "
            f"{missing}, unexpected: {unexpected}, wrong shape: {mismatched}). Checkpoints saved before the gates "
            "were aligned with the paper's reference code (bilinear and dynamic_weighting gained an output Linear "
            "`fc`, cross_gating's `fc` became Linear(C -> C), parameters took the reference's names fc / gate / "
            "gate1 / gate2) cannot be loaded as they are: retrain the gate (stage 4) and export again."
        )


# Marks the class as remote code: transformers then copies this file and its relative imports into saved folders.
# The folder's auto_map comes from the config (`AUTO_MAP`), which names this class for the same entry.
EmoVLMKDForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "GATES",
    "EmoVLMKDForImageClassification",
    "EmoVLMKDPreTrainedModel",
    "EmoVLMKDOutput",
    "distillation_loss",
    "end_of_turn_id",
    "parse_generated_answer",
    "tokenize_answers",
    "vlm_scores_from_log_likelihoods",
]
