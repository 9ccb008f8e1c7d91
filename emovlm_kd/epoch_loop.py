"""The one epoch loop of every training stage: resume, per epoch train (optionally) validate, log, checkpoint, stop
and fault points; with the hooks stage 1 needs (a learning-rate scheduler, gradient clipping, a callback after every
optimizer update) and the cached-tensor training of stages 3 and 4."""

from contextlib import contextmanager

import torch
from accelerate.logging import get_logger

from emovlm_kd.batch_semantics import cached_data_loader
from emovlm_kd.checkpoints import end_epoch, resume_if_asked
from emovlm_kd.optimizers import build_adam_optimizer
from emovlm_kd.processes import progress
from emovlm_kd.run_dir import fault_point
from emovlm_kd.stage_lifecycle import StageRun, stop_stage

logger = get_logger(__name__)


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


def _resume(stage_run: StageRun, loader) -> int:
    """Load the stage's checkpoint when asked; restore the loop's history and update count. Returns epochs done."""
    accelerator, args = stage_run.accelerator, stage_run.args
    run_dir, stage = stage_run.run_args.run_dir, stage_run.stage
    epochs_done, state = resume_if_asked(accelerator, run_dir, args, stage, stage_run.fingerprint)
    unknown = {"train_loss": None}  # a checkpoint written before the loop saved its state
    stage_run.history = list(state.get("history") or [unknown] * epochs_done)
    updates_per_epoch = -(-len(loader) // accelerator.gradient_accumulation_steps)
    stage_run.updates = state.get("updates", epochs_done * updates_per_epoch)
    stage_run.resumed_after_epochs = epochs_done
    return epochs_done


def train_epochs(
    stage_run: StageRun,
    model,
    loader,
    optimizer,
    compute_loss,
    validate=None,
    on_epoch_start=None,
    scheduler=None,
    max_grad_norm=None,
    on_update=None,
) -> tuple[dict, dict | None]:
    """The epoch loop of a training stage: resume if asked, then per epoch train, `validate()` (a dict of metrics,
    when given), log and checkpoint (with the loop's state). `on_update(loss, bar, updates)` runs after every
    optimizer update (`updates`: the count so far). The per-epoch metrics and update count are kept on `stage_run`
    (`history`, `updates`). Returns (the last epoch's metrics + `train_loss`, the stage's summary when
    `stop_after_epoch` ended it early, else None)."""
    accelerator, args, stage = stage_run.accelerator, stage_run.args, stage_run.stage
    epochs_done = _resume(stage_run, loader)

    def count_update(loss, bar):
        stage_run.updates += 1
        if on_update is not None:
            on_update(loss, bar, stage_run.updates)

    metrics = {}
    for epoch in range(epochs_done, args.epochs):
        loader.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        desc = f"{stage} epoch {epoch + 1}/{args.epochs}"
        train_loss = train_one_epoch(
            accelerator, model, loader, optimizer, compute_loss, desc, scheduler, max_grad_norm, count_update
        )
        metrics = {**(validate() if validate is not None else {}), "train_loss": train_loss}
        stage_run.history.append(metrics)
        logger.info(f"{stage} epoch {epoch + 1}/{args.epochs}: {metrics}")
        accelerator.log({f"{stage}/val_{key}": value for key, value in metrics.items()}, step=stage_run.updates)
        loop_state = {
            "history": stage_run.history,
            "updates": stage_run.updates,
            "num_processes": accelerator.num_processes,
        }
        run_dir = stage_run.run_args.run_dir
        stop = end_epoch(accelerator, run_dir, args, stage, stage_run.fingerprint, epoch + 1, args.epochs, loop_state)
        fault_point(f"{stage}-epoch-{epoch + 1}")
        if stop:
            return metrics, stop_stage(stage_run)
    return metrics, None


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


def train_on_cached_tensors(
    stage_run: StageRun, build_module, train_set, compute_loss, validate, on_epoch_start=None, reshuffle: bool = True
) -> tuple[torch.nn.Module, dict, dict | None]:
    """Stages 3 and 4: train a small module on cached tensors. Every RNG is reseeded, then `build_module()` makes the
    module, Adam (the paper's) its optimiser, and the epoch loop runs over `train_set` (a `TensorDataset`, shuffled;
    `SAME_UPDATES` batches) with one CPU thread; `validate(module)` gets the unwrapped module. Returns (the unwrapped
    module, the last epoch's metrics, the stop summary or None) as `train_epochs` does."""
    from accelerate.utils import set_seed

    # Reseeded once the frozen features are ready: the weights then do not depend on whether the features were
    # computed (which draws random numbers) or cached.
    set_seed(stage_run.run_args.seed)
    accelerator = stage_run.accelerator
    module = build_module()
    optimizer = build_adam_optimizer(module.parameters(), stage_run.args, accelerator.device)
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


__all__ = ["one_thread_on_cpu", "train_epochs", "train_on_cached_tensors", "train_one_epoch"]
