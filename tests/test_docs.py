"""Every command the documentation shows is checked: the README, examples/train_your_dataset.md and every page of
the site under docs/ (with the repository files the site includes: benchmarks/README.md, ARCHITECTURE.md).

Each shell line of a ```bash block is one of:
- an offline command (the tiny models, generated data, folders `runs/toy*`): run as written, page by page, in one
  workspace;
- a GPU / Hub / your-data command (`accelerate launch`, a Hub id, `data/...`, `--device cuda`): parsed by the
  script's own argument parser, and its script must have an offline run (here, or in the test file named in
  COVERED_ELSEWHERE);
- a set-up command (`pip install`, `accelerate config`, ...) checked against setup.py and the installed tools, the
  test command (the one CI runs), or a docs command (run by tests/test_docs_site.py).
"""

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_browser import free_port, wait_for_server

from emovlm_kd.arguments import load_recipe, parse_stage_args
from emovlm_kd.dependencies import RANGES
from emovlm_kd.stages import run_all

REPO_ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$', flags=re.MULTILINE)  # the site's include line (docs/hooks/include.py)
WALKTHROUGH = REPO_ROOT / "examples" / "train_your_dataset.md"


def doc_files() -> list[Path]:
    return [REPO_ROOT / "README.md", WALKTHROUGH] + sorted((REPO_ROOT / "docs").rglob("*.md"))


def doc_text(path: Path) -> str:
    """A page as the reader sees it: included repository files expanded."""
    return INCLUDE.sub(lambda match: (REPO_ROOT / match.group(1)).read_text(), path.read_text())


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def commands(block: str) -> list[str]:
    """Shell lines of a block: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return [part.strip() for line in lines for part in line.split(" && ")]


OFFLINE_RUNS = "runs/toy"  # the offline examples' folders are runs/toy*; runs/fi, runs/mine, ... are real runs
SETUP_PROGRAMS = {"pip", "hf", "export", "."}  # and `python -m venv`, `accelerate config`
SERVERS = ("examples/space/app.py", "emovlm-kd-demo")  # started, answered on HTTP, stopped
# Scripts whose offline runs are tests of their own (too long or needing a server to be run from the docs here).
COVERED_ELSEWHERE = {
    "examples/quickstart.py": ("tests/test_quickstart.py", "examples/quickstart.py"),
    "train/instruction_data.py": ("tests/test_instruction_data.py", "instruction_data.run"),
    "benchmarks/run_all.py": ("tests/test_benchmarks.py", "run_all.main"),
    "benchmarks/profile_contenders.py": ("tests/test_benchmarks.py", "profile_contenders"),
    "benchmarks/bench_inference.py": ("tests/test_benchmarks.py", "bench_inference"),
    "benchmarks/bench_training.py": ("tests/test_benchmarks.py", "bench_training"),
    "benchmarks/bench_cached_epochs.py": ("tests/test_benchmarks.py", "bench_cached_epochs"),
    "train/convert_reference.py": ("tests/test_convert_reference.py", "convert_reference"),  # needs reference files
}
CONSOLE_SCRIPTS = {"emovlm-kd-train": "train/run_all.py", "emovlm-kd-predict": "train/predict.py"}


@dataclass
class Command:
    doc: str
    line: str

    @property
    def argv(self) -> list[str]:
        """The command's words after any leading `NAME=value` environment assignments."""
        words = shlex.split(self.line)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        return words

    @property
    def script(self) -> str | None:
        """`train/<stage>.py`, `examples/...py`, `benchmarks/...py` (console commands mapped to theirs)."""
        for token in self.argv:  # the first script named (after the launcher's own options)
            if token.endswith(".py") and (REPO_ROOT / token).is_file():
                return token
            if token in CONSOLE_SCRIPTS:
                return CONSOLE_SCRIPTS[token]
            if token == "emovlm-kd-demo":
                return "examples/space/app.py"
            if token.startswith("emovlm-kd-"):
                return f"train/{token[len('emovlm-kd-') :].replace('-', '_')}.py"
        return None

    @property
    def script_argv(self) -> list[str]:
        argv = self.argv
        for index, token in enumerate(argv):
            if token.endswith(".py") or token.startswith("emovlm-kd-"):
                return argv[index + 1 :]
        raise AssertionError(self.line)

    @property
    def kind(self) -> str:
        argv = self.argv
        if self.line.startswith("python -m pytest"):
            return "test"
        if argv[0] == "mkdocs":
            return "docs"
        if argv[0] in SETUP_PROGRAMS or self.line.startswith("python -m venv") or argv[:2] == ["accelerate", "config"]:
            return "setup"
        if argv[:2] == ["python", "-c"]:
            return "offline"
        if self.script is None:
            return "unknown"
        offline = argv[0] != "accelerate" and self.script not in COVERED_ELSEWHERE
        for token in self.script_argv:
            for value in token.split("=", 1)[-1:] if token.startswith("--") else [token]:
                outside = "/" in value and not value.startswith(OFFLINE_RUNS)
                if outside or value == "cuda" or re.search(r"\.(jpe?g|png|webp)$", value):
                    offline = False
        if self.script.startswith("train/instruction_data"):
            offline = False  # needs a chat endpoint
        if any(self.script.endswith(server) or server in argv for server in SERVERS):
            return "server" if offline else "parse"
        return "offline" if offline else "parse"


def doc_commands() -> list[Command]:
    found, seen = [], set()
    for path in doc_files():
        text = doc_text(path)
        for block in code_blocks(text, "bash"):
            for line in commands(block):
                name = path.relative_to(REPO_ROOT).as_posix()
                if (name, line) not in seen:
                    seen.add((name, line))
                    found.append(Command(name, line))
    return found


def test_every_command_is_known_and_counted():
    found = doc_commands()
    kinds = {}
    for command in found:
        kinds.setdefault(command.kind, []).append(command.line)
    assert "unknown" not in kinds, kinds.get("unknown")
    assert {"offline", "parse", "setup", "test", "server", "docs"} <= set(kinds), sorted(kinds)
    pages = {command.doc for command in found}
    assert {"README.md", "examples/train_your_dataset.md", "docs/training.md", "docs/using.md"} <= pages
    print(f"{len(found)} commands on {len(pages)} pages:", {kind: len(lines) for kind, lines in kinds.items()})


def test_the_docs_show_every_stage_script():
    scripts = {command.script for command in doc_commands()}
    stages = ("run_all", "instruction_data", "instruction_tuning", "teacher", "distill", "gate", "evaluate", "export")
    assert {f"train/{stage}.py" for stage in stages} | {"train/predict.py"} <= scripts


def test_every_gpu_or_hub_command_has_an_offline_variant_that_runs():
    found = doc_commands()
    run_here = {command.script for command in found if command.kind in ("offline", "server")}
    for command in found:
        if command.kind != "parse":
            continue
        if command.script in COVERED_ELSEWHERE:
            test_file, evidence = COVERED_ELSEWHERE[command.script]
            assert evidence in (REPO_ROOT / test_file).read_text(), (command.line, test_file)
        else:
            assert command.script in run_here, f"{command.doc}: no offline run of {command.script}: {command.line}"


def doc_recipe(tmp_path: Path) -> Path:
    """The `fi.yaml` recipe written out in train_your_dataset.md."""
    block = next(block for block in code_blocks(WALKTHROUGH.read_text(), "yaml") if block.startswith("# fi.yaml"))
    path = tmp_path / "fi.yaml"
    path.write_text(block)
    return path


def load_script(script: str):
    """A script of the repository as a module (its `__main__` block does not run)."""
    path = REPO_ROOT / script
    if script == "examples/space/app.py":  # a launcher of the app shipped in every model repo
        path = REPO_ROOT / "emovlm_kd" / "repo_template" / "space" / "app.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"doc_script_{path.stem}_{path.parent.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def parse_with_the_script(command: Command, tmp_path: Path, monkeypatch):
    """Parse a command's arguments with its script's own parser."""
    script = command.script
    argv = [str(doc_recipe(tmp_path)) if arg == "fi.yaml" else arg for arg in command.script_argv]
    if script == "train/convert_reference.py":
        from transformers import HfArgumentParser

        from emovlm_kd.convert_reference import ConvertArguments

        assert HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(argv)[0].output
    elif script == "train/predict.py":
        from transformers import HfArgumentParser

        from emovlm_kd.predict import PredictArguments

        assert HfArgumentParser(PredictArguments).parse_args_into_dataclasses(argv)[0].output_dir
    elif script == "train/run_all.py":
        _, run_args, plans = run_all.plan(argv)
        assert run_args.run_dir and plans
    elif script.startswith("train/"):
        stage = importlib.import_module(f"emovlm_kd.stages.{Path(script).stem}")
        run_args, _ = parse_stage_args(stage, argv)
        assert run_args.run_dir
    else:
        module = load_script(script)
        monkeypatch.setattr(sys, "argv", [script, *argv])
        try:
            module.parse_args(argv)
        except TypeError:  # parse_args() reading sys.argv
            module.parse_args()


def script_commands() -> list[Command]:
    return [command for command in doc_commands() if command.kind in ("offline", "parse", "server")]


@pytest.mark.parametrize(
    "command", [c for c in script_commands() if c.argv[:2] != ["python", "-c"]], ids=lambda c: c.line[:60]
)
def test_every_script_command_parses(command, tmp_path, monkeypatch):
    parse_with_the_script(command, tmp_path, monkeypatch)


def test_every_python_c_command_compiles():
    for command in doc_commands():
        if command.argv[:2] == ["python", "-c"]:
            ast.parse(command.argv[2])


def extras_and_requirements() -> tuple[set[str], str]:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    extras = next(keyword.value for keyword in call.keywords if keyword.arg == "extras_require")
    return {key.value for key in extras.keys}, (REPO_ROOT / "setup.py").read_text()


def test_every_setup_command_matches_setup_py_and_the_installed_tools():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    extras, setup_text = extras_and_requirements()
    for command in doc_commands():
        if command.kind != "setup":
            continue
        argv = command.argv
        if argv[:2] == ["pip", "install"]:
            targets = iter(argv[2:])
            for target in targets:
                if target == "-e":
                    continue
                if target == "-c":  # a constraints file of the repository
                    assert (REPO_ROOT / next(targets)).is_file(), command.line
                    continue
                if target.startswith("."):
                    wanted = set(re.findall(r"\[(.*)\]", target)[0].split(",")) if "[" in target else set()
                    assert wanted <= extras, (command.line, extras)
                    continue
                requirement = Requirement(target)
                if requirement.specifier:  # a pinned install: the version the tests run with
                    assert requirement.specifier.contains(version(requirement.name).split("+")[0]), command.line
                else:
                    assert requirement.name in RANGES, (command.line, "not a requirement of setup.py")
        elif argv[0] in ("hf", "accelerate"):
            assert shutil.which(argv[0]) or (Path(sys.executable).parent / argv[0]).exists(), command.line
        else:
            assert argv[0] in ("export", ".") or command.line.startswith("python -m venv"), command.line


def test_the_test_command_is_the_one_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    for command in doc_commands():
        if command.kind == "test" and command.line == "python -m pytest -q tests":
            assert command.line in ci
        elif command.kind == "test":
            assert command.line.startswith("python -m pytest -q") and command.argv[-1] == "tests", command.line


def test_the_recipes_in_the_docs_are_valid(tmp_path):
    recipe = load_recipe(str(doc_recipe(tmp_path)))
    plans = {plan.stage: plan.args for plan in run_all.plan(["--config", str(tmp_path / "fi.yaml"), "--run-dir", "R"])[2]}
    assert recipe["instruction_tuning"]["load_in_4bit"] and plans["instruction_tuning"].load_in_4bit
    assert plans["distill"].vlm == "Qwen/Qwen2-VL-7B-Instruct" and plans["export"].push_to_hub
    guide_recipe = tmp_path / "guide.yaml"
    guide_recipe.write_text(code_blocks((REPO_ROOT / "docs" / "training.md").read_text(), "yaml")[0])
    plans = {plan.stage: plan.args for plan in run_all.plan(["--config", str(guide_recipe), "--run-dir", "R"])[2]}
    assert plans["gate"].gate_type == "moe" and plans["distill"].epochs == 10


RUNS = re.compile(r"runs/[\w.-]+")
WRITE_OPTIONS = ("--run-dir", "--output-dir", "--output-json")


def runs_written_and_read(command: Command) -> tuple[set[str], set[str]]:
    """The `runs/<name>` folders a command writes (run and output folders, or what a `python -c` makes) and reads."""
    if command.argv[:2] == ["python", "-c"]:
        return set(RUNS.findall(command.line)), set()
    written, read, argv = set(), set(), command.argv
    for index, token in enumerate(argv):
        value_of = argv[index - 1] if index else ""
        for name in RUNS.findall(token):
            (written if value_of in WRITE_OPTIONS else read).add(name)
    return written, read - written


def test_every_page_makes_what_its_commands_read():
    """No page needs another page to make sense of its commands: the runs/ folders an offline command reads were
    written by an earlier command of the same page."""
    made: dict[str, set[str]] = {}
    for command in doc_commands():
        if command.kind not in ("offline", "server"):
            continue
        written, read = runs_written_and_read(command)
        page = made.setdefault(command.doc, set())
        missing = read - page
        assert not missing, f"{command.doc}: {command.line} reads {missing}, made nowhere earlier on the page"
        page |= written


def run_as_written(command: Command, workspace: Path, env: dict):
    argv = command.argv
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0].startswith("emovlm-kd-"):
        argv[0] = str(Path(sys.executable).parent / argv[0])
    argv = [str(REPO_ROOT / token) if (REPO_ROOT / token).is_file() and "/" in token else token for token in argv]
    if command.kind == "server":
        port = free_port()
        server = subprocess.Popen(
            [*argv, "--port", str(port)], cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            wait_for_server(f"http://127.0.0.1:{port}/", server, timeout=180)
        finally:
            server.terminate()
            server.wait(timeout=30)
        return
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=workspace, env=env)
    assert result.returncode == 0, (command.doc, command.line, result.stderr[-3000:])


@pytest.mark.slow
def test_every_offline_command_runs_as_written(tmp_path):
    """Each page's offline commands, in order, in one workspace (the same line on several pages runs once; a
    repeated training command finds its stages complete). Their results are checked below."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    done = set()
    for command in doc_commands():
        if command.kind in ("offline", "server") and command.line not in done:
            run_as_written(command, tmp_path, env)
            done.add(command.line)
    runs = tmp_path / "runs"
    assert (runs / "toy" / "model" / "model.safetensors").exists()
    assert json.loads((runs / "toy" / "model" / "config.json").read_text())["gate_type"] == "moe"  # the --set run
    assert (runs / "toy-stages" / "model" / "model.safetensors").exists()
    results = json.loads((runs / "toy-parquet-run" / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["num_examples"] == 18
    assert json.loads((runs / "toy-predictions" / "predictions.json").read_text())["complete"]
    assert list((runs / "toy-predictions").glob("*.parquet"))
    assert (runs / "toy-tuned").exists()
    print(f"ran {len(done)} distinct offline commands")


@pytest.mark.slow
def test_the_figure_is_what_its_script_draws(tmp_path):
    """docs/method.png is what docs/make_figure.py draws (run on a copy, so the committed file stays)."""
    import numpy as np
    from PIL import Image

    shutil.copy(REPO_ROOT / "docs" / "make_figure.py", tmp_path / "make_figure.py")
    subprocess.run([sys.executable, str(tmp_path / "make_figure.py")], check=True, capture_output=True, timeout=120)
    drawn = np.asarray(Image.open(tmp_path / "method.png").convert("L"), dtype=float)
    committed = np.asarray(Image.open(REPO_ROOT / "docs" / "method.png").convert("L"), dtype=float)
    assert drawn.shape == committed.shape
    assert np.abs(drawn - committed).mean() < 2.0  # font rasterisation may differ by a shade between machines
