# Copyright 2026 The emovlm-kd authors. Licensed under the Apache License, Version 2.0.
"""EmoVLM-KD processor (remote code: copied into every exported model repo).

[`EmoVLMKDProcessor`] holds the VLM's tokenizer and the [`EmoVLMKDImageProcessor`]; it renders the method's chats
(`EmoVLMKDConfig.chat_messages`: settings only) with the VLM's chat template and tokenises them around the image, and
decodes generated text. `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns it for an exported
model; folders exported before it existed (an image processor registered as `AutoProcessor`, the tokenizer files
next to it) load with `EmoVLMKDProcessor.from_pretrained(folder)`.
"""

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

try:
    from .image_processing_emovlm_kd import EmoVLMKDImageProcessor, padding_token_id
    from .vlm_adapters_emovlm_kd import get_adapter
except ImportError:  # imported from the installed package rather than from a model folder
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor, padding_token_id
    from vlm_adapters_emovlm_kd import get_adapter


def render_chat(config, task: str, chat) -> str:
    """The chat for `task` (`config.chat_messages`) rendered by `chat` (a processor or a tokenizer with a chat
    template), ending with the assistant turn's header."""
    return chat.apply_chat_template(config.chat_messages(task), tokenize=False, add_generation_prompt=True)


def chat_token_ids(config, task: str, chat) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat for `task` before and after its single image placeholder.

    `chat` is the VLM processor or its tokenizer (with a chat template). The image placeholder is repeated once per
    LM-ready image embedding between the two parts.
    """
    tokenizer = getattr(chat, "tokenizer", chat)
    image_token = tokenizer.convert_ids_to_tokens(config.vlm_config.image_token_id)
    text = render_chat(config, task, chat)
    if text.count(image_token) != 1:
        raise ValueError(
            f"The chat template produced {text.count(image_token)} image placeholders, expected 1: {text!r}"
        )
    prefix, suffix = text.split(image_token)
    return (
        tokenizer(prefix, add_special_tokens=False)["input_ids"],
        tokenizer(suffix, add_special_tokens=False)["input_ids"],
    )


class EmoVLMKDProcessor(ProcessorMixin):
    r"""
    Processor of EmoVLM-KD: the VLM's tokenizer and the [`EmoVLMKDImageProcessor`] (which also writes the
    classification prompt around the image placeholders, so that it alone makes every model input, as the
    image-classification pipeline needs).

    Args:
        image_processor ([`EmoVLMKDImageProcessor`]): pixels and the classification prompt.
        tokenizer ([`PreTrainedTokenizerBase`]): the VLM's tokenizer, with the VLM's chat template.
        chat_template (`str`, *optional*): the VLM's chat template (default: the tokenizer's).

    Example:

    ```python
    >>> from transformers import AutoModelForImageClassification, AutoProcessor

    >>> processor = AutoProcessor.from_pretrained("your-name/emovlm-kd-fi", trust_remote_code=True)
    >>> model = AutoModelForImageClassification.from_pretrained("your-name/emovlm-kd-fi", trust_remote_code=True)
    >>> outputs = model(**processor(images=[image]))
    >>> prefix_ids, suffix_ids = processor.chat_token_ids(model.config, "inference")  # around the image tokens
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_vlm_processor(cls, vlm_processor, config, **image_processor_kwargs) -> "EmoVLMKDProcessor":
        """Build from a VLM processor (e.g. `Qwen2VLProcessor`) and an `EmoVLMKDConfig`: the classification chat
        rendered with the VLM's chat template and tokenised around the image."""
        if not hasattr(config, "chat_messages"):
            raise TypeError(
                f"from_vlm_processor takes the model's EmoVLMKDConfig (it defines the whole chat), got {type(config)}"
            )
        # the geometry (patch and merge sizes, normalisation, pixel limits) is the VLM processor's, checked against
        # the vision tower's by the family's adapter
        get_adapter(config.vlm_config).check_processor(config.vlm_config, vlm_processor.image_processor)
        prefix_ids, suffix_ids = chat_token_ids(config, "classification", vlm_processor)
        image_processor_config = vlm_processor.image_processor.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
            image_processor_config.pop(key, None)
        image_processor = EmoVLMKDImageProcessor(
            prompt_prefix_ids=prefix_ids,
            prompt_suffix_ids=suffix_ids,
            image_token_id=vlm_processor.image_token_id,
            pad_token_id=padding_token_id(vlm_processor.tokenizer),
            **{**image_processor_config, **image_processor_kwargs},
        )
        chat_template = getattr(vlm_processor, "chat_template", None)
        return cls(image_processor, vlm_processor.tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Every model input for `images`: the patches and the classification prompt (`text` is not taken: the
        prompt is the model's)."""
        if text is not None:
            raise ValueError("EmoVLMKDProcessor writes the model's own classification prompt; pass images only")
        return self.image_processor(images, return_tensors=return_tensors, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.image_processor.model_input_names)

    def render_chat(self, config, task: str) -> str:
        """The chat for `task` rendered with the VLM's chat template."""
        return render_chat(config, task, self)

    def chat_token_ids(self, config, task: str) -> tuple[list[int], list[int]]:
        """Token ids of the chat for `task` before and after the image placeholder."""
        return chat_token_ids(config, task, self)

    def batch_decode(self, tokens, **kwargs) -> list[str]:
        """Generated token ids to text, as the reference decodes them (special tokens skipped)."""
        kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False, **kwargs}
        return self.tokenizer.batch_decode(tokens, **kwargs)


# Marks the class as remote code: `save_pretrained` writes its `auto_map` entry and copies this file (and the image
# processing file it imports) into the folder.
EmoVLMKDProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["EmoVLMKDProcessor", "chat_token_ids", "render_chat"]
