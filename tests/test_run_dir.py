"""The run directory: the class list fixed by the first stage, completion markers, the VLM stages 3-6 use."""

import json
import logging

import pytest

from emovlm_kd.run_dir import (
    DataError,
    RunDirLocked,
    complete_marker,
    ensure_class_names,
    hash_json,
    holds_run_dir_lock,
    is_complete,
    read_complete,
    run_dir_lock,
    upstream_fingerprint,
    write_complete,
)


def test_class_names_are_fixed_by_the_first_stage(tmp_path):
    run_dir = tmp_path / "run"
    assert ensure_class_names(run_dir, ["a", "b"]) == ["a", "b"]
    assert json.loads((run_dir / "labels.json").read_text()) == {"class_names": ["a", "b"]}
    assert ensure_class_names(run_dir, ["a", "b"]) == ["a", "b"]
    with pytest.raises(DataError, match=r"differ from those fixed for this run"):
        ensure_class_names(run_dir, ["b", "a"])


def test_complete_markers(tmp_path):
    run_dir = tmp_path / "run"
    assert not is_complete(run_dir, "teacher") and read_complete(run_dir, "teacher") is None
    key = hash_json({"lr": 3e-5, "data": "x"})
    write_complete(run_dir, "teacher", key, metrics={"accuracy": 0.5})
    assert complete_marker(run_dir, "teacher") == run_dir / "teacher.COMPLETE.json"
    assert complete_marker(run_dir, "export") == run_dir / "model.COMPLETE.json"  # never inside the pushed repo
    assert is_complete(run_dir, "teacher", key) and not is_complete(run_dir, "teacher", hash_json("other"))
    assert read_complete(run_dir, "teacher")["metrics"] == {"accuracy": 0.5}
    assert complete_marker(run_dir, "instruction_data") == run_dir / "instruction_data.COMPLETE.json"
    with pytest.raises(DataError, match="needs stage 'gate' first"):
        upstream_fingerprint(run_dir, "gate", "evaluate")
    assert upstream_fingerprint(run_dir, "teacher", "distill") == key


def test_corrupt_files_are_reported_by_path_and_ignored(tmp_path, caplog):
    from emovlm_kd.checkpoints import CHECKPOINT_META, find_checkpoint

    run_dir = tmp_path / "run"
    write_complete(run_dir, "teacher", "abc")
    marker = complete_marker(run_dir, "teacher")
    marker.write_text('{"stage": "teacher", "finger')  # cut short
    with caplog.at_level(logging.WARNING):
        assert read_complete(run_dir, "teacher") is None and not is_complete(run_dir, "teacher")
    assert str(marker) in caplog.text
    index = run_dir / "checkpoints" / "distill" / "epoch_2" / CHECKPOINT_META
    index.parent.mkdir(parents=True)
    index.write_text("")
    (index.parent.parent / "epoch_notanumber").mkdir()
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run_dir, "distill", "abc") is None
    assert str(index) in caplog.text
    labels = run_dir / "labels.json"
    labels.write_text("{not json")
    assert ensure_class_names(run_dir, ["a", "b"]) == ["a", "b"]  # rebuilt from the dataset, with a warning
    assert json.loads(labels.read_text()) == {"class_names": ["a", "b"]}


def test_one_class_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="at least 2 classes"):
        ensure_class_names(run_dir, ["only"])
    assert not run_dir.exists()
    assert ensure_class_names(run_dir, ["only", "other"]) == ["only", "other"]


@pytest.mark.slow
def test_the_run_dir_lock_names_its_holder_and_is_re_entrant(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from emovlm_kd.run_dir import run_dir_lock\n"
            "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"is in use by .*\"pid\": {holder.pid}"):
            with run_dir_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run_dir):  # free again once the holder died; re-entrant within a process
        with run_dir_lock(run_dir):
            assert holds_run_dir_lock(run_dir)
    assert not holds_run_dir_lock(run_dir)
