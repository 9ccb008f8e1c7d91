"""The run's dataset as a stage loads it: `--data-dir` or `--dataset`, on the main process first, with the run's
classes fixed or checked (a `--dataset-preset`'s, in its order, when one is given).

The rest of a stage's plumbing lives in modules named for it: `accelerator_setup`, `batch_semantics`,
`stage_lifecycle`, `epoch_loop`, `optimizers`, `seeding`, `processes`.
"""

from emovlm_kd.run_dir import DataError, ensure_class_names
from emovlm_kd.sources import has_source, load_source


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


__all__ = ["check_preset_split", "load_stage_data", "preset_class_names"]
