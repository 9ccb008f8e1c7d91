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

One process at a time works in a run directory: a stage takes `<run_dir>/.lock` (`filelock.FileLock`, naming its
holder) and a second run fails at once, saying who holds it. A `.lock` or a stage output that is a symbolic link is
refused (a run would write, truncate or delete through it). Every file the run directory keeps is written to a unique
temporary name (`.<name>.<random>.emovlm-kd-tmp`) and renamed into place, so an interrupted run never leaves a
half-written marker, label list, checkpoint index or cache file behind; a corrupt one is reported by path and
ignored. The lock's holder removes the temporary files a killed run left, and only those: names of that pattern, in
the folders the package writes.

Class names reach the file system only through `safe_file_name` (widget files and any other per-class file), and
`check_class_names` refuses names that collide once normalised, that are empty or only punctuation, or that hold the
prompt's placeholders or chat special tokens.
"""

import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
import unicodedata
import uuid
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
COMPLETE_SUFFIX = ".COMPLETE.json"
LOCK_FILE = ".lock"
RESULTS_FILE = "results.json"
# The suffix of every temporary file this package writes: stale-file cleanup deletes these names and no others.
TEMP_SUFFIX = ".emovlm-kd-tmp"
# Folders of the run directory the package writes temporary files in (besides the run directory itself).
TEMP_FOLDERS = ("cache", "checkpoints")
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


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique temporary name beside `path` (`.<name>.<random>.emovlm-kd-tmp`), to write and then rename to `path`;
    the lock's holder deletes names of this pattern left by a killed run."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def remove_stale_temporary_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed run left (`temporary_path` names) in the run directory and the folders the
    package writes in it, without following links to other folders; returns what was deleted."""
    run_dir = Path(run_dir)
    removed = [path for path in run_dir.glob(f".*{TEMP_SUFFIX}") if path.is_file() or path.is_symlink()]
    for folder in [run_dir / name for name in (*TEMP_FOLDERS, *STAGE_OUTPUTS.values())]:
        if folder.is_dir():
            for parent, _, files in os.walk(folder):  # os.walk never follows links to folders below `folder`
                removed += [
                    Path(parent, name) for name in files if name.startswith(".") and name.endswith(TEMP_SUFFIX)
                ]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_atomic(path: Path, text: str):
    """Write `text` to `path` through a unique temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX, delete=False
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


# Text the prompts replace (`<label_list>`, `<example_label_1>`, ...) and chat special tokens (`<|im_end|>`): a class
# name holding one would rewrite the prompt it is written into.
PROMPT_MARKUP = re.compile(r"<\|[^|]*\|>|<(num_labels|label_list|example_label_\d+|image)>")
MAX_FILE_NAME = 100


def label_key(name: str) -> str:
    """How two class names are compared for collisions: Unicode NFC, case-folded, outer spaces stripped."""
    return unicodedata.normalize("NFC", name).casefold().strip()


def check_class_names(class_names: list[str], where: str = "the dataset") -> list[str]:
    """Refuse class names that are not strings, empty or only punctuation, hold the prompt's placeholders or chat
    special tokens, or collide once normalised (`café` composed and decomposed, `Joy`/`joy`, ` sad `/`sad`): a
    `DataError` naming them. The names themselves are kept exactly as given."""
    seen = {}
    for name in class_names:
        if not isinstance(name, str) or not any(character.isalnum() for character in name):
            raise DataError(f"Class name {name!r} of {where} has no letter or digit: name every class")
        markup = PROMPT_MARKUP.search(name)
        if markup:
            raise DataError(
                f"Class name {name!r} of {where} holds {markup.group()!r}, a prompt placeholder or chat special "
                "token: rename the class"
            )
        other = seen.setdefault(label_key(name), name)
        if other != name:
            raise DataError(
                f"Class names {other!r} and {name!r} of {where} differ only in Unicode normalisation, case or outer "
                "spaces: merge or rename them"
            )
    return list(class_names)


def safe_file_name(name: str) -> str:
    """A file or folder name made from a class name (or any text) that cannot leave its folder: letters, digits,
    `-`, `_` and inner dots kept, anything else (`/`, `\\`, NUL, spaces...) replaced by `_`, no leading dot, at most
    100 characters; a short hash of the original is appended whenever anything changed, so distinct names stay
    distinct."""
    text = unicodedata.normalize("NFC", str(name))
    safe = re.sub(r"[^\w.-]", "_", text, flags=re.ASCII).lstrip(".")[:MAX_FILE_NAME]
    if safe != text or not safe:
        safe = f"{safe[: MAX_FILE_NAME - 9]}_{hashlib.sha256(str(name).encode()).hexdigest()[:8]}".lstrip("_.")
    return safe


def ensure_class_names(run_dir: str | os.PathLike, class_names: list[str]) -> list[str]:
    """Fix the run's classes: write `<run_dir>/labels.json` on first use, else check `class_names` against it.

    Call it before any heavy work: a dataset whose classes or class order differ from the run's is an error.
    """
    path = Path(run_dir) / LABELS_FILE
    class_names = check_class_names(class_names)
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


_HELD_LOCKS: dict[str, list] = {}  # lock path -> [FileLock, depth]: re-entrant within a process


def _lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve() / LOCK_FILE


def holds_run_dir_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the run directory's lock."""
    return str(_lock_path(run_dir)) in _HELD_LOCKS


def linked_entries(run_dir: str | os.PathLike) -> list[str]:
    """The lock and stage outputs of the run directory that are symbolic links (a run would write, truncate or
    delete through them). `cache/`, `checkpoints/` and `logs/` may be links (e.g. to a larger disk)."""
    names = (LOCK_FILE, LABELS_FILE, *STAGE_OUTPUTS.values())
    return [str(Path(run_dir) / name) for name in names if (Path(run_dir) / name).is_symlink()]


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike):
    """Hold `<run_dir>/.lock` (`filelock.FileLock`, exclusive, re-entrant within this process) for the block;
    another process holding it is a `RunDirLocked` error naming the holder, a linked lock or stage output a
    `DataError`. The operating system releases the lock if the process dies; the new holder then deletes the
    temporary files the dead one left (`remove_stale_temporary_files`)."""
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
    lock = _acquire(path)
    _HELD_LOCKS[key] = [lock, 1]
    try:
        _write_holder(path)
        remove_stale_temporary_files(path.parent)
        yield
    finally:
        _HELD_LOCKS.pop(key)
        _write_holder(path, clear=True)
        lock.release(force=True)


def _acquire(path: Path):
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirUnwritable(f"Cannot write in the run directory {str(path.parent)!r}: {error.strerror}") from error
    linked = linked_entries(path.parent)
    if linked:
        raise DataError(
            f"{linked} in the run directory {str(path.parent)!r} are symbolic links: a run writes, truncates and "
            "deletes these, so they must be real files and folders of the run directory (remove the links)"
        )
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirLocked(
            f"The run directory {str(path.parent)!r} is in use by {_read_holder(path)}: wait for it to finish, or use "
            f"another --run-dir (the lock is {str(path)!r})"
        ) from None
    except OSError as error:  # e.g. a link created since the check (the lock is opened without following links)
        raise DataError(f"Cannot take the run directory's lock {str(path)!r}: {error.strerror}") from error
    return lock


def _write_holder(path: Path, clear: bool = False):
    """Name this process in the lock file (best effort: the lock does not depend on it). Written through a second
    descriptor, which leaves the lock (held by the first) in place; never through a link."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }
    try:
        descriptor = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.ftruncate(descriptor, 0)
        if not clear:
            os.write(descriptor, json.dumps(holder).encode())
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _read_holder(path: Path) -> str:
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return "another process"
    try:
        return os.read(descriptor, 4096).decode(errors="replace").strip() or "another process"
    finally:
        os.close(descriptor)


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
    "TEMP_SUFFIX",
    "check_class_names",
    "label_key",
    "linked_entries",
    "remove_stale_temporary_files",
    "safe_file_name",
    "temporary_path",
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
