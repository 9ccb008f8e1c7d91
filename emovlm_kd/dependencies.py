"""The supported version range of every library the package uses, declared once.

`setup.py` reads this file without importing the package, the export stage writes the model repo's
`requirements.txt` files from it, and the floor-versions test (`tests/test_dependency_floors.py`) installs its floors.
Floors are the lowest versions that work (docs/supported-versions.md says how each one is known); a ceiling sits below
the next minor release of a library whose internals the remote code or the package drives (transformers' Qwen2-VL
internals and `_attn_implementation`, datasets' `_fingerprint`, accelerate's `PartialState._shared_state`), so a
release nobody tested never installs under a published model. Raise a ceiling after the suite passed with that release.
This file must stay plain Python with no imports: `setup.py` runs it before anything is installed.
"""

# What an exported model needs to load and run (the model repo's requirements; `pip install emovlm-kd`).
CORE = {
    "torch": ">=2.6",
    "torchvision": ">=0.21",
    "transformers": ">=5.24,<5.25",
    "huggingface_hub": ">=1.31,<3",
    "safetensors": ">=0.8",
    "tokenizers": ">=0.23.1",
    "pillow": ">=10.0.1",
    "numpy": ">=2.0",  # pyarrow (datasets) needs NumPy 2 at import, though its metadata does not say so
}
# Training and evaluation (`pip install emovlm-kd[train]`).
TRAIN = {
    "accelerate": ">=1.10,<1.17",
    "peft": ">=0.18",  # 0.17 imports transformers 4's HybridCache
    "datasets": ">=4.0,<5.3",
    "timm": ">=1.0.31",  # timm.data.resolve_input_data_config (the teacher's transforms) is new in 1.0.31
    "scikit-learn": ">=1.5",  # the first releases built for NumPy 2 (with matplotlib 3.9 and tensorboard 2.18)
    "tensorboard": ">=2.18",
    "matplotlib": ">=3.9",
    "torchmetrics": ">=1.6",  # calibration error (stage 5); 1.5 refuses NumPy 2
    "scipy": ">=1.13",  # the temperature's bounded 1-D search; the first release built for NumPy 2
    "pyyaml": ">=6.0.1",
    "tqdm": ">=4.66.3",
    "filelock": ">=3.16",  # the run-directory lock (emovlm_kd.run_dir): FileLock(thread_local=False)
}
QLORA = {"bitsandbytes": ""}
DEMO = {"gradio": ">=5"}
# The documentation site (`mkdocs build --strict`, tests/test_docs_site.py); mkdocstrings-python brings mkdocstrings.
DOCS = {"mkdocs-material": ">=9.5", "mkdocstrings-python": ">=2.0"}
# evaluate: tests/test_entry_points.py asserts 0.4.6's behaviour (it refuses transformers 5 pipelines).
TESTS = {"pytest": "", "selenium": "", "evaluate": "==0.4.6"}

RANGES = {**CORE, **TRAIN, **QLORA, **DEMO, **DOCS, **TESTS}


def requirement(name: str) -> str:
    """`name` with its supported range, as pip takes it: `requirement("transformers")` -> `transformers>=5.24,<5.25`"""
    return f"{name}{RANGES[name]}"


def pin_requirements(text: str) -> str:
    """A requirements file with every bare line that names a library of `RANGES` given its range (comments, blank
    lines and lines that already carry a version or marker are kept as they are)."""
    lines = []
    for line in text.splitlines():
        name = line.strip()
        lines.append(requirement(name) if name in RANGES else line)
    return "\n".join(lines) + "\n"


def floor_pins(names) -> list[str]:
    """`name==floor` for each name with a `>=` floor (the lowest supported versions, for the floor-versions test)."""
    pins = []
    for name in names:
        floor = next((part[2:] for part in RANGES[name].split(",") if part.startswith(">=")), None)
        if floor is None:
            raise ValueError(f"{name} has no floor in emovlm_kd/dependencies.py")
        pins.append(f"{name}=={floor}")
    return pins
