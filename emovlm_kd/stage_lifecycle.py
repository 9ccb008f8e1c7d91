"""The lifecycle every stage shares: `begin_stage` (the Accelerator, the run-directory lock, seeding, the dataset, the
batch plan, the old marker removed) and `complete_stage` (outputs, then `<output>.COMPLETE.json`, then checkpoints
removed and trackers closed)."""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.logging import get_logger

from emovlm_kd.accelerator_setup import close_trackers, make_accelerator
from emovlm_kd.arguments import settings_dict
from emovlm_kd.batch_semantics import BatchPlan, batch_plan, check_batch_fits
from emovlm_kd.checkpoints import remove_checkpoints
from emovlm_kd.run_dir import (
    clear_complete,
    fault_point,
    holds_run_dir_lock,
    run_dir_lock,
    stage_output,
    write_complete,
)
from emovlm_kd.settings import CARD, values_with
from emovlm_kd.training import load_stage_data

logger = get_logger(__name__)


@dataclass
class StageRun:
    """A stage being run: what the shared steps of a stage need (made by `begin_stage`), the run-directory lock its
    main process holds until `complete_stage` (or until the process ends, if the stage fails), and, for a training
    stage, its batch plan and what the epoch loop has done (per-epoch metrics, optimizer updates)."""

    stage: str
    run_args: object
    args: object
    accelerator: object
    fingerprint: str
    data: object = None
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # e.g. the lock
    batch: BatchPlan | None = None
    history: list = field(default_factory=list)
    updates: int = 0
    resumed_after_epochs: int = 0

    def release(self):
        self.resources.close()


def begin_stage(
    run_args,
    args,
    stage: str,
    fingerprint,
    load_data=True,
    class_names=None,
    batch_semantics=None,
    **accelerator_kwargs,
):
    """The opening of a stage: the Accelerator, seeding, the dataset (with the run's classes fixed, or checked
    against `class_names`), the stage's `fingerprint(run_args, args)`, its old COMPLETE.json removed; for a training
    stage (`batch_semantics`, see `emovlm_kd.batch_semantics`), what an update is: checked, then logged once."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(run_args, stage, args, **accelerator_kwargs)
    resources = contextlib.ExitStack()
    if accelerator.is_main_process and not holds_run_dir_lock(run_args.run_dir):  # else a caller holds it
        resources.enter_context(run_dir_lock(run_args.run_dir))
    set_seed(run_args.seed)
    data = load_stage_data(run_args, accelerator, stage, class_names) if load_data else None
    stage_run = StageRun(stage, run_args, args, accelerator, fingerprint(run_args, args), data, resources)
    if batch_semantics is not None:
        stage_run.batch = batch_plan(accelerator, batch_semantics, args)
        if data is not None:
            check_batch_fits(stage_run.batch, len(data.splits["train"]))
        logger.info(f"Stage {stage!r} on {accelerator.num_processes} process(es): {stage_run.batch.describe()}")
    start_stage(accelerator, run_args.run_dir, stage)
    return stage_run


def complete_stage(stage_run: StageRun, save_outputs=None, **record) -> Path:
    """The end of a stage: `save_outputs(output folder)` and then COMPLETE.json (fingerprint, settings, process
    count, the batch plan of a training stage, `record` and what `save_outputs` returned, if a dict) on the main
    process; then the epoch checkpoints go and the trackers close."""
    accelerator, run_dir = stage_run.accelerator, stage_run.run_args.run_dir
    output = stage_output(run_dir, stage_run.stage)
    if accelerator.is_main_process:
        if save_outputs is not None:
            record.update(save_outputs(output) or {})
        fault_point(f"{stage_run.stage}-before-complete")
        if stage_run.batch is not None:
            record.setdefault("batch", stage_run.batch.record())
        settings = settings_dict(stage_run.run_args, stage_run.args)
        write_complete(
            run_dir,
            stage_run.stage,
            stage_run.fingerprint,
            settings=settings,
            card_settings=values_with(stage_run.args, CARD),  # what the model card lists (`model_card.card_settings`)
            num_processes=accelerator.num_processes,
            **record,
        )
    finish_stage(accelerator, run_dir, stage_run.stage)
    stage_run.release()
    return output


def stop_stage(stage_run: StageRun) -> dict:
    """End a stage that `stop_after_epoch` stopped (its checkpoint written): the trackers close, the lock goes; the
    summary says how far it got."""
    close_trackers(stage_run.accelerator)
    stage_run.release()
    epochs_done = len(stage_run.history)
    epoch_losses = [metrics.get("train_loss") for metrics in stage_run.history]
    return {"stage": stage_run.stage, "stopped": True, "epochs_done": epochs_done, "epoch_losses": epoch_losses}


def start_stage(accelerator, run_dir, stage: str):
    """Remove a previous COMPLETE.json so a crash mid-stage never leaves a marker for stale outputs."""
    if accelerator.is_main_process:
        clear_complete(run_dir, stage)
    accelerator.wait_for_everyone()


def finish_stage(accelerator, run_dir, stage: str):
    """After the outputs and COMPLETE.json are written: drop the stage's epoch checkpoints, close the trackers."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_checkpoints(run_dir, stage)
    close_trackers(accelerator)


__all__ = ["StageRun", "begin_stage", "complete_stage", "finish_stage", "start_stage", "stop_stage"]
