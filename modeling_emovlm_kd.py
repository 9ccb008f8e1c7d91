# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD model (remote code: copied into every exported model repo).

One forward runs the VLM's visual encoder once per image. The LM-ready image embeddings feed both
  * the VLM branch: the exact log-likelihood of every class's answer string given image and prompt, computed in one
    language-model pass over the prompt followed by a token trie of all answers (tree-shaped attention mask), and
  * the distilled head: an MLP on the per-image mean of the same embeddings;
and a gate fuses the two predictions into `logits`.
"""

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_emovlm_kd import EmoVLMKDConfig
    from .pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline
except ImportError:  # imported from the installed package rather than from a model folder
    from configuration_emovlm_kd import EmoVLMKDConfig
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline


@dataclass
class EmoVLMKDOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the fused cross-entropy (when `labels` are given) and the distillation loss of the head (when
        `teacher_logits` are given).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Fused class scores (before softmax).
    head_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Class scores of the distilled head.
    vlm_scores (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        The VLM branch as the gate sees it: class probabilities, or a one-hot vector (all zeros when a generated
        answer names no class).
    vlm_log_likelihoods (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        Log-likelihood of each class's full answer given image and prompt (`"score"` mode only).
    gate_weights (`torch.FloatTensor`, *optional*):
        How the gate weighed its inputs, for the gates that have such weights (`moe`: `(batch, experts)`,
        `dynamic_weighting`: `(batch, 2)` for (head, VLM), `cross_gating`: `(batch, 2, num_labels)`).
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Mean-pooled LM-ready image embeddings, the head's input.
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


def vlm_gate_input(vlm_log_likelihoods: torch.Tensor, vlm_branch_input: str = "probs") -> torch.Tensor:
    """What the gate sees of the VLM branch in `"score"` mode: class probabilities, or a one-hot argmax (paper)."""
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


# Gates: (head_logits, vlm_scores), both (batch, C) -> (fused logits (batch, C), weights or None).
class ConcatLinearGate(nn.Module):
    """Linear(2C -> C) over the concatenated predictions (the paper's default and best variant)."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.proj = nn.Linear(2 * num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        return self.proj(torch.cat([head_logits, vlm_scores], dim=-1)), None


class BilinearGate(nn.Module):
    """Bilinear interaction of the two predictions."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.bilinear = nn.Bilinear(num_labels, num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        return self.bilinear(head_logits, vlm_scores), None


class MoEGate(nn.Module):
    """Mixture of linear experts over the concatenated predictions, routed by a softmax gate."""

    def __init__(self, num_labels: int, num_experts: int = 3, **_):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2 * num_labels, num_labels) for _ in range(num_experts))
        self.router = nn.Linear(2 * num_labels, num_experts)

    def forward(self, head_logits, vlm_scores):
        features = torch.cat([head_logits, vlm_scores], dim=-1)
        weights = self.router(features).softmax(dim=-1)  # (batch, experts)
        experts = torch.stack([expert(features) for expert in self.experts], dim=1)  # (batch, experts, C)
        return (weights.unsqueeze(-1) * experts).sum(dim=1), weights


class DynamicWeightingGate(nn.Module):
    """Per-sample convex combination of the two predictions."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.weighting = nn.Linear(2 * num_labels, 2)

    def forward(self, head_logits, vlm_scores):
        weights = self.weighting(torch.cat([head_logits, vlm_scores], dim=-1)).softmax(dim=-1)  # (batch, 2)
        return weights[:, :1] * head_logits + weights[:, 1:] * vlm_scores, weights


class CrossGatingGate(nn.Module):
    """Each branch is gated, per class, by a sigmoid of the other; a linear layer fuses the gated pair."""

    def __init__(self, num_labels: int, **_):
        super().__init__()
        self.gate_head = nn.Linear(num_labels, num_labels)
        self.gate_vlm = nn.Linear(num_labels, num_labels)
        self.proj = nn.Linear(2 * num_labels, num_labels)

    def forward(self, head_logits, vlm_scores):
        head_gate = torch.sigmoid(self.gate_head(vlm_scores))
        vlm_gate = torch.sigmoid(self.gate_vlm(head_logits))
        fused = self.proj(torch.cat([head_logits * head_gate, vlm_scores * vlm_gate], dim=-1))
        return fused, torch.stack([head_gate, vlm_gate], dim=1)


GATES = {
    "concat_linear": ConcatLinearGate,
    "bilinear": BilinearGate,
    "moe": MoEGate,
    "dynamic_weighting": DynamicWeightingGate,
    "cross_gating": CrossGatingGate,
}


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
    _supports_attention_backend = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def _init_weights(self, module):
        # Only the head and the gates live here; the VLM (a PreTrainedModel) initialises its own modules.
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Bilinear)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class EmoVLMKDForImageClassification(EmoVLMKDPreTrainedModel):
    r"""
    EmoVLM-KD: a (frozen) VLM, a head distilled onto the VLM's image embeddings, and a gate fusing both.

    Inputs are what [`EmoVLMKDImageProcessor`] produces: `pixel_values` `(num_patches, patch_dim)`,
    `image_grid_thw` `(batch, 3)`, `input_ids` / `attention_mask` / `mm_token_type_ids` `(batch, seq_len)`
    (the classification prompt, left-padded).
    """

    def __init__(self, config: EmoVLMKDConfig):
        super().__init__(config)
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        hidden_size = config.vlm_config.get_text_config().hidden_size
        self.head = EmoVLMKDHead(hidden_size, config.head_hidden_sizes, config.num_labels, config.head_dropout)
        self.gate = GATES[config.gate_type](config.num_labels, num_experts=config.gate_num_experts)
        self._trie = AnswerTrie(config.answer_token_ids) if config.answer_token_ids else None
        if config.freeze_vlm:
            self.vlm.requires_grad_(False)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vlm(cls, vlm, processor=None, id2label: dict[int, str] | list[str] = None, **config_kwargs):
        """Wrap a VLM with a fresh head and gate for a label set.

        Args:
            vlm (`str` or `PreTrainedModel`): an `AutoModelForImageTextToText` checkpoint name or folder
                (e.g. `"Qwen/Qwen2-VL-2B-Instruct"`), or an already loaded model. Its weights are used as they are.
            processor: the VLM's processor (e.g. `Qwen2VLProcessor`), whose tokenizer tokenises the class answers;
                loaded from `vlm` when `vlm` is a name and `processor` is None.
            id2label: the classes, as `{index: name}` or a list of names in order.
            **config_kwargs: any [`EmoVLMKDConfig`] field (gate_type, head_hidden_sizes, ...).

        Returns the model; build the matching image processor with
        `EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config.prompt_text())`.
        """
        if id2label is None:
            raise ValueError("from_vlm needs the class labels (id2label)")
        if isinstance(vlm, str):
            if processor is None:
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(vlm)
            vlm = AutoModelForImageTextToText.from_pretrained(vlm, dtype=config_kwargs.pop("dtype", "auto"))
        if processor is None:
            raise ValueError("from_vlm needs the VLM's processor to tokenise the class answers")
        if isinstance(id2label, (list, tuple)):
            id2label = dict(enumerate(id2label))
        config = EmoVLMKDConfig(
            vlm_config=vlm.config,
            id2label=dict(id2label),
            label2id={name: index for index, name in id2label.items()},
            **config_kwargs,
        )
        config.answer_token_ids = tokenize_answers(processor.tokenizer, config)
        with torch.device("meta"):  # skip building (and initialising) a second, random VLM
            model = cls(config)
        model.vlm = vlm
        device = next(vlm.parameters()).device
        for module in (model.head, model.gate):
            module.to_empty(device=device)
            for submodule in module.modules():
                model._init_weights(submodule)
        model.set_trainable(head=True, gate=True, vlm=not config.freeze_vlm)
        return model

    # ------------------------------------------------------------------ trainability
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

    # ------------------------------------------------------------------ timm-style pieces
    def get_image_embeds(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The single pass of the visual encoder: LM-ready embeddings, one `(tokens_i, hidden)` tensor per image."""
        return self.vlm.model.get_image_features(pixel_values, image_grid_thw).pooler_output

    @staticmethod
    def pool_image_embeds(image_embeds: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack([embeds.mean(dim=0) for embeds in image_embeds])

    def forward_head(self, pooled_image_embeds: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_image_embeds.to(self.head.mlp[0].weight.dtype))

    def vlm_gate_input(self, vlm_log_likelihoods: torch.Tensor) -> torch.Tensor:
        return vlm_gate_input(vlm_log_likelihoods, self.config.vlm_branch_input)

    def forward_gate(self, head_logits: torch.Tensor, vlm_scores: torch.Tensor):
        return self.gate(head_logits, vlm_scores.to(head_logits.dtype))

    # ------------------------------------------------------------------ the VLM branch
    def _prompt_embeds(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        """Prompt embeddings with the image embeddings scattered in, and Qwen2-VL's 3D rope positions."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("EmoVLM-KD expects left-padded prompts (the processor's default)")
        inputs_embeds = self.vlm.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.config.vlm_config.image_token_id).unsqueeze(-1)
        flat = torch.cat(image_embeds, dim=0).to(inputs_embeds.dtype)
        if int(image_mask.sum()) != flat.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image placeholder tokens but {flat.shape[0]} image embeddings")
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, flat)
        if mm_token_type_ids is None:
            mm_token_type_ids = image_mask.squeeze(-1).long()
        position_ids, _ = self.vlm.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return inputs_embeds, position_ids

    def _attention_mask_for_backend(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tree-shaped 4D mask in the form the attention backend takes (boolean for SDPA, additive for eager)."""
        backend = self.vlm.model.language_model.config._attn_implementation
        if backend in (None, "sdpa"):
            return allowed
        if backend == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        raise ValueError(
            f"The 'score' VLM branch needs a custom attention mask, which attn_implementation={backend!r} does not "
            "take; load the model with attn_implementation='sdpa' (default) or 'eager'."
        )

    def score_answers(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        """Exact log-likelihood `(batch, num_labels)` of every class's answer given image and prompt.

        One language-model pass over `[prompt ; trie of all answers]`: trie nodes attend to the prompt and to their
        own ancestors only, and sit at the text positions they would have right after the prompt, so each node's
        hidden state equals the one of a separate forward over prompt + that answer. Leaves are left out of the pass
        (nothing is predicted from them).
        """
        if self._trie is None:
            raise ValueError("config.answer_token_ids is empty; build the model with `from_vlm` to tokenise answers")
        trie = self._trie.tensors(input_ids.device)
        prompt_embeds, position_ids = self._prompt_embeds(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds
        )
        batch, length, _ = prompt_embeds.shape
        nodes = len(trie["context_tokens"])

        node_embeds = self.vlm.get_input_embeddings()(trie["context_tokens"]).unsqueeze(0).expand(batch, -1, -1)
        inputs_embeds = torch.cat([prompt_embeds, node_embeds.to(prompt_embeds.dtype)], dim=1)
        next_position = position_ids.amax(dim=(0, 2)) + 1  # (batch,): first text position after the prompt
        node_positions = (next_position[:, None] + trie["context_depths"][None, :]).unsqueeze(0).expand(3, -1, -1)
        position_ids = torch.cat([position_ids, node_positions], dim=2)

        keys_valid = attention_mask.bool()
        allowed = torch.zeros(batch, length + nodes, length + nodes, dtype=torch.bool, device=input_ids.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        allowed[:, :length, :length] = causal & keys_valid[:, None, :]
        allowed[:, length:, :length] = keys_valid[:, None, :]
        allowed[:, length:, length:] = trie["context_ancestors"]
        allowed |= torch.eye(length + nodes, dtype=torch.bool, device=input_ids.device)  # padding rows: no NaN
        mask = self._attention_mask_for_backend(allowed.unsqueeze(1), inputs_embeds.dtype)

        hidden = self.vlm.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # node i is predicted from its parent's hidden state (the last prompt token for first answer tokens)
        predicted_from = torch.where(trie["parents"] < 0, length - 1, length + trie["parent_slot"])
        positions, which = torch.unique(predicted_from, return_inverse=True)
        log_probs = self.vlm.get_output_embeddings()(hidden[:, positions]).float().log_softmax(dim=-1)
        node_log_probs = log_probs[:, which, trie["tokens"]]  # (batch, nodes)
        return node_log_probs @ trie["paths"].T

    def generate_answers(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds):
        """The paper's way: greedy generation, parsed into a one-hot vector `(batch, num_labels)`.

        An answer is parsed as class `c` when it contains class `c`'s answer tokens (the earliest match wins);
        an answer that names no class becomes all zeros. Returns (one_hot, generated token ids).
        """
        from transformers import DynamicCache

        inputs_embeds, position_ids = self._prompt_embeds(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds
        )
        language_model, embed = self.vlm.model.language_model, self.vlm.get_input_embeddings()
        end_token = self.config.answer_token_ids[0][-1]
        cache = DynamicCache(config=language_model.config)
        next_position = position_ids.amax(dim=(0, 2)) + 1
        mask = attention_mask
        generated, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(self.config.max_new_tokens):
            hidden = language_model(
                inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            ).last_hidden_state
            token = self.vlm.get_output_embeddings()(hidden[:, -1]).argmax(-1)
            token = torch.where(done, torch.full_like(token, end_token), token)
            generated.append(token)
            done |= token == end_token
            if bool(done.all()):
                break
            inputs_embeds = embed(token).unsqueeze(1)
            position_ids = (next_position + step).view(1, -1, 1).expand(3, -1, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        generated = torch.stack(generated, dim=1).tolist()
        one_hot = torch.zeros(len(generated), self.config.num_labels, device=input_ids.device)
        for row, tokens in enumerate(generated):
            label = parse_generated_answer(tokens, [answer[:-1] for answer in self.config.answer_token_ids])
            if label is not None:
                one_hot[row, label] = 1.0
        return one_hot, generated

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        teacher_logits: Optional[torch.FloatTensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> EmoVLMKDOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices; adds the cross-entropy of the fused logits (and the CE part of the KD loss) to `loss`.
        teacher_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            Logits of the conventional vision model; adds the head's distillation loss to `loss`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vlm_grad = torch.enable_grad() if torch.is_grad_enabled() and not self.config.freeze_vlm else torch.no_grad()
        log_likelihoods = None
        with vlm_grad:
            image_embeds = self.get_image_embeds(pixel_values, image_grid_thw)
            branch_inputs = (input_ids, attention_mask, mm_token_type_ids, image_grid_thw, image_embeds)
            if self.config.vlm_branch_mode == "score":
                log_likelihoods = self.score_answers(*branch_inputs)
                vlm_scores = self.vlm_gate_input(log_likelihoods)
            else:
                vlm_scores, _ = self.generate_answers(*branch_inputs)
            pooled = self.pool_image_embeds(image_embeds)

        head_logits = self.forward_head(pooled)
        logits, gate_weights = self.forward_gate(head_logits, vlm_scores)

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
            fused_loss = F.cross_entropy(logits.float(), labels)
            loss = fused_loss if loss is None else loss + fused_loss

        return EmoVLMKDOutput(
            loss=loss,
            logits=logits,
            head_logits=head_logits,
            vlm_scores=vlm_scores,
            vlm_log_likelihoods=log_likelihoods,
            gate_weights=gate_weights,
            image_embeds=pooled,
            distillation_loss=kd_loss,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One auto_map for the config, AutoModel and AutoModelForImageClassification (remote code), and the
        # pipeline that feeds images to the model's own image processor. The remote-code files (this one and the
        # ones it imports relatively) are copied into the folder by transformers.
        self.config.auto_map = {
            "AutoConfig": "configuration_emovlm_kd.EmoVLMKDConfig",
            "AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
            "AutoModelForImageClassification": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
        }
        self.config.custom_pipelines = {
            "image-classification": {
                "impl": f"pipeline_emovlm_kd.{EmoVLMKDImageClassificationPipeline.__name__}",
                "pt": ["AutoModelForImageClassification"],
                "tf": [],
                "type": "image",
            }
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


def tokenize_answers(tokenizer, config: EmoVLMKDConfig) -> list[list[int]]:
    """Token ids of every class's answer followed by the end-of-turn token (so `sad` and `sadness` differ)."""
    end_token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end_token is None or end_token == tokenizer.unk_token_id:
        end_token = tokenizer.eos_token_id
    return [
        tokenizer(config.answer_text(label), add_special_tokens=False)["input_ids"] + [end_token]
        for label in config.labels
    ]


def parse_generated_answer(tokens: list[int], answers: list[list[int]]) -> Optional[int]:
    """Index of the class whose answer tokens occur earliest in `tokens`, or None."""
    text = " " + " ".join(map(str, tokens)) + " "
    best = None
    for label, answer in enumerate(answers):
        match = re.search(" " + " ".join(map(str, answer)) + " ", text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), label)
    return None if best is None else best[1]


EmoVLMKDForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "EmoVLMKDForImageClassification",
    "EmoVLMKDPreTrainedModel",
    "EmoVLMKDOutput",
    "distillation_loss",
    "tokenize_answers",
    "vlm_gate_input",
]
