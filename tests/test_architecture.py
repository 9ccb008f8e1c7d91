"""The layering of ARCHITECTURE.md, checked on the source: imports only point down, stages never import each other,
and the remote-code files import nothing of the package (they must load from a model repo without it)."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "emovlm_kd"
REMOTE_CODE = (
    "configuration_emovlm_kd",
    "modeling_emovlm_kd",
    "image_processing_emovlm_kd",
    "image_decoding_emovlm_kd",
    "processing_emovlm_kd",
    "pipeline_emovlm_kd",
    "vlm_adapters_emovlm_kd",
)

# ARCHITECTURE.md's layers: a module may import modules of its own layer or below, never above.
LAYERS = {
    "run_dir": 0,
    "settings": 0,
    "dependencies": 0,
    "data": 1,
    "metrics": 1,
    "calibration": 1,
    "instruction_records": 1,
    "instruction_tasks": 1,
    "teachers": 1,
    "tiny": 1,
    "vlm": 1,
    "collator": 1,
    "testing": 1,
    "arguments": 1,
    "architectures": 1,
    "sources": 1,
    "chat": 1,
    "processes": 1,
    "seeding": 1,
    "optimizers": 1,
    "batch_semantics": 1,
    "checkpoints": 2,
    "accelerator_setup": 2,
    "training": 2,
    "stage_lifecycle": 2,
    "epoch_loop": 2,
    "cache": 2,
    "artifacts": 2,
    "model_card": 2,
    "widgets": 2,
    "verification": 2,
    "cli": 2,
    "console": 2,
    "predict": 2,
    "stages": 3,
    "convert_reference": 4,  # a converted model folder is written by stage 6's export
}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an `import` or `from ... import` anywhere in the file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_module(name: str) -> str | None:
    """`emovlm_kd.cache.x` -> `cache`, `emovlm_kd.stages.distill` -> `stages`; None outside the package."""
    parts = name.split(".")
    return parts[1] if parts[0] == "emovlm_kd" and len(parts) > 1 else None


def layer_of(path: Path) -> tuple[str, int]:
    relative = path.relative_to(PACKAGE)
    name = relative.parts[0] if len(relative.parts) > 1 else relative.stem
    return name, LAYERS[name]


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "repo_template" not in p.parts and p.name != "__init__.py")


def test_every_package_module_has_a_layer():
    assert {layer_of(path)[0] for path in package_files()} == set(LAYERS)


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    name, layer = layer_of(path)
    for imported in imported_modules(path):
        target = package_module(imported)
        if target in LAYERS:
            assert LAYERS[target] <= layer, f"{name} (layer {layer}) imports {imported} (layer {LAYERS[target]})"


def test_lower_modules_never_import_the_stages():
    for path in package_files():
        if layer_of(path)[1] < LAYERS["stages"]:
            assert not any(name.startswith("emovlm_kd.stages") for name in imported_modules(path)), path


def test_only_the_entry_points_import_cli():
    """`cli` runs `predict` and the stages; they share its helpers through `console`, never importing `cli` back."""
    for path in package_files():
        if path.name != "cli.py":
            assert not any(name.startswith("emovlm_kd.cli") for name in imported_modules(path)), path


def test_stages_do_not_import_each_other():
    """Shared pieces live below the stages (artifacts, cache, training); `run_all` finds the stages by name."""
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        stage_imports = {name for name in imported_modules(path) if name.startswith("emovlm_kd.stages.")}
        assert stage_imports <= {"emovlm_kd.stages.STAGES"}, (path.name, stage_imports)


@pytest.mark.parametrize("module", REMOTE_CODE)
def test_remote_code_imports_nothing_of_the_package(module):
    imports = imported_modules(REPO_ROOT / f"{module}.py")
    assert not any(name.split(".")[0] == "emovlm_kd" for name in imports), imports


def test_package_init_only_re_exports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    statements = [node for node in tree.body if not isinstance(node, (ast.Expr, ast.Import, ast.ImportFrom))]
    assert all(isinstance(node, ast.Assign) for node in statements)  # __version__, __all__
    assert all(isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)) for node in tree.body)
    stages_init = ast.parse((PACKAGE / "stages" / "__init__.py").read_text())
    assert not any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in stages_init.body)
