"""Version ranges declared once and used everywhere (setup.py, the exported repo's requirements, constraints.txt), and
the few private library attributes the code relies on, each pinned here so that a library release that changes one
fails this file instead of every published model."""

import runpy
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import setuptools
import torch
from datasets import Dataset
from helpers_repo_template import ENDPOINT_REQUIREMENTS, SPACE_REQUIREMENTS
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from transformers import pipeline

from emovlm_kd.dependencies import CORE, DEMO, DOCS, QLORA, RANGES, TESTS, TRAIN, requirement
from emovlm_kd.sources import dataset_fingerprint
from emovlm_kd.stages.export import write_template_file
from emovlm_kd.testing import make_images

REPO_ROOT = Path(__file__).resolve().parent.parent
# Libraries whose internals the remote code or the package drives: each needs a ceiling at the tested minor.
INTERNALS_USED = ("transformers", "datasets", "accelerate")


def read_requirements(path: Path) -> dict[str, Requirement]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}


def test_setup_py_installs_the_declared_ranges(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO_ROOT)
    runpy.run_path(str(REPO_ROOT / "setup.py"))
    assert captured["install_requires"] == [requirement(name) for name in CORE]
    extras = captured["extras_require"]
    assert extras["train"] == [requirement(name) for name in TRAIN]
    assert extras["qlora"] == [requirement(name) for name in QLORA]
    assert extras["demo"] == [requirement(name) for name in DEMO]
    assert extras["docs"] == [requirement(name) for name in DOCS]
    assert set(extras["tests"]) == {requirement(name) for name in {**TESTS, **TRAIN, **DEMO, **DOCS}}


def test_ranges_have_floors_and_ceilings_where_internals_are_used():
    for name in CORE:
        assert any(spec.operator == ">=" for spec in SpecifierSet(RANGES[name])), name
    for name in INTERNALS_USED:
        assert any(spec.operator == "<" for spec in SpecifierSet(RANGES[name])), name
    assert SpecifierSet(RANGES["torch"]).contains("2.6.0") and not SpecifierSet(RANGES["torch"]).contains("2.5.1")
    assert not SpecifierSet(RANGES["pillow"]).contains("9.5.0")  # exif_transpose(in_place=True), transformers' floor
    assert RANGES["evaluate"] == "==0.4.6"  # tests/test_entry_points.py asserts that release's behaviour


@pytest.mark.parametrize("template", [ENDPOINT_REQUIREMENTS, SPACE_REQUIREMENTS], ids=["endpoint", "space"])
def test_exported_requirements_state_the_supported_ranges(template, tmp_path):
    written = tmp_path / "requirements.txt"
    write_template_file(template, written)  # as the export stage writes it into the model repo
    requirements = read_requirements(written)
    assert requirement("transformers") in written.read_text().splitlines()  # the same range as setup.py's
    for name, required in requirements.items():
        declared = next(key for key in RANGES if canonicalize_name(key) == name)
        assert required.specifier == SpecifierSet(RANGES[declared]), name
    # the template names only libraries with a declared range, so export never writes an unbounded line by mistake
    assert set(read_requirements(template)) <= {canonicalize_name(name) for name in RANGES}


def test_constraints_pin_every_dependency_inside_its_range():
    pins = read_requirements(REPO_ROOT / "constraints.txt")
    assert all(str(pin.specifier).startswith("==") for pin in pins.values())
    assert str(pins["torch"].specifier) == "==2.14.1" and str(pins["torchvision"].specifier) == "==0.29.1"
    for name, versions in RANGES.items():
        if name in QLORA:  # bitsandbytes: GPU only, not installed by CI
            continue
        pinned = next(iter(pins[canonicalize_name(name)].specifier)).version
        assert SpecifierSet(versions).contains(pinned, prereleases=True), (name, pinned, versions)


def test_installed_versions_are_inside_the_ranges():
    """The environment the suite runs in (CI installs constraints.txt) is one the ranges allow."""
    for name, versions in RANGES.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        assert SpecifierSet(versions).contains(installed, prereleases=True), (name, installed, versions)


# Private attributes: each is used in one function of the package, and pinned here.


def test_datasets_fingerprint_tracks_content():
    """`emovlm_kd.sources.dataset_fingerprint` reads `Dataset._fingerprint` (datasets has no public accessor)."""
    dataset = Dataset.from_dict({"label": [0, 1, 2]})
    fingerprint = dataset_fingerprint(dataset)
    assert isinstance(fingerprint, str) and len(fingerprint) >= 8
    assert dataset_fingerprint(dataset.map(lambda row: {"label": row["label"] + 1})) != fingerprint
    assert dataset_fingerprint(dataset.select([0, 1])) != fingerprint


def test_attention_backend_name_is_where_the_model_reads_it(tiny):
    """`_attention_mask_for_backend` reads `config._attn_implementation` of the VLM's language model (transformers
    has no public getter); it must name the backend the language model runs with."""
    model, _, _ = tiny
    language_model = model.vlm.model.language_model
    assert language_model.config._attn_implementation in ("sdpa", "eager")
    assert model.vlm.config._attn_implementation == language_model.config._attn_implementation


def test_pipeline_level_explain_allows_generation_arguments_per_call(tiny_folder):
    """The pipeline remembers `pipeline(..., explain=True)` itself (not through the base class's private state)."""
    explaining = pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True, explain=True)
    assert explaining.explain_by_default is True
    with torch.no_grad():
        result = explaining(make_images()[0], max_new_tokens=2)
    assert set(result) >= {"predictions", "explanation"}
    plain = pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True)
    with pytest.raises(ValueError, match="only apply with explain=True"):
        plain(make_images()[0], max_new_tokens=2)
