"""What every command does around its work: logging, reporting a user's error without a traceback, and working in a
run directory (its lock held, problems reported). Shared by `cli`, `predict` and `stages.run_all`, which import it
rather than each other (`cli` is the entry point above them)."""

import logging
import sys
from contextlib import contextmanager

from emovlm_kd.run_dir import RunError, disk_problem
from emovlm_kd.processes import main_process_lock, setup_process_logging

logger = logging.getLogger(__name__)


def setup_logging():
    """INFO on the main process of a launch, errors only on the others (`emovlm_kd.processes`)."""
    setup_process_logging()


def exit_with_error(error: Exception | str):
    logger.error(str(error))
    sys.exit(2)


@contextmanager
def run_dir_command(run_dir):
    """The block of a command that works in a run directory: holds the directory's lock (main process), and ends
    the command with a message naming the path, not a traceback, on a user's error (`RunError`: dataset, lock,
    unwritable directory) or a failed write (full disk, read-only file system)."""
    try:
        with main_process_lock(run_dir):
            yield
    except RunError as error:
        exit_with_error(error)
    except Exception as error:
        problem = disk_problem(error, run_dir)
        if problem is None:
            raise
        exit_with_error(
            f"Could not write in the run directory {str(run_dir)!r}: {problem}. Completed stages and epoch "
            "checkpoints are kept: make room (or make it writable) and run the same command again."
        )


__all__ = ["exit_with_error", "run_dir_command", "setup_logging"]
