"""The run directory: what every stage reads from and writes to, and how a stage says it is complete.

    <run_dir>/labels.json               class names in output order, fixed by the first stage that runs
    <run_dir>/run_config.yaml           the resolved settings of the all-stages command (a reusable recipe)
    <run_dir>/instruction_data.jsonl    stage 0: instruction data (one record per training image)
    <run_dir>/vlm/                      stage 1: the instruction-tuned VLM (adapter merged) + its processor
    <run_dir>/teacher/                  stage 2: the timm teacher (model.safetensors + timm's config.json)
    <run_dir>/cache/                    stages 3-6: per-image features, one safetensors file per split and model
    <run_dir>/head/                     stage 3: the distilled head (head.safetensors + head_spec.json)
    <run_dir>/gate/                     stage 4: the gate (gate.safetensors + gate_spec.json)
    <run_dir>/eval/                     stage 5: results.json, confusion matrices (PNG)
    <run_dir>/model/                    stage 6: the final model repo (what is pushed to the Hub)
    <run_dir>/checkpoints/<stage>/      Accelerate `save_state` checkpoints (for `--resume`)
    <run_dir>/logs/                     tracker logs (TensorBoard)

Every stage writes `<stage output>/COMPLETE.json` as its last action, holding its fingerprint (a hash of its inputs,
its settings and the fingerprints of the stages it reads) and its resolved settings; the all-stages command skips a
stage whose marker holds the fingerprint it would write. Stage 0's output is a file, so its marker is
`<run_dir>/instruction_data.COMPLETE.json`.
"""

import hashlib
import json
import os
import time
from pathlib import Path

LABELS_FILE = "labels.json"
COMPLETE_FILE = "COMPLETE.json"
RESULTS_FILE = "results.json"
# Stage name (a module of `emovlm_kd.stages`, a script of `train/`) in pipeline order -> its output in the run dir.
STAGE_OUTPUTS = {
    "instruction_data": "instruction_data.jsonl",
    "instruction_tuning": "vlm",
    "teacher": "teacher",
    "distill": "head",
    "gate": "gate",
    "evaluate": "eval",
    "export": "model",
}
STAGES = tuple(STAGE_OUTPUTS)


class DataError(ValueError):
    """A dataset or run directory that cannot be used as given (the message says which path and why)."""


def hash_json(value) -> str:
    """A short stable hash of any JSON-serialisable value (paths and other objects are stringified)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_output(run_dir: str | os.PathLike, stage: str) -> Path:
    """Where `stage` writes its output in the run directory."""
    return Path(run_dir) / STAGE_OUTPUTS[stage]


def complete_marker(run_dir: str | os.PathLike, stage: str) -> Path:
    output = stage_output(run_dir, stage)
    return output.with_suffix(".COMPLETE.json") if output.suffix else output / COMPLETE_FILE


def read_complete(run_dir: str | os.PathLike, stage: str) -> dict | None:
    """The stage's COMPLETE.json contents, or None when the stage has not completed."""
    marker = complete_marker(run_dir, stage)
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(run_dir: str | os.PathLike, stage: str, fingerprint: str | None = None) -> bool:
    """Whether the stage completed (with this fingerprint of its inputs and settings, when given)."""
    record = read_complete(run_dir, stage)
    return record is not None and (fingerprint is None or record.get("fingerprint") == fingerprint)


def write_complete(run_dir: str | os.PathLike, stage: str, fingerprint: str, **info) -> Path:
    """Mark the stage complete; call it as the stage's last action (written atomically)."""
    marker = complete_marker(run_dir, stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, marker)
    return marker


def clear_complete(run_dir: str | os.PathLike, stage: str):
    """Remove the stage's marker (a stage does this when it starts, so a crash never leaves a stale marker)."""
    complete_marker(run_dir, stage).unlink(missing_ok=True)


def upstream_fingerprint(run_dir: str | os.PathLike, stage: str, needed_by: str) -> str:
    """The fingerprint of a stage that `needed_by` reads; a clear error when it has not completed."""
    record = read_complete(run_dir, stage)
    if record is None:
        raise DataError(
            f"Stage {needed_by!r} needs stage {stage!r} first: {str(stage_output(run_dir, stage))!r} is not complete "
            f"(run train/{stage}.py with the same --run-dir)"
        )
    return record["fingerprint"]


def ensure_class_names(run_dir: str | os.PathLike, class_names: list[str]) -> list[str]:
    """Fix the run's classes: write `<run_dir>/labels.json` on first use, else check `class_names` against it.

    Call it before any heavy work: a dataset whose classes or class order differ from the run's is an error.
    """
    path = Path(run_dir) / LABELS_FILE
    class_names = list(class_names)
    if path.exists():
        recorded = json.loads(path.read_text())["class_names"]
        if recorded != class_names:
            raise DataError(
                f"The dataset's classes {class_names} differ from those fixed for this run in {str(path)!r}: "
                f"{recorded}. Use the same dataset (and class order) for every stage of a run, or a new run directory."
            )
        return recorded
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"class_names": class_names}, indent=2) + "\n")
    os.replace(tmp, path)
    return class_names


def read_class_names(run_dir: str | os.PathLike) -> list[str]:
    path = Path(run_dir) / LABELS_FILE
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist: run a training stage on a dataset first")
    return json.loads(path.read_text())["class_names"]


def resolve_vlm(run_dir: str | os.PathLike, vlm: str) -> str:
    """The VLM a stage 3+ run uses: the run's instruction-tuned `vlm/` when stage 1 completed, else `vlm`."""
    tuned = stage_output(run_dir, "instruction_tuning")
    return str(tuned) if is_complete(run_dir, "instruction_tuning") else vlm


def read_results(run_dir: str | os.PathLike) -> dict:
    """Stage 5's measured results (`eval/results.json`)."""
    return json.loads((stage_output(run_dir, "evaluate") / RESULTS_FILE).read_text())


__all__ = [
    "COMPLETE_FILE",
    "DataError",
    "LABELS_FILE",
    "RESULTS_FILE",
    "STAGES",
    "STAGE_OUTPUTS",
    "clear_complete",
    "complete_marker",
    "ensure_class_names",
    "hash_json",
    "is_complete",
    "read_class_names",
    "read_complete",
    "read_results",
    "resolve_vlm",
    "stage_output",
    "upstream_fingerprint",
    "write_complete",
]
