"""The Accelerator of a stage: mixed precision, trackers logging to `<run_dir>/logs`, seeded shuffling, and
per-process batches (what `batch_size` means on N processes is each stage's choice: `emovlm_kd.batch_semantics`)."""

from pathlib import Path

from emovlm_kd.arguments import settings_dict


def make_accelerator(run_args, stage: str, *settings, **kwargs):
    """An Accelerator whose prepared DataLoaders give each process whole batches of `batch_size` (never split: a
    split batch would have to divide by the process count, and stage 1's paper batch of 1 never does), logging to
    `<run_dir>/logs` with the stage's settings (`run_args` and the stage's arguments) as the tracker config."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    report_to = [name for name in run_args.report_to.split(",") if name and name != "none"]
    accelerator = Accelerator(
        mixed_precision=run_args.mixed_precision,
        log_with=report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_args.run_dir), logging_dir=str(Path(run_args.run_dir) / "logs")
        ),
        # data_seed: shuffling follows the run's seed, not whatever consumed the global RNG before
        dataloader_config=DataLoaderConfiguration(
            split_batches=False, use_seedable_sampler=True, data_seed=run_args.seed
        ),
        **kwargs,
    )
    if report_to:
        config = settings_dict(run_args, *settings)
        accelerator.init_trackers(
            stage, config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        )
    return accelerator


def close_trackers(accelerator):
    """`accelerator.end_training()` without destroying the process group: later stages of the same process
    (`train/run_all.py`) reuse it; `end_processes` destroys it once at exit."""
    for tracker in accelerator.trackers:
        tracker.finish()


__all__ = ["close_trackers", "make_accelerator"]
