"""Command-line entry points: `train/<stage>.py` and the `emovlm-kd-*` console commands."""

import importlib
import json
import logging
import sys

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.run_dir import DataError
from emovlm_kd.training import end_processes

logger = logging.getLogger(__name__)


def setup_logging():
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )


def exit_with_error(error: Exception):
    logger.error(str(error))
    sys.exit(2)


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
        result = module.run(run_args, stage_args)
    except DataError as error:
        exit_with_error(error)
    finally:
        end_processes()
    print(json.dumps(result, indent=2, default=str))
    return result


__all__ = ["cli_main", "exit_with_error", "setup_logging"]
