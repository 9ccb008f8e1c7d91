"""Training plumbing shared by the stages: the Accelerator, data loading, seeding, the epoch loop, the stage lifecycle.

Every training stage is an Accelerate script: `accelerate launch train/<stage>.py ...` runs it on several devices, and
`batch_size` is the global batch (split across processes), so results do not depend on the process count.
"""

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emovlm_kd.arguments import settings_dict
from emovlm_kd.checkpoints import end_epoch, remove_checkpoints, resume_if_asked
from emovlm_kd.run_dir import (
    DataError,
    clear_complete,
    ensure_class_names,
    fault_point,
    holds_run_dir_lock,
    run_dir_lock,
    stage_output,
    write_complete,
)
from emovlm_kd.sources import has_source, load_source

logger = logging.getLogger(__name__)


def make_accelerator(run_args, stage: str, *settings, **kwargs):
    """An Accelerator whose batch size is global (split across processes), logging to `<run_dir>/logs` with the
    stage's settings (`run_args` and the stage's arguments) as the tracker config."""
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
            split_batches=True, use_seedable_sampler=True, data_seed=run_args.seed
        ),
        **kwargs,
    )
    if report_to:
        config = settings_dict(run_args, *settings)
        accelerator.init_trackers(
            stage, config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        )
    return accelerator


def load_stage_data(run_args, accelerator, stage: str, class_names=None):
    """The run's dataset (`--data-dir` or `--dataset`, loaded on the main process first), with the run's classes
    fixed or checked (those of `--dataset-preset`, in its order, when one is given)."""
    if not has_source(run_args):
        raise DataError(f"Stage {stage!r} needs a dataset: pass --data-dir or --dataset")
    class_names = preset_class_names(run_args, class_names)
    with accelerator.main_process_first():
        try:
            data = load_source(run_args, class_names=class_names)
        except DataError as error:
            if run_args.dataset_preset:
                raise DataError(f"--dataset-preset {run_args.dataset_preset}: {error}") from None
            raise
        check_preset_split(run_args, data)
        ensure_class_names(run_args.run_dir, data.class_names)
    return data


def preset_class_names(run_args, class_names=None) -> list[str] | None:
    """The classes to load the run's data with: `--dataset-preset`'s (in the reference's order), else
    `class_names`; a clear error when both are given and differ."""
    preset = run_args.preset
    if preset is None:
        return class_names
    if class_names is not None and list(class_names) != list(preset.class_names):
        raise DataError(
            f"--dataset-preset {run_args.dataset_preset} has the classes {list(preset.class_names)}, but this run's "
            f"earlier stages were trained on {list(class_names)}"
        )
    return list(preset.class_names)


def check_preset_split(run_args, data):
    """The presets of datasets the reference reads with their own val split (FI, Flickr, Instagram) need one."""
    preset = run_args.preset
    if preset is not None and preset.val_folder and data.val_from_train:
        raise DataError(
            f"--dataset-preset {run_args.dataset_preset}: the reference validates on the dataset's own val/ split, "
            f"and {str(run_args.data_dir or run_args.dataset)!r} has no val split"
        )


def adam(parameters, args, device):
    """The paper's optimiser of stages 2-4, `torch.optim.Adam` with `args.learning_rate` and `args.weight_decay`
    (L2, added to the gradient), fused on CPU and CUDA: with one image per update the optimizer step is most of the
    cost, and the fused step of a 1024-wide head is ~10x faster than the default one on a CPU."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.Adam(parameters, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)


def cached_data_loader(accelerator, dataset, batch_size: int, reshuffle: bool = True):
    """A shuffled, prepared DataLoader over cached tensors (stages 3 and 4). The global batch is split across
    processes when it divides evenly; otherwise (one image per update, the published setting, on several processes)
    every process goes through every batch in the same order, so that with the gradients averaged over processes
    the updates are exactly those of one process (cheap on cached tensors). `reshuffle=False`: one shuffle (seeded by
    the run's seed), then the same order every epoch, as the reference iterates its datasets."""
    from accelerate.data_loader import prepare_data_loader

    if reshuffle:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    else:
        generator = torch.Generator().manual_seed(accelerator.dataloader_config.data_seed or 0)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order)
    if batch_size % accelerator.num_processes == 0:
        return accelerator.prepare(loader)
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=1,
        process_index=0,
        split_batches=True,
        put_on_device=True,
        rng_types=accelerator.rng_types.copy(),
        use_seedable_sampler=True,
        data_seed=accelerator.dataloader_config.data_seed,
    )


@contextmanager
def one_thread_on_cpu(accelerator):
    """Run a block with one intra-op thread when training on CPU (restored afterwards): the steps of a small head or
    gate on one cached image are too small to split across threads, and the threads' synchronisation then costs more
    than it saves (10x slower per epoch with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def progress(accelerator, iterable=None, **kwargs):
    """A tqdm bar on the local main process only."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)


def derived_seed(*keys: int) -> int:
    """A seed derived from several integers (e.g. the run's seed, an epoch, an image index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextmanager
def seeded_rng(*keys: int):
    """Run a block with Python's and torch's CPU RNG seeded from `keys` (restored afterwards).

    Used for per-sample augmentation, so an image gets the same crop in a given epoch whatever the process count,
    worker count or resumption point.
    """
    seed = derived_seed(*keys)
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def train_one_epoch(
    accelerator,
    model,
    loader,
    optimizer,
    compute_loss,
    desc: str = "Training",
    scheduler=None,
    max_grad_norm=None,
    on_update=None,
) -> float:
    """One pass over a prepared `loader`: `loss = compute_loss(model, batch)`, backward, (clip,) step, under
    `accelerator.accumulate`. `on_update(loss, bar)` runs after every optimizer update. Returns the epoch's mean loss
    over batches and processes (accumulated on the device, read once)."""
    model.train()
    loss_sum, steps = torch.zeros((), device=accelerator.device), 0
    bar = progress(accelerator, loader, desc=desc)
    for batch in bar:
        with accelerator.accumulate(model):
            loss = compute_loss(model, batch)
            accelerator.backward(loss)
            if max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
        loss_sum += loss.detach().float()
        steps += 1
        if on_update is not None and accelerator.sync_gradients:
            on_update(loss, bar)
    return accelerator.reduce(loss_sum, reduction="mean").item() / max(steps, 1)


@dataclass
class StageRun:
    """A stage being run: what the shared steps of a stage need (made by `begin_stage`), and the run-directory lock
    its main process holds until `complete_stage` (or until the process ends, if the stage fails)."""

    stage: str
    run_args: object
    args: object
    accelerator: object
    fingerprint: str
    data: object = None
    lock: object = None

    def release(self):
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None


def begin_stage(run_args, args, stage: str, fingerprint, load_data=True, class_names=None, **accelerator_kwargs):
    """The opening of a stage: the Accelerator, seeding, the dataset (with the run's classes fixed, or checked
    against `class_names`), the stage's `fingerprint(run_args, args)`, and its old COMPLETE.json removed."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(run_args, stage, args, **accelerator_kwargs)
    lock = None
    if accelerator.is_main_process and not holds_run_dir_lock(run_args.run_dir):  # else a caller holds it
        lock = run_dir_lock(run_args.run_dir)
        lock.__enter__()
    set_seed(run_args.seed)
    data = load_stage_data(run_args, accelerator, stage, class_names) if load_data else None
    stage_run = StageRun(stage, run_args, args, accelerator, fingerprint(run_args, args), data, lock)
    start_stage(accelerator, run_args.run_dir, stage)
    return stage_run


def seed_training(stage_run: StageRun):
    """Seed every RNG again once a stage's frozen features are ready, right before it builds what it trains: the
    weights then do not depend on whether the features were computed (which draws random numbers) or cached."""
    from accelerate.utils import set_seed

    set_seed(stage_run.run_args.seed)


def train_epochs(
    stage_run: StageRun, model, loader, optimizer, compute_loss, validate, on_epoch_start=None
) -> tuple[dict, dict | None]:
    """The epoch loop of a training stage: resume if asked, then per epoch train, `validate()` (a dict of metrics),
    log and checkpoint. Returns (the last epoch's metrics + `train_loss`, the stage's summary when
    `stop_after_epoch` ended it early, else None)."""
    accelerator, args, stage = stage_run.accelerator, stage_run.args, stage_run.stage
    run_dir = stage_run.run_args.run_dir
    epochs_done = resume_if_asked(accelerator, run_dir, args, stage, stage_run.fingerprint)
    metrics = {}
    for epoch in range(epochs_done, args.epochs):
        loader.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        train_loss = train_one_epoch(
            accelerator, model, loader, optimizer, compute_loss, desc=f"{stage} epoch {epoch + 1}/{args.epochs}"
        )
        metrics = {**validate(), "train_loss": train_loss}
        logger.info(f"{stage} epoch {epoch + 1}: {metrics}")
        accelerator.log({f"{stage}/val_{key}": value for key, value in metrics.items()}, step=epoch + 1)
        stop = end_epoch(accelerator, run_dir, args, stage, stage_run.fingerprint, epoch + 1, args.epochs)
        fault_point(f"{stage}-epoch-{epoch + 1}")
        if stop:
            close_trackers(accelerator)
            stage_run.release()
            return metrics, {"stage": stage, "stopped": True, "epochs_done": epoch + 1}
    return metrics, None


def train_on_cached_tensors(
    stage_run: StageRun, build_module, train_set, compute_loss, validate, on_epoch_start=None, reshuffle: bool = True
) -> tuple[torch.nn.Module, dict, dict | None]:
    """Stages 3 and 4: train a small module on cached tensors. Every RNG is reseeded, then `build_module()` makes the
    module, Adam (the paper's) its optimiser, and the epoch loop runs over `train_set` (a `TensorDataset`, shuffled)
    with one CPU thread; `validate(module)` gets the unwrapped module. Returns (the unwrapped module, the last
    epoch's metrics, the stop summary or None) as `train_epochs` does."""
    seed_training(stage_run)
    accelerator = stage_run.accelerator
    module = build_module()
    optimizer = adam(module.parameters(), stage_run.args, accelerator.device)
    module, optimizer = accelerator.prepare(module, optimizer)
    loader = cached_data_loader(accelerator, train_set, stage_run.args.batch_size, reshuffle)
    with one_thread_on_cpu(accelerator):
        metrics, stopped = train_epochs(
            stage_run,
            module,
            loader,
            optimizer,
            compute_loss,
            lambda: validate(accelerator.unwrap_model(module)),
            on_epoch_start=on_epoch_start,
        )
    return accelerator.unwrap_model(module), metrics, stopped


def complete_stage(stage_run: StageRun, save_outputs=None, **record) -> Path:
    """The end of a stage: `save_outputs(output folder)` and then COMPLETE.json (fingerprint, settings, process
    count, `record` and what `save_outputs` returned, if a dict) on the main process; then the epoch checkpoints go
    and the trackers close."""
    accelerator, run_dir = stage_run.accelerator, stage_run.run_args.run_dir
    output = stage_output(run_dir, stage_run.stage)
    if accelerator.is_main_process:
        if save_outputs is not None:
            record.update(save_outputs(output) or {})
        fault_point(f"{stage_run.stage}-before-complete")
        settings = settings_dict(stage_run.run_args, stage_run.args)
        write_complete(
            run_dir,
            stage_run.stage,
            stage_run.fingerprint,
            settings=settings,
            num_processes=accelerator.num_processes,
            **record,
        )
    finish_stage(accelerator, run_dir, stage_run.stage)
    stage_run.release()
    return output


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


def close_trackers(accelerator):
    """`accelerator.end_training()` without destroying the process group: later stages of the same process
    (`train/run_all.py`) reuse it; `end_processes` destroys it once at exit."""
    for tracker in accelerator.trackers:
        tracker.finish()


# Where launchers put a process's global rank (torchrun / accelerate launch, MPI).
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@contextmanager
def main_process_lock(run_dir):
    """The run-directory lock, held by the main process of a (possibly multi-process) launch for the block. The rank
    is read from the launcher's environment: creating Accelerate's state here would fix it before the stage's
    Accelerator could configure it."""
    rank = next((int(os.environ[name]) for name in RANK_VARIABLES if name in os.environ), 0)
    if rank != 0:
        yield
        return
    with run_dir_lock(run_dir):
        yield


def end_processes():
    """Tear the process group down cleanly (multi-process runs otherwise may abort at exit)."""
    from accelerate import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()


__all__ = [
    "StageRun",
    "adam",
    "begin_stage",
    "cached_data_loader",
    "close_trackers",
    "complete_stage",
    "derived_seed",
    "end_processes",
    "finish_stage",
    "load_stage_data",
    "preset_class_names",
    "main_process_lock",
    "one_thread_on_cpu",
    "make_accelerator",
    "progress",
    "seed_training",
    "seeded_rng",
    "start_stage",
    "train_epochs",
    "train_on_cached_tensors",
    "train_one_epoch",
]
