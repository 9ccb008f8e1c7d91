"""What each process of a launch does: its rank (read from the launcher), the run-directory lock on the main process,
logging, printing and progress bars on the main process only, and the teardown of the process group.

Under `accelerate launch` (or torchrun, MPI) every process runs the same script. Summaries, epoch lines and data
reports are for the user once, not once per process: `setup_process_logging` leaves the other processes only their
errors (as Accelerate's examples do with transformers' and datasets' verbosity), `print_once` prints on the main
process, and `progress` shows a bar on each machine's main process.
"""

import logging
import os
from contextlib import contextmanager

from emovlm_kd.run_dir import run_dir_lock

# Where launchers put a process's global rank (torchrun / accelerate launch, MPI).
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def launch_rank() -> int:
    """This process's global rank in a launch (0 when not launched). Read from the launcher's environment: creating
    Accelerate's state here would fix it before a stage's Accelerator could configure it."""
    return next((int(os.environ[name]) for name in RANK_VARIABLES if name in os.environ), 0)


def setup_process_logging():
    """INFO logging on the main process; errors only on the others (ours and transformers', datasets')."""
    main = launch_rank() == 0
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S", level=logging.INFO)
    if not main:
        import datasets
        import transformers

        logging.getLogger().setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def print_once(text: str):
    """Print on the main process of a launch only (a command's JSON summary)."""
    if launch_rank() == 0:
        print(text)


def progress(accelerator, iterable=None, **kwargs):
    """A tqdm bar on the local main process only."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)


@contextmanager
def main_process_lock(run_dir):
    """The run-directory lock, held by the main process of a (possibly multi-process) launch for the block."""
    if launch_rank() != 0:
        yield
        return
    with run_dir_lock(run_dir):
        yield


def end_processes():
    """Tear the process group down cleanly (multi-process runs otherwise may abort at exit)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = [
    "RANK_VARIABLES",
    "end_processes",
    "launch_rank",
    "main_process_lock",
    "print_once",
    "progress",
    "setup_process_logging",
]
