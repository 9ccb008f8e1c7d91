"""The lowest supported versions are measured, not guessed, in two fresh venvs (docs/supported-versions.md):

1. every library of `emovlm-kd[train]` at its floor (emovlm_kd/dependencies.py), the package importable from this
   checkout but not installed: the offline quickstart trains every stage and exports a model repo;
2. only the libraries that repo's `requirements.txt` names, each at the floor the file states, nothing of this
   project: the exported model loads with `AutoModelForImageClassification` and the pipeline, and gives the same
   classes, logits and pipeline outputs as the newest libraries in this process.

torch and torchvision are reused from this environment by default (hard links: no copy, no download; an old torch
from PyPI is a ~3 GB CUDA download), so CI does not measure their floors; `EMOVLM_KD_FLOOR_TORCH=1` floors them too.
Libraries that are needed but not named get whatever pip picks (the newest that fit). Needs PyPI; skipped when
`EMOVLM_KD_SKIP_FLOOR_TEST=1` (a machine without it).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_remote_code import check_fresh_result, run_fresh
from transformers import AutoImageProcessor, AutoModelForImageClassification

from emovlm_kd.dependencies import CORE, TRAIN
from emovlm_kd.dependencies import floor_pins

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EMOVLM_KD_SKIP_FLOOR_TEST") == "1", reason="EMOVLM_KD_SKIP_FLOOR_TEST=1"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOOR_TORCH = os.environ.get("EMOVLM_KD_FLOOR_TORCH") == "1"
REUSED = ("torch", "torchvision")  # unless FLOOR_TORCH


def stated_floors(requirements_file: Path) -> dict[str, str]:
    """{name: floor} of every library the file names: the version after `>=` (a library without one fails)."""
    pins = {}
    for line in requirements_file.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert floors, f"{line!r} in the exported {requirements_file.name} states no floor"
        pins[canonicalize_name(requirement.name)] = floors[0]
    return pins


def installed_closure(names) -> list:
    """The installed distributions `names` need, their requirements' included (markers evaluated here)."""
    found, todo = {}, list(names)
    while todo:
        requirement = Requirement(todo.pop())
        name = canonicalize_name(requirement.name)
        if name in found or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = distribution(name)
        except PackageNotFoundError:
            continue
        todo.extend(found[name].requires or [])
    return list(found.values())


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:  # another file system
        shutil.copy2(source, destination)


def reuse_distributions(distributions, site_packages: Path):
    """Put installed distributions into another venv as hard links (no extra disk; pip in that venv sees them as
    installed, and replacing one there never touches this environment's files)."""
    for dist in distributions:
        tops = {Path(str(path)).parts[0] for path in dist.files or [] if not str(path).startswith("..")}
        for top in sorted(tops):
            source, destination = Path(dist.locate_file(top)), site_packages / top
            if destination.exists() or not source.exists():
                continue
            if source.is_dir():
                shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, destination)


# The venv's commands run outside the repository, without PYTHONPATH: nothing of this checkout is importable there.
CLEAN_ENV = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PIP_CONSTRAINT")}


def run(command, cwd, env=None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd, env=env or CLEAN_ENV)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def make_floor_venv(venv: Path, pins: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A venv with exactly `pins` installed from PyPI (torch/torchvision reused unless FLOOR_TORCH): its python and
    {name: version} of everything installed there (checked: pip did not pick other versions of `pins`)."""
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    pins = dict(pins)
    if not FLOOR_TORCH:
        purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site_packages = Path(run([str(python), "-c", purelib], venv).strip())
        floored = set(pins) - set(REUSED)  # numpy, pillow: torchvision needs them, the pins say which versions
        closure = installed_closure(REUSED)
        reused = [dist for dist in closure if canonicalize_name(dist.metadata["Name"]) not in floored]
        reuse_distributions(reused, site_packages)
        pins.update({name: distribution(name).version for name in REUSED})
    requested = [f"{name}=={version}" for name, version in pins.items()]
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requested], venv)
    script = "import json, importlib.metadata as m; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    installed = {canonicalize_name(name): v for name, v in json.loads(run([str(python), "-c", script], venv)).items()}
    for name, floor in pins.items():
        assert Version(installed[name]) == Version(floor), (name, installed.get(name), floor)
    return python, installed


@pytest.fixture(scope="module")
def floor_export(tmp_path_factory) -> Path:
    """The offline quickstart (every training stage, then export) run with the package's and the training extra's
    floors, the package importable from this checkout but not installed; the exported model folder."""
    root = tmp_path_factory.mktemp("floor-train")
    pins = dict(pin.split("==") for pin in floor_pins([*CORE, *TRAIN]))
    python, installed = make_floor_venv(root / "venv", {canonicalize_name(name): v for name, v in pins.items()})
    print(f"training floor venv: {sorted(f'{name}=={installed[canonicalize_name(name)]}' for name in pins)}")
    env = {**CLEAN_ENV, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    out = run([str(python), str(REPO_ROOT / "examples" / "quickstart.py"), "--run-dir", str(root / "run")], root, env)
    model_dir = root / "run" / "model"
    assert f"The model folder is {model_dir}" in out and (model_dir / "model.safetensors").is_file(), out[-3000:]
    return model_dir


def test_floor_versions_load_an_exported_model(floor_export, tmp_path):
    pins = stated_floors(floor_export / "requirements.txt")  # what the exported repo states
    assert {"transformers", "huggingface-hub", "tokenizers", "pillow", "numpy", "torch"} <= set(pins)
    python, installed = make_floor_venv(tmp_path / "floor-venv", pins)
    # neither this package nor the training libraries are there
    assert not any(name.startswith("emovlm") for name in installed)
    assert not any(re.match(r"(accelerate|peft|datasets|timm)$", name) for name in installed)

    # the same classes, logits and pipeline outputs as the newest libraries give in this process
    model = AutoModelForImageClassification.from_pretrained(floor_export, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(floor_export, trust_remote_code=True)
    check_fresh_result((model, image_processor, None), run_fresh(floor_export, tmp_path, python=python), tmp_path)
    print(f"floor venv: {sorted(f'{name}=={installed[name]}' for name in pins)}")
