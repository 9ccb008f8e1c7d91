"""Command-line entry points: `train/<stage>.py` and the `emovlm-kd-*` console commands of `setup.py`.

    emovlm-kd-train                  every stage in order (`train/run_all.py`)
    emovlm-kd-<stage>                one stage (`train/<stage>.py`): instruction-data, instruction-tuning, teacher,
                                     distill, gate, evaluate, export
    emovlm-kd-predict                batch prediction (`train/predict.py`, `emovlm_kd.predict`)
    emovlm-kd-demo                   the Gradio demo app of a model (`examples/space/app.py`)
    emovlm-kd-convert-reference      a model of the paper's reference code to a model folder
                                     (`train/convert_reference.py`, `emovlm_kd.convert_reference`)

Each takes `--help`. The stages live above this module (`emovlm_kd.stages`), so they are imported by name.
"""

import importlib
import json
import runpy
from pathlib import Path

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.console import exit_with_error, run_dir_command, setup_logging
from emovlm_kd.processes import end_processes, print_once

run_dir_errors = run_dir_command  # the former name


def cli_main(stage: str, argv=None) -> dict:
    """Parse a stage's command line, run it, print its summary as JSON. Bad settings and dataset or run-directory
    problems (`RunError`) print the reason and exit with status 2."""
    setup_logging()
    module = importlib.import_module(f"emovlm_kd.stages.{stage}")
    try:
        run_args, stage_args = parse_stage_args(module, argv)
    except ValueError as error:
        exit_with_error(error)
    try:
        with run_dir_command(run_args.run_dir):
            result = module.run(run_args, stage_args)
    finally:
        end_processes()
    print_once(json.dumps(result, indent=2, default=str))
    return result


def stage_command(stage: str):
    """The console command of a stage: runs `cli_main(stage)` on `sys.argv` (exit status 0 unless it fails)."""

    def command():
        cli_main(stage)

    command.__name__ = command.__qualname__ = f"{stage}_command"
    command.__doc__ = f"The `emovlm-kd-{stage.replace('_', '-')}` command: stage {stage!r} (`train/{stage}.py`)."
    return command


instruction_data_command = stage_command("instruction_data")
instruction_tuning_command = stage_command("instruction_tuning")
teacher_command = stage_command("teacher")
distill_command = stage_command("distill")
gate_command = stage_command("gate")
evaluate_command = stage_command("evaluate")
export_command = stage_command("export")


def train_command():
    """The `emovlm-kd-train` command: every stage in order (`train/run_all.py`)."""
    importlib.import_module("emovlm_kd.stages.run_all").main()


def predict_command():
    """The `emovlm-kd-predict` command: batch prediction (`train/predict.py`)."""
    from emovlm_kd.predict import main

    main()


def convert_reference_command():
    """The `emovlm-kd-convert-reference` command: a model of the paper's reference code to a model folder
    (`train/convert_reference.py`)."""
    importlib.import_module("emovlm_kd.convert_reference").main()


def demo_command():
    """The `emovlm-kd-demo` command: the Gradio demo app shipped in every model repo (`space/app.py`)."""
    app = Path(__file__).resolve().parent / "repo_template" / "space" / "app.py"
    runpy.run_path(str(app), run_name="__main__")


__all__ = [
    "cli_main",
    "convert_reference_command",
    "demo_command",
    "distill_command",
    "evaluate_command",
    "exit_with_error",
    "export_command",
    "gate_command",
    "instruction_data_command",
    "instruction_tuning_command",
    "predict_command",
    "run_dir_command",
    "run_dir_errors",
    "setup_logging",
    "stage_command",
    "teacher_command",
    "train_command",
]
