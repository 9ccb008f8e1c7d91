"""Epoch checkpoints of the training stages: `accelerator.save_state` folders tagged with the stage's fingerprint.

    <run_dir>/checkpoints/<stage>/epoch_<n>/    Accelerate state + emovlm_kd_checkpoint.json (fingerprint, epochs,
                                                the epoch loop's state: per-epoch metrics, updates made, processes)

A checkpoint is resumed only by a run of the same stage with the same fingerprint (same inputs and settings), so
resuming never mixes runs; a stage removes its checkpoints once its outputs are written.
"""

import json
import logging
import shutil
from pathlib import Path

from emovlm_kd.run_dir import fault_point, read_json, write_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_META = "emovlm_kd_checkpoint.json"


def checkpoint_root(run_dir, stage: str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / stage


def _epoch_folders(root: Path) -> list[Path]:
    """`epoch_<n>` folders, latest first."""
    folders = [path for path in root.glob("epoch_*") if path.name.split("_", 1)[1].isdigit()]
    return sorted(folders, key=lambda path: int(path.name.split("_")[1]), reverse=True)


def find_checkpoint(run_dir, stage: str, fingerprint: str) -> tuple[Path, dict] | None:
    """The latest epoch checkpoint of the stage written under the same fingerprint: `(path, its index)`."""
    for path in _epoch_folders(checkpoint_root(run_dir, stage)):
        recorded = read_json(path / CHECKPOINT_META, "checkpoint index")
        if recorded is None:
            continue  # an interrupted save (the index is written last)
        if recorded.get("fingerprint") != fingerprint:
            logger.warning(f"Ignoring checkpoint {str(path)!r}: written for other inputs or settings")
            continue
        return path, recorded
    return None


def resume_if_asked(accelerator, run_dir, args, stage: str, fingerprint: str) -> tuple[int, dict]:
    """Load the matching checkpoint when `args.resume`; returns the number of epochs already done and the loop state
    saved with it (`{}` when none)."""
    if not args.resume:
        return 0, {}
    found = find_checkpoint(run_dir, stage, fingerprint)
    if found is None:
        logger.info(f"No checkpoint of stage {stage!r} to resume from; starting from scratch")
        return 0, {}
    path, recorded = found
    epochs_done = int(recorded["epochs_done"])
    written_on = recorded.get("loop_state", {}).get("num_processes", accelerator.num_processes)
    if written_on != accelerator.num_processes:
        logger.warning(
            f"Checkpoint {str(path)!r} was written by {written_on} process(es), this run has "
            f"{accelerator.num_processes}: where batch_size is per process, the remaining epochs make other updates"
        )
    accelerator.load_state(str(path))
    logger.info(f"Resumed stage {stage!r} from {str(path)!r} after {epochs_done} epoch(s)")
    return epochs_done, recorded.get("loop_state", {})


def save_checkpoint(
    accelerator, run_dir, args, stage: str, fingerprint: str, epochs_done: int, loop_state: dict | None = None
) -> Path:
    """`accelerator.save_state` of the epoch (with `loop_state` in its index), then drop older checkpoints beyond
    `args.keep_checkpoints`."""
    path = checkpoint_root(run_dir, stage) / f"epoch_{epochs_done}"
    if accelerator.is_main_process:  # never a stale index next to a half-rewritten state
        shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    fault_point("checkpoint-save")
    if accelerator.is_main_process:
        meta = {"fingerprint": fingerprint, "epochs_done": epochs_done, "loop_state": loop_state or {}}
        write_atomic(path / CHECKPOINT_META, json.dumps(meta) + "\n")
        for stale in _epoch_folders(path.parent)[max(1, args.keep_checkpoints) :]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def end_epoch(
    accelerator, run_dir, args, stage: str, fingerprint: str, epochs_done: int, total_epochs: int, loop_state=None
) -> bool:
    """Checkpoint every `args.checkpoint_every` epochs (not after the last: the stage then saves its outputs);
    returns True when `args.stop_after_epoch` ends the run here (after a checkpoint)."""
    stop = args.stop_after_epoch is not None and args.stop_after_epoch <= epochs_done < total_epochs
    if stop or (epochs_done < total_epochs and epochs_done % max(1, args.checkpoint_every) == 0):
        save_checkpoint(accelerator, run_dir, args, stage, fingerprint, epochs_done, loop_state)
    return stop


def remove_checkpoints(run_dir, stage: str):
    shutil.rmtree(checkpoint_root(run_dir, stage), ignore_errors=True)


__all__ = [
    "CHECKPOINT_META",
    "checkpoint_root",
    "end_epoch",
    "find_checkpoint",
    "remove_checkpoints",
    "resume_if_asked",
    "save_checkpoint",
]
