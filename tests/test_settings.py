"""Every setting is declared once with what it affects (`emovlm_kd.settings`), and the fingerprints, the feature-cache
key, the head and gate specs (the exported config) follow that declaration: checked by changing each field."""

import copy
import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

import emovlm_kd
from configuration_emovlm_kd import EmoVLMKDConfig
from emovlm_kd import settings
from emovlm_kd.arguments import RunArguments
from emovlm_kd.cache import VLM_FEATURE_FIELDS, vlm_feature_key
from emovlm_kd.settings import CONTENT, MODEL_CONFIG, RESULT, VLM_FEATURES, Affects
from emovlm_kd.stages import STAGES, distill, gate

STAGE_MODULES = {stage: importlib.import_module(f"emovlm_kd.stages.{stage}") for stage in STAGES}


def argument_classes() -> list[type]:
    """Every `*Arguments` dataclass defined in the package (the stages', the shared ones, predict's, run_all's)."""
    found = {}
    modules = [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for package in (emovlm_kd, emovlm_kd.stages)
        for info in pkgutil.iter_modules(package.__path__)
        if not info.ispkg
    ]
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__name__.endswith("Arguments"):
                found[value.__qualname__, value.__module__] = value
    return list(found.values())


def config_fields() -> list[str]:
    """The fields `EmoVLMKDConfig` itself declares (not transformers' `PreTrainedConfig` ones)."""
    return list(EmoVLMKDConfig.__annotations__)


@pytest.mark.parametrize("arguments", argument_classes(), ids=lambda cls: cls.__name__)
def test_every_argument_field_is_classified(arguments):
    assert settings.unclassified_fields(arguments) == [], (
        f"Classify the new field(s) of {arguments.__name__}: one line each in its AFFECTS (see emovlm_kd/settings.py)"
    )
    assert all(isinstance(affects, Affects) for affects in settings.affects_of(arguments).values())


def test_the_argument_classes_are_all_found():
    names = {cls.__name__ for cls in argument_classes()}
    assert {module.ARGUMENTS.__name__ for module in STAGE_MODULES.values()} <= names
    assert {"RunArguments", "RunAllArguments", "PredictArguments", "ExportArguments", "ChatRequestArguments"} <= names


def test_every_config_field_is_classified():
    """A config field is set by a stage (declared `MODEL_CONFIG` there) or listed as config-only; nothing else."""
    set_by_stages = {
        name for cls in argument_classes() for name in settings.fields_with(cls, MODEL_CONFIG)
    }
    unclassified = [name for name in config_fields() if name not in set_by_stages | set(settings.CONFIG_ONLY_FIELDS)]
    assert unclassified == [], (
        f"Classify the new EmoVLMKDConfig field(s) {unclassified}: declare them MODEL_CONFIG in the stage argument "
        "that sets them, or add them to settings.CONFIG_ONLY_FIELDS"
    )
    assert set_by_stages <= set(config_fields()), "MODEL_CONFIG is declared for a field the config does not have"
    assert not set_by_stages & set(settings.CONFIG_ONLY_FIELDS)


def test_an_unclassified_field_is_found_and_refused():
    @dataclass
    class WithNewField(distill.DistillArguments):
        AFFECTS: ClassVar[dict] = {"declared": RESULT}
        declared: int = 1
        forgotten: int = field(default=0)

    assert settings.unclassified_fields(WithNewField) == ["forgotten"]
    with pytest.raises(TypeError, match="forgotten"):
        settings.fingerprint_fields(WithNewField)


def changed(value, annotation):
    """A different valid-looking value of a field's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        options = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            return next(option for option in options if option != value)
        return value + " (changed)"
    if isinstance(value, list):
        return [*value, value[0] if value else "x"]
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]  # `X | None`, set to None
    if typing.get_origin(kinds[0]) is typing.Literal:
        return typing.get_args(kinds[0])[0]
    return {str: "changed", int: 3, float: 0.5, list: ["a", "b"]}[typing.get_origin(kinds[0]) or kinds[0]]


def field_types(cls) -> dict:
    return typing.get_type_hints(cls)


@pytest.fixture
def stage_inputs(tmp_path, monkeypatch):
    """Each stage's fingerprint on fixed upstream fingerprints and data hash (no data, no upstream runs)."""
    for module in STAGE_MODULES.values():
        for name, value in {"source_hash": lambda run_args: "data", "upstream_fingerprint": lambda *a: "up"}.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    return RunArguments(run_dir=str(tmp_path / "run"))


def fingerprint_of(module, run_args, args):
    if module is distill:
        return module.fingerprint(run_args, args, class_names=["a", "b"])
    return module.fingerprint(run_args, args)


@pytest.mark.parametrize("stage", STAGES)
def test_fingerprints_follow_the_declaration(stage, stage_inputs):
    """Changing a RESULT / VLM_FEATURES field changes the stage's fingerprint; a NOTHING field leaves it."""
    module = STAGE_MODULES[stage]
    run_args, args = stage_inputs, module.ARGUMENTS()
    before = fingerprint_of(module, run_args, args)
    hints = field_types(module.ARGUMENTS)
    for name, affects in settings.affects_of(module.ARGUMENTS).items():
        if affects & CONTENT:  # hashed by what it points at; covered by the stages' own tests
            continue
        other = copy.deepcopy(args)
        setattr(other, name, changed(getattr(args, name), hints[name]))
        after = fingerprint_of(module, run_args, other)
        if affects & (RESULT | VLM_FEATURES):
            assert after != before, f"{stage}.{name} is declared to change the result but not in the fingerprint"
        else:
            assert after == before, f"{stage}.{name} is declared NOTHING but changes the fingerprint"


def test_vlm_features_follow_the_declaration(tmp_path):
    """The feature-cache key changes with every VLM_FEATURES field and only with those; the head spec carries
    exactly the MODEL_CONFIG fields."""
    run_args, args = RunArguments(run_dir=str(tmp_path / "run")), distill.DistillArguments(vlm="tiny")
    spec = distill.feature_spec(run_args, args, ["a", "b"])
    assert set(spec["model_config"]) == set(settings.fields_with(args, MODEL_CONFIG))
    hints = field_types(distill.DistillArguments)
    for name, affects in settings.affects_of(args).items():
        other = copy.deepcopy(args)
        setattr(other, name, changed(getattr(args, name), hints[name]))
        key = vlm_feature_key(distill.feature_spec(run_args, other, ["a", "b"]), "split")
        assert (key != vlm_feature_key(spec, "split")) == bool(affects & VLM_FEATURES), name
    assert set(VLM_FEATURE_FIELDS) == set(settings.fields_with(args, VLM_FEATURES | MODEL_CONFIG))


def test_the_gate_spec_carries_its_model_config_fields():
    spec = gate.gate_spec(gate.GateArguments(), ["a", "b"])
    assert set(spec) - {"class_names"} == set(settings.fields_with(gate.GateArguments, MODEL_CONFIG))
    assert set(spec) - {"class_names"} <= set(config_fields())


def test_the_card_lists_the_card_settings_each_stage_recorded(tmp_path):
    from emovlm_kd.model_card import card_settings
    from emovlm_kd.run_dir import write_complete
    from emovlm_kd.settings import CARD, values_with

    assert card_settings(tmp_path) is None
    write_complete(tmp_path, "distill", "f", card_settings=values_with(distill.DistillArguments(), CARD))
    write_complete(tmp_path, "gate", "g", card_settings=values_with(gate.GateArguments(gate_type="moe"), CARD))
    text = card_settings(tmp_path)
    assert "`kd_alpha`: 0.5" in text and "`gate_type`: 'moe'" in text and "`vlm_branch_mode`: 'score'" in text
    assert "learning_rate" not in text and "feature_batch_size" not in text
