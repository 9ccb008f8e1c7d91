"""The training pipeline, one module per stage (see `emovlm_kd.data` for the run-directory layout).

Convention shared by every stage module (`train/<stage>.py` is a thin CLI over it, `train/run_all.py` chains them):

* `build_parser() -> argparse.ArgumentParser`: the stage's CLI, with the paper's defaults;
* `fingerprint(args) -> str`: a cheap hash of everything the stage's result depends on (its arguments, its data,
  and the fingerprints of the upstream stages it reads); what its `COMPLETE.json` records;
* `run(args) -> dict`: does the work, writes `COMPLETE.json` (with that fingerprint) as its last action and
  returns a small JSON-serialisable summary (paths, metrics). `{"stopped": True}` when `--stop-after-epoch` ended
  it early (no COMPLETE.json then).

Training stages are Accelerate scripts: `accelerate launch train/<stage>.py ...` runs them on several devices;
`--batch-size` is the global batch (split across processes), so results do not depend on the process count.
"""

import argparse
import json
import logging
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from emovlm_kd.data import (
    DataError,
    clear_complete,
    ensure_class_names,
    fingerprint,
    load_imagefolder,
    read_complete,
    stage_output,
)

logger = logging.getLogger(__name__)

# Stage (= module name under emovlm_kd.stages), in pipeline order -> its script under train/.
SCRIPTS = {
    "instruction_data": "instruction_data.py",
    "instruction_tuning": "instruction_tuning.py",
    "teacher": "teacher.py",
    "distill": "distill.py",
    "gate": "gate.py",
    "evaluate": "evaluate.py",
    "export": "export.py",
}
STAGES = tuple(SCRIPTS)


# ---------------------------------------------------------------------------------------------- arguments
def add_run_args(parser: argparse.ArgumentParser, data_required: bool = True) -> argparse.ArgumentParser:
    """Arguments every stage shares: where the run and the data are, seeding, logging, resuming."""
    group = parser.add_argument_group("run")
    group.add_argument("--run-dir", required=True, help="The run directory (every stage reads and writes there)")
    group.add_argument(
        "--data-dir", required=data_required, help="ImageFolder dataset: train/[val/]test/<class>/<image>"
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.1, help="Share of train held out as val when there is no val/"
    )
    group.add_argument("--seed", type=int, default=42, help="Seed of the val split, initialisation and shuffling")
    group.add_argument("--report-to", default="tensorboard", help="Accelerate tracker(s), comma-separated, or 'none'")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    group.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="Defaults to `accelerate config`"
    )
    return parser


def add_epoch_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("checkpointing")
    group.add_argument(
        "--resume", action="store_true", help="Continue from the latest epoch checkpoint of this stage, if it matches"
    )
    group.add_argument(
        "--stop-after-epoch", type=int, default=None, help="Stop after this many epochs (checkpointed; resume later)"
    )
    group.add_argument("--checkpoint-every", type=int, default=1, help="Save a checkpoint every N epochs")
    group.add_argument("--keep-checkpoints", type=int, default=1, help="Epoch checkpoints to keep (latest first)")
    return parser


def dataset_fingerprint(args) -> str:
    """Hash of the dataset's files (path, size, mtime) and of how it is split; cheap (no decoding)."""
    root = Path(args.data_dir)
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist")
    entries = []
    for split in ("train", "val", "test"):
        for path in sorted((root / split).rglob("*")) if (root / split).is_dir() else []:
            if path.is_file():
                stat = path.stat()
                entries.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return fingerprint({"files": entries, "val_fraction": args.val_fraction, "seed": args.seed})


def upstream_fingerprint(run_dir, stage: str, needed_by: str) -> str:
    """The COMPLETE fingerprint of an upstream stage; a clear error when it has not completed."""
    record = read_complete(run_dir, stage)
    if record is None:
        raise DataError(
            f"Stage {needed_by!r} needs stage {stage!r} first: {str(stage_output(run_dir, stage))!r} is not complete "
            f"(run train/{SCRIPTS[stage]} with the same --run-dir)"
        )
    return record["fingerprint"]


# ---------------------------------------------------------------------------------------------- accelerate
def make_accelerator(args, stage: str, **kwargs):
    """An Accelerator whose `--batch-size` is global (split across processes), logging to `<run_dir>/logs`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    report_to = [name for name in args.report_to.split(",") if name and name != "none"]
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(args.run_dir), logging_dir=str(Path(args.run_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        **kwargs,
    )
    if report_to:
        accelerator.init_trackers(stage, config=_hparams(vars(args)))
    return accelerator


def _hparams(config: dict) -> dict:
    """Tracker-friendly config: scalars kept, everything else as a string."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def load_run_data(args, accelerator, class_names=None):
    """Load the dataset (main process first), fix or check the run's classes, log unreadable images."""
    with accelerator.main_process_first():
        data = load_imagefolder(args.data_dir, val_fraction=args.val_fraction, seed=args.seed, class_names=class_names)
        ensure_class_names(args.run_dir, data.class_names)
    return data


def progress(accelerator, iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)


@contextmanager
def seeded_rng(*keys: int):
    """Run a block with Python's and torch's CPU RNG seeded from `keys` (restored afterwards).

    Used for per-sample augmentation, so an image gets the same crop in a given epoch whatever the process count,
    worker count or resumption point.
    """
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_root(run_dir, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def find_checkpoint(run_dir, stage: str, stage_fingerprint: str) -> tuple[Path, int] | None:
    """The latest epoch checkpoint of the stage written under the same fingerprint: `(path, epochs done)`."""
    root = checkpoint_root(run_dir, stage)
    candidates = sorted(root.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]), reverse=True)
    for path in candidates:
        meta = path / "emovlm_kd_checkpoint.json"
        if not meta.exists():
            continue  # an interrupted save
        recorded = json.loads(meta.read_text())
        if recorded["fingerprint"] != stage_fingerprint:
            logger.warning(f"Ignoring checkpoint {str(path)!r}: written for other inputs or arguments")
            continue
        return path, recorded["epochs_done"]
    return None


def resume_if_asked(accelerator, args, stage: str, stage_fingerprint: str) -> int:
    """Load the matching checkpoint when `--resume` is given; returns the number of epochs already done."""
    if not getattr(args, "resume", False):
        return 0
    found = find_checkpoint(args.run_dir, stage, stage_fingerprint)
    if found is None:
        logger.info(f"No checkpoint of stage {stage!r} to resume from; starting from scratch")
        return 0
    path, epochs_done = found
    accelerator.load_state(str(path))
    logger.info(f"Resumed stage {stage!r} from {str(path)!r} after {epochs_done} epoch(s)")
    return epochs_done


def save_checkpoint(accelerator, args, stage: str, stage_fingerprint: str, epochs_done: int):
    """`accelerator.save_state` of the epoch, then drop older checkpoints beyond `--keep-checkpoints`."""
    path = checkpoint_root(args.run_dir, stage) / f"epoch_{epochs_done}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        meta = {"fingerprint": stage_fingerprint, "epochs_done": epochs_done}
        (path / "emovlm_kd_checkpoint.json").write_text(json.dumps(meta) + "\n")
        older = sorted(path.parent.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]), reverse=True)
        for stale in older[max(1, args.keep_checkpoints) :]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def end_epoch(accelerator, args, stage: str, stage_fingerprint: str, epochs_done: int, total_epochs: int) -> bool:
    """Checkpoint every `--checkpoint-every` epochs (not after the last: the stage then saves its outputs);
    returns True when `--stop-after-epoch` ends the run here (after a checkpoint)."""
    stop = args.stop_after_epoch is not None and args.stop_after_epoch <= epochs_done < total_epochs
    if stop or (epochs_done < total_epochs and epochs_done % max(1, args.checkpoint_every) == 0):
        save_checkpoint(accelerator, args, stage, stage_fingerprint, epochs_done)
    return stop


def start_stage(accelerator, run_dir, stage: str):
    """Remove a previous COMPLETE.json so a crash mid-stage never leaves a marker for stale outputs."""
    if accelerator.is_main_process:
        clear_complete(run_dir, stage)
    accelerator.wait_for_everyone()


def finish_stage(accelerator, args, stage: str):
    """After the outputs and COMPLETE.json are written: drop the stage's epoch checkpoints, close the trackers."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint_root(args.run_dir, stage), ignore_errors=True)
    close_trackers(accelerator)


def close_trackers(accelerator):
    """`accelerator.end_training()` without destroying the process group: later stages of the same process
    (`train/run_all.py`) reuse it. `cli_main` / run_all destroy it once at exit."""
    for tracker in accelerator.trackers:
        tracker.finish()


# ---------------------------------------------------------------------------------------------- CLI
def end_processes():
    """Tear the process group down cleanly (multi-process runs otherwise may abort at exit)."""
    from accelerate import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()


def cli_main(module, argv=None) -> dict:
    """Entry point of the `train/*.py` wrappers: parse, run, print the summary as JSON."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    args = module.build_parser().parse_args(argv)
    try:
        result = module.run(args)
    except DataError as error:
        logger.error(str(error))
        sys.exit(2)
    finally:
        end_processes()
    print(json.dumps(result, indent=2, default=str))
    return result


__all__ = [
    "STAGES",
    "add_epoch_args",
    "add_run_args",
    "checkpoint_root",
    "cli_main",
    "close_trackers",
    "dataset_fingerprint",
    "end_epoch",
    "end_processes",
    "find_checkpoint",
    "finish_stage",
    "load_run_data",
    "make_accelerator",
    "progress",
    "resume_if_asked",
    "save_checkpoint",
    "seeded_rng",
    "start_stage",
    "upstream_fingerprint",
]
