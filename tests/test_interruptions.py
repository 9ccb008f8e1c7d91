"""Runs that are killed, rerun, forced, moved, contended, starved of disk or given a read-only run directory end with
exactly the model of one uninterrupted run, or with a clear error that names the path.

Every run is the all-stages script in a subprocess on the tiny models (`quickstart` recipe, fewer epochs). Kills are
SIGKILL at named points (`emovlm_kd.run_dir.fault_point`, set through `EMOVLM_KD_KILL_AT`), several of them in the
middle of writing a checkpoint or a cache file; each rerun must reproduce the uninterrupted run's exported weights
byte for byte.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emovlm_kd.testing import make_imagefolder

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ["instruction_tuning", "teacher", "distill", "gate", "evaluate", "export"]
SETTINGS = [
    "instruction_tuning.epochs=2",
    "teacher.epochs=2",
    "distill.epochs=4",
    "distill.checkpoint_every=1",
    "gate.epochs=3",
    "gate.checkpoint_every=1",
    "export.verify_images=2",
]


def run_all_command(data: Path, run_dir: Path | str, *extra, kill_at: str | None = None) -> tuple[list[str], dict]:
    """The all-stages script's command line and environment (`kill_at`: a fault point to SIGKILL the run at)."""
    argv = [
        sys.executable,
        str(REPO_ROOT / "train" / "run_all.py"),
        "--config",
        "quickstart",
        "--data-dir",
        str(data),
        "--run-dir",
        str(run_dir),
        "--stages",
        *STAGES,
        "--set",
        *SETTINGS,
        *extra,
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("EMOVLM_KD_KILL_AT", None)
    if kill_at:
        environment["EMOVLM_KD_KILL_AT"] = kill_at
    return argv, environment


def run_all(data: Path, run_dir: Path | str, *extra, kill_at: str | None = None, cwd: Path | None = None):
    argv, environment = run_all_command(data, run_dir, *extra, kill_at=kill_at)
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd or data.parent, env=environment)


def weights(run_dir: Path) -> bytes:
    return (run_dir / "model" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("interruptions") / "data", per_class={"train": 8, "test": 3})


@pytest.fixture(scope="module")
def uninterrupted(data) -> bytes:
    run_dir = data.parent / "uninterrupted"
    result = run_all(data, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return weights(run_dir)


@pytest.mark.parametrize(
    "kill_at",
    [
        "checkpoint-save",  # stage 1's first epoch checkpoint, state written but not its index
        "instruction_tuning-epoch-1",
        "teacher-epoch-1",
        "cache-write",  # stage 3's first feature file, written but not yet renamed into place
        "distill-epoch-2",
        "gate-before-complete",  # the gate saved, its marker not
        "export-before-complete",  # the repo written, its marker not
    ],
)
def test_killed_and_rerun_equals_uninterrupted(data, uninterrupted, kill_at, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_all(data, run_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    rerun = run_all(data, run_dir)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert weights(run_dir) == uninterrupted
    assert not list(run_dir.rglob("*tmp")), "an interrupted write left a temporary file"


def test_forced_rerun_with_a_warm_cache_and_a_relative_run_dir_equal_uninterrupted(data, uninterrupted):
    relative = Path("relative-run")
    first = run_all(data, relative, cwd=data.parent)
    assert first.returncode == 0, first.stderr[-4000:]
    assert weights(data.parent / relative) == uninterrupted
    cache = sorted(p.name for p in (data.parent / relative / "cache").iterdir())
    forced = run_all(data, data.parent / relative, "--force")  # now absolute: the same run, features from the cache
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "Using cached features" in forced.stderr
    assert sorted(p.name for p in (data.parent / relative / "cache").iterdir()) == cache
    assert weights(data.parent / relative) == uninterrupted
    moved = data.parent / "moved-run"
    shutil.move(data.parent / relative, moved)  # a moved run directory is the same run: nothing reruns
    again = run_all(data, moved)
    assert again.returncode == 0 and again.stderr.count("is complete for these inputs; skipped") == len(STAGES)


def test_a_second_run_on_the_same_run_dir_is_refused(data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    argv, environment = run_all_command(data, run_dir)
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=900) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], [output[1][-2000:] for output in outputs]
    refused = next(stderr for run, (_, stderr) in zip(runs, outputs) if run.returncode == 2)
    assert f"The run directory {str(run_dir)!r} is in use by" in refused and '"pid"' in refused
    assert weights(run_dir) == uninterrupted


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_full_disk_is_a_clear_error_and_the_run_completes_once_space_is_back(data, uninterrupted, tmp_path):
    with tmpfs(tmp_path / "small-disk", "1200k") as disk:
        run_dir = disk / "run"
        full = run_all(data, run_dir)
        assert full.returncode == 2, full.stderr[-4000:]
        assert "no space left on the device" in full.stderr and str(run_dir) in full.stderr
        assert "Traceback" not in full.stderr
        remount(disk, "size=64m")
        time.sleep(0.1)
        again = run_all(data, run_dir)
        assert again.returncode == 0, again.stderr[-4000:]
        assert weights(run_dir) == uninterrupted


def test_read_only_run_dir_is_a_clear_error_and_the_run_completes_once_writable(data, uninterrupted, tmp_path):
    with tmpfs(tmp_path / "disk", "64m") as disk:
        run_dir = disk / "run"
        run_dir.mkdir()
        remount(disk, "ro")
        refused = run_all(data, run_dir)
        assert refused.returncode == 2, refused.stderr[-4000:]
        assert "Read-only file system" in refused.stderr and str(run_dir) in refused.stderr
        remount(disk, "rw")
        again = run_all(data, run_dir)
        assert again.returncode == 0, again.stderr[-4000:]
        assert weights(run_dir) == uninterrupted
