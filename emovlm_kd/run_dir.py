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

Every stage writes `<run_dir>/<output>.COMPLETE.json` (`teacher.COMPLETE.json`, `model.COMPLETE.json`, ...) as its
last action, holding its fingerprint (a hash of its inputs, its settings and the fingerprints of the stages it
reads, never of paths) and its resolved settings; the all-stages command skips a stage whose marker holds the
fingerprint it would write. Markers sit beside the outputs, so an exported repo holds no run bookkeeping.

One process at a time works in a run directory: a stage takes `<run_dir>/.lock` (an exclusive `flock`, naming its
holder) and a second run fails at once, saying who holds it. Every file the run directory keeps is written to a
unique temporary name and renamed into place, so an interrupted run never leaves a half-written marker, label list,
checkpoint index or cache file behind; a corrupt one is reported by path and ignored.
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
COMPLETE_SUFFIX = ".COMPLETE.json"
LOCK_FILE = ".lock"
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


class RunError(ValueError):
    """A problem the user has to fix before the command can run (the message says which path and why): commands
    report it and exit with status 2, without a traceback."""


class DataError(RunError):
    """A dataset, or a run directory's contents, that cannot be used as given."""


class RunDirLocked(RunError):
    """Another process is working in the run directory."""


class RunDirUnwritable(RunError):
    """The run directory cannot be created or written (permissions, read-only file system)."""


def hash_json(value) -> str:
    """A short stable hash of any JSON-serialisable value (paths and other objects are stringified)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path) -> str:
    """A short hash of a file's contents (for fingerprints: the same bytes anywhere give the same digest)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write_atomic(path: Path, text: str):
    """Write `text` to `path` through a unique temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o666 & ~current_umask())
    os.replace(tmp.name, path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path, what: str) -> dict | None:
    """A JSON file the run directory keeps; None (and a warning naming it) when it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning(f"Ignoring the corrupt {what} {str(path)!r}: {error}")
        return None
    if not isinstance(value, dict):
        logger.warning(f"Ignoring the corrupt {what} {str(path)!r}: not a JSON object")
        return None
    return value


def stage_output(run_dir: str | os.PathLike, stage: str) -> Path:
    """Where `stage` writes its output in the run directory."""
    return Path(run_dir) / STAGE_OUTPUTS[stage]


def complete_marker(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / (Path(STAGE_OUTPUTS[stage]).stem + COMPLETE_SUFFIX)


def read_complete(run_dir: str | os.PathLike, stage: str) -> dict | None:
    """The stage's COMPLETE marker, or None when the stage has not completed (or its marker is corrupt)."""
    record = read_json(complete_marker(run_dir, stage), "completion marker")
    return record if record is None or "fingerprint" in record else None


def is_complete(run_dir: str | os.PathLike, stage: str, fingerprint: str | None = None) -> bool:
    """Whether the stage completed (with this fingerprint of its inputs and settings, when given)."""
    record = read_complete(run_dir, stage)
    return record is not None and (fingerprint is None or record.get("fingerprint") == fingerprint)


def write_complete(run_dir: str | os.PathLike, stage: str, fingerprint: str, **info) -> Path:
    """Mark the stage complete; call it as the stage's last action (written atomically)."""
    marker = complete_marker(run_dir, stage)
    record = {"stage": stage, "fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_atomic(marker, json.dumps(record, indent=2, default=str) + "\n")
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
    if len(class_names) < 2:  # checked before anything is written: a corrected dataset is then accepted
        raise DataError(f"EmoVLM-KD needs at least 2 classes, the dataset has {len(class_names)}: {class_names}")
    recorded = (read_json(path, "class list") or {}).get("class_names")
    if recorded is not None:
        if recorded != class_names:
            raise DataError(
                f"The dataset's classes {class_names} differ from those fixed for this run in {str(path)!r}: "
                f"{recorded}. Use the same dataset (and class order) for every stage of a run, or a new run directory."
            )
        return recorded
    write_atomic(path, json.dumps({"class_names": class_names}, indent=2) + "\n")
    return class_names


def read_class_names(run_dir: str | os.PathLike) -> list[str]:
    path = Path(run_dir) / LABELS_FILE
    recorded = (read_json(path, "class list") or {}).get("class_names")
    if recorded is None:
        raise DataError(f"{str(path)!r} is missing or unreadable: run a training stage on the dataset first")
    return recorded


_HELD_LOCKS: dict[str, list] = {}  # lock path -> [file descriptor, depth]: re-entrant within a process


def _lock_path(run_dir: str | os.PathLike) -> Path:
    return (Path(run_dir) / LOCK_FILE).resolve()


def holds_run_dir_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the run directory's lock."""
    return str(_lock_path(run_dir)) in _HELD_LOCKS


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike):
    """Hold `<run_dir>/.lock` (exclusive, re-entrant within this process) for the block; another process holding
    it is a `RunDirLocked` error naming the holder. The operating system releases it if the process dies."""
    path = _lock_path(run_dir)
    key = str(path)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            if key in _HELD_LOCKS:
                _HELD_LOCKS[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise RunDirUnwritable(f"Cannot write in the run directory {str(path.parent)!r}: {error.strerror}") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise RunDirLocked(
            f"The run directory {str(path.parent)!r} is in use by {holder}: wait for it to finish, or use another "
            f"--run-dir (the lock is {str(path)!r})"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(holder).encode(), 0)
    _HELD_LOCKS[key] = [descriptor, 1]
    for stale in path.parent.rglob(".*.tmp"):  # left by a killed run: nobody else writes here now
        stale.unlink(missing_ok=True)
    try:
        yield
    finally:
        _HELD_LOCKS.pop(key)
        os.ftruncate(descriptor, 0)
        os.close(descriptor)  # closing the descriptor releases the lock


def fault_point(name: str):
    """Testing hook for interruptions: `EMOVLM_KD_KILL_AT=<name>` kills the process here with SIGKILL, as a crash
    or an out-of-memory kill would (points: `cache-write`, `checkpoint-save`, `<stage>-epoch-<n>`,
    `<stage>-before-complete`)."""
    if os.environ.get("EMOVLM_KD_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is exceeded",
    errno.EACCES: "permission denied",
}


def disk_problem(error: BaseException, run_dir: str | os.PathLike | None = None) -> str | None:
    """What is wrong with the disk when `error` (or what caused it) is a failed write, else None. Some writers
    (torch's zip writer) say only "file write failed": then the run directory's file system is asked whether it is
    read-only or full."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            where = f" writing {cause.filename!r}" if cause.filename else ""
            return f"{DISK_ERRNOS[cause.errno]}{where}"
        text = str(cause)
        for number, reason in DISK_ERRNOS.items():
            if os.strerror(number) in text or f"os error {number}" in text:
                return reason
        cause = cause.__cause__ or cause.__context__
    if run_dir is not None and os.path.isdir(run_dir):
        status = os.statvfs(run_dir)
        if status.f_flag & os.ST_RDONLY:
            return DISK_ERRNOS[errno.EROFS]
        if status.f_bavail * status.f_frsize < 1 << 20:
            return DISK_ERRNOS[errno.ENOSPC]
    return None


def read_results(run_dir: str | os.PathLike) -> dict:
    """Stage 5's measured results (`eval/results.json`)."""
    return json.loads((stage_output(run_dir, "evaluate") / RESULTS_FILE).read_text())


__all__ = [
    "COMPLETE_SUFFIX",
    "DataError",
    "RunDirLocked",
    "RunDirUnwritable",
    "RunError",
    "LABELS_FILE",
    "RESULTS_FILE",
    "STAGES",
    "STAGE_OUTPUTS",
    "clear_complete",
    "complete_marker",
    "current_umask",
    "disk_problem",
    "fault_point",
    "holds_run_dir_lock",
    "ensure_class_names",
    "file_digest",
    "hash_json",
    "is_complete",
    "read_class_names",
    "read_complete",
    "read_json",
    "read_results",
    "run_dir_lock",
    "stage_output",
    "upstream_fingerprint",
    "write_atomic",
    "write_complete",
]
