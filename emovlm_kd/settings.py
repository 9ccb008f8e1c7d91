"""What every setting affects, declared once, next to the setting.

Each argument dataclass declares, in its `AFFECTS` class variable, one line per field saying what the field changes
(a combination of [`Affects`] flags). Everything that must know it is derived from there:

  * a stage's fingerprint hashes the fields [`fingerprint_fields`] returns (`RESULT` or `VLM_FEATURES`), so
    `run_all` reruns the stage (and those after it) when one changes;
  * the feature cache's key hashes the `VLM_FEATURES` fields (`emovlm_kd.cache.VLM_FEATURE_FIELDS`), so stale VLM
    features are never reused;
  * stage 3's head spec and stage 4's gate spec carry the `MODEL_CONFIG` fields into the exported `EmoVLMKDConfig`;
  * the model card lists the `CARD` fields with their values.

`EmoVLMKDConfig` fields that no stage sets are classified in [`CONFIG_ONLY_FIELDS`]. `tests/test_settings.py` fails
on any config or argument field that is not classified. Adding a field is adding it to its dataclass and one line to
that class's `AFFECTS` (or to `CONFIG_ONLY_FIELDS` for a config field that no stage sets).
"""

import dataclasses
import enum


class Affects(enum.Flag):
    """What a setting changes. `NOTHING`: how a stage runs, not what it produces (batch size of an inference pass,
    checkpointing, logging, credentials)."""

    NOTHING = 0
    RESULT = enum.auto()  # what its stage produces: hashed by value into that stage's fingerprint
    CONTENT = enum.auto()  # names data or a model: the fingerprint hashes what it points at, not the name
    VLM_FEATURES = enum.auto()  # what the frozen VLM computes: in the feature-cache key (and the fingerprint)
    MODEL_CONFIG = enum.auto()  # saved in the exported model's config (through the head or gate spec)
    CARD = enum.auto()  # listed with its value on the model card


NOTHING, RESULT, CONTENT = Affects.NOTHING, Affects.RESULT, Affects.CONTENT
VLM_FEATURES, MODEL_CONFIG, CARD = Affects.VLM_FEATURES, Affects.MODEL_CONFIG, Affects.CARD

# `EmoVLMKDConfig` fields that no stage argument sets, with what they are.
CONFIG_ONLY_FIELDS = {
    "vlm_config": "the VLM's own config (from the VLM the run used)",
    "initializer_range": "initialisation of a fresh head and gate (stages build them from their seed)",
    "answer_token_ids": "derived from answer_format and the VLM's tokenizer",
    "vlm_generation_config": "the VLM's own generation config (from the VLM the run used), which generate mode honours",
    "calibration_temperature": "fitted on the validation split by stage 5 (`evaluate --temperature-scaling`)",
    "freeze_vlm": "the VLM is frozen in every stage after stage 1; a setting for fine-tuning with Trainer",
}


def affects_of(arguments) -> dict[str, Affects]:
    """`{field: Affects}` of an argument dataclass (or instance): the `AFFECTS` of its class and of its bases
    (a subclass's line wins)."""
    cls = arguments if isinstance(arguments, type) else type(arguments)
    declared = {}
    for base in reversed(cls.__mro__):
        declared.update(vars(base).get("AFFECTS", {}))
    return declared


def unclassified_fields(arguments) -> list[str]:
    """Fields of an argument dataclass with no `AFFECTS` line."""
    declared = affects_of(arguments)
    return [f.name for f in dataclasses.fields(arguments) if f.name not in declared]


def _declared(arguments) -> dict[str, Affects]:
    declared = affects_of(arguments)
    missing = unclassified_fields(arguments)
    if missing:
        cls = arguments if isinstance(arguments, type) else type(arguments)
        raise TypeError(f"{cls.__name__} fields {missing} are not classified: add them to its AFFECTS")
    return {f.name: declared[f.name] for f in dataclasses.fields(arguments)}


def fields_with(arguments, flags: Affects) -> tuple[str, ...]:
    """The fields of an argument dataclass declared with every one of `flags`, in field order."""
    return tuple(name for name, affects in _declared(arguments).items() if affects & flags == flags)


def fingerprint_fields(arguments) -> tuple[str, ...]:
    """The fields a stage's fingerprint hashes by value: those that change what the stage produces (`RESULT` or
    `VLM_FEATURES`), not those it hashes by content only (`CONTENT`)."""
    return tuple(name for name, affects in _declared(arguments).items() if affects & (RESULT | VLM_FEATURES))


def values_with(arguments, flags: Affects) -> dict:
    """`{field: value}` of an argument instance's fields declared with every one of `flags`."""
    return {name: getattr(arguments, name) for name in fields_with(arguments, flags)}


__all__ = [
    "Affects",
    "CARD",
    "CONFIG_ONLY_FIELDS",
    "CONTENT",
    "MODEL_CONFIG",
    "NOTHING",
    "RESULT",
    "VLM_FEATURES",
    "affects_of",
    "fields_with",
    "fingerprint_fields",
    "unclassified_fields",
    "values_with",
]
