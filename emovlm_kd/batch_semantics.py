"""What a stage's `batch_size` means on N processes, stated once (docs/multi-gpu.md), logged at the start of every
training stage and recorded in its `<output>.COMPLETE.json` (`batch`).

* `PER_PROCESS` (stages 1 and 2): the transformers Trainer convention. `batch_size` images go through each process per
  step, so an optimizer update covers `batch_size x gradient_accumulation_steps x num_processes` images (the global
  batch). N processes with `batch_size` b make the same updates as one process with b x N, and take 1/N of its
  updates per epoch; stage 1's warm-up is a share of the updates actually made.
* `SAME_UPDATES` (stages 3 and 4, on cached tensors): `batch_size` is global and the updates are those of one
  process, whatever N. A batch that divides evenly is split across the processes; otherwise (one image per update,
  the published setting) every process goes through every batch in the same order, and with the gradients averaged
  the updates are exactly those of one process (cheap on cached tensors).

Nothing a stage accepts crashes mid-run on a batch/process mismatch; a batch that would need more images per update
than the training split holds is refused before training, with a value that fits.
"""

from dataclasses import dataclass

import torch

from emovlm_kd.run_dir import DataError

PER_PROCESS = "per_process"
SAME_UPDATES = "same_updates"


@dataclass(frozen=True)
class BatchPlan:
    """A training stage's batch on this launch: what one optimizer update is."""

    semantics: str
    batch_size: int
    num_processes: int
    gradient_accumulation_steps: int = 1

    @property
    def images_per_update(self) -> int:
        if self.semantics == PER_PROCESS:
            return self.batch_size * self.gradient_accumulation_steps * self.num_processes
        return self.batch_size

    @property
    def split_across_processes(self) -> bool:
        return self.semantics == PER_PROCESS or self.batch_size % self.num_processes == 0

    def describe(self) -> str:
        """What an update is, in words (the log, the marker, the model card)."""
        n, images = self.num_processes, self.images_per_update
        per = "image" if images == 1 else "images"
        if self.semantics == PER_PROCESS:
            accumulated = f" x {self.gradient_accumulation_steps} accumulated" * (self.gradient_accumulation_steps > 1)
            return (
                f"one update = {images} {per} ({self.batch_size} per process{accumulated} x {n} "
                f"process{'es' * (n > 1)}; batch_size is per process, as in the transformers Trainer)"
            )
        if n == 1:
            return f"one update = {images} {per}"
        if self.split_across_processes:
            return f"one update = {images} {per}, split across {n} processes: the updates of one process"
        return f"one update = {images} {per}; each of the {n} processes runs every update: the updates of one process"

    def record(self) -> dict:
        return {
            "semantics": self.semantics,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_processes": self.num_processes,
            "images_per_update": self.images_per_update,
            "update": self.describe(),
        }


def batch_plan(accelerator, semantics: str, args) -> BatchPlan:
    """The batch of a stage's `args` (`batch_size`, `gradient_accumulation_steps`) on this launch."""
    if semantics not in (PER_PROCESS, SAME_UPDATES):
        raise ValueError(f"Unknown batch semantics {semantics!r}")
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    return BatchPlan(semantics, args.batch_size, accelerator.num_processes, accumulation)


def check_batch_fits(plan: BatchPlan, num_train_images: int):
    """Refuse, before any training, a per-process batch that one step of all processes could not fill with distinct
    training images (Accelerate would repeat images to fill it); say which `batch_size` fits. One process is never
    refused: its last batch is just smaller."""
    step = plan.batch_size * plan.num_processes
    if plan.semantics != PER_PROCESS or plan.num_processes == 1 or step <= num_train_images:
        return
    fits = num_train_images // plan.num_processes
    remedy = (
        f"use --batch-size {fits} or less (set per stage: run_all --set STAGE.batch_size={fits})"
        if fits
        else f"use at most {num_train_images} processes"
    )
    raise DataError(
        f"batch_size {plan.batch_size} is per process: on {plan.num_processes} processes one step takes {step} "
        f"images, more than the {num_train_images} training images; {remedy}"
    )


def cached_data_loader(accelerator, dataset, batch_size: int, reshuffle: bool = True):
    """A shuffled DataLoader over cached tensors (stages 3 and 4) with `SAME_UPDATES`: the global batch split across
    processes when it divides evenly, else every batch on every process in the same order. Shuffling follows the
    run's seed and the epoch (`set_epoch`), so a resumed run sees the same order without a saved sampler state.
    `reshuffle=False`: one shuffle (seeded by the run's seed), then the same order every epoch, as the reference
    iterates its datasets."""
    from accelerate.data_loader import prepare_data_loader

    if reshuffle:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    else:
        generator = torch.Generator().manual_seed(accelerator.dataloader_config.data_seed or 0)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order)
    shards = accelerator.num_processes if batch_size % accelerator.num_processes == 0 else 1
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=shards,
        process_index=accelerator.process_index if shards > 1 else 0,
        split_batches=True,
        put_on_device=True,
        rng_types=accelerator.rng_types.copy(),
        use_seedable_sampler=True,
        data_seed=accelerator.dataloader_config.data_seed,
    )


__all__ = ["PER_PROCESS", "SAME_UPDATES", "BatchPlan", "batch_plan", "cached_data_loader", "check_batch_fits"]
