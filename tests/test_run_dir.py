"""The run directory: the class list fixed by the first stage, completion markers, the VLM stages 3-6 use."""

import json

import pytest

from emovlm_kd.run_dir import (
    DataError,
    complete_marker,
    ensure_class_names,
    hash_json,
    is_complete,
    read_complete,
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
