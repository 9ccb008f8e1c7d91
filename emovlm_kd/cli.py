"""Command-line entry points: `train/<stage>.py` and the `emovlm-kd-*` console commands."""

import importlib
import json
import logging
import sys
from contextlib import contextmanager

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.run_dir import DataError, disk_problem
from emovlm_kd.training import end_processes, main_process_lock

logger = logging.getLogger(__name__)


def setup_logging():
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )


def exit_with_error(error: Exception):
    logger.error(str(error))
    sys.exit(2)


@contextmanager
def run_dir_errors(run_dir):
    """Hold the run directory for the block; dataset and run-directory problems and failed writes (full disk,
    read-only file system) end the command with a message that names the path, not a traceback."""
    try:
        with main_process_lock(run_dir):
            yield
    except DataError as error:
        exit_with_error(error)
    except Exception as error:
        problem = disk_problem(error, run_dir)
        if problem is None:
            raise
        exit_with_error(
            f"Could not write in the run directory {str(run_dir)!r}: {problem}. Completed stages and epoch "
            "checkpoints are kept: make room (or make it writable) and run the same command again."
        )


def cli_main(stage: str, argv=None) -> dict:
    """Parse a stage's command line, run it, print its summary as JSON. Bad settings and dataset or run-directory
    problems (`DataError`) print the reason and exit with status 2."""
    setup_logging()
    module = importlib.import_module(f"emovlm_kd.stages.{stage}")
    try:
        run_args, stage_args = parse_stage_args(module, argv)
    except ValueError as error:
        exit_with_error(error)
    try:
        with run_dir_errors(run_args.run_dir):
            result = module.run(run_args, stage_args)
    finally:
        end_processes()
    print(json.dumps(result, indent=2, default=str))
    return result


__all__ = ["cli_main", "exit_with_error", "run_dir_errors", "setup_logging"]
