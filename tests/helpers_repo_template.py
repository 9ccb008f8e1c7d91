"""Helpers for testing the files shipped into model repos (Endpoints handler, Space app) the way they are used."""

import importlib.util
import io
import shutil
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_TEMPLATE = REPO_ROOT / "emovlm_kd" / "repo_template"
HANDLER = REPO_TEMPLATE / "handler.py"
ENDPOINT_REQUIREMENTS = REPO_TEMPLATE / "requirements.txt"
SPACE_DIR = REPO_TEMPLATE / "space"
SPACE_APP = SPACE_DIR / "app.py"
SPACE_REQUIREMENTS = SPACE_DIR / "requirements.txt"
PROJECT_MODULES = {
    "emovlm_kd",
    "modeling_emovlm_kd",
    "configuration_emovlm_kd",
    "image_processing_emovlm_kd",
    "vlm_adapters_emovlm_kd",
    "image_decoding_emovlm_kd",
}

# Prepended to a script run in a fresh interpreter: the project's modules are unimportable there, as on a machine
# where only the PyPI packages are installed (the model code still loads from the model folder as remote code).
BLOCK_PROJECT_MODULES = f"""
import sys
BLOCKED = {sorted(PROJECT_MODULES)!r}

class BlockProjectModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked: only PyPI packages are installed in this test")

sys.meta_path.insert(0, BlockProjectModules())
"""


def load_module(path: str | Path, name: str):
    """Import a file as a module (how Inference Endpoints import `handler.py`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_model_repo(model_folder: Path, destination: Path) -> Path:
    """A model repo laid out as export writes it: the model folder, `handler.py` and `requirements.txt` at its root
    (where Inference Endpoints look for them) and the Space app in `space/`."""
    from emovlm_kd.stages.export import write_template_file

    shutil.copytree(model_folder, destination)
    shutil.copy(HANDLER, destination / HANDLER.name)
    write_template_file(ENDPOINT_REQUIREMENTS, destination / ENDPOINT_REQUIREMENTS.name)
    shutil.copytree(SPACE_DIR, destination / "space", ignore=shutil.ignore_patterns("__pycache__"))
    write_template_file(SPACE_REQUIREMENTS, destination / "space" / SPACE_REQUIREMENTS.name)
    return destination


def image_bytes(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def sample_images() -> dict[str, tuple[Image.Image, str]]:
    """Name -> (image, file format): RGB PNG, JPEG, greyscale, palette and transparent images of various sizes."""
    return {
        "rgb_png": (Image.new("RGB", (90, 70), (210, 40, 40)), "PNG"),
        "rgb_jpeg": (Image.linear_gradient("L").convert("RGB").resize((120, 160)), "JPEG"),
        "greyscale_png": (Image.linear_gradient("L").resize((80, 80)), "PNG"),
        "greyscale_jpeg": (Image.new("L", (64, 48), 90), "JPEG"),
        "palette_gif": (Image.new("RGB", (50, 50), (20, 160, 90)).quantize(8), "GIF"),
        "rgba_png": (Image.new("RGBA", (40, 60), (30, 30, 220, 100)), "PNG"),
    }
