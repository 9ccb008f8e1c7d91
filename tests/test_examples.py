"""The runnable examples run offline with no arguments (a tiny model built on the fly) and print what they claim."""

import json
import re
import subprocess
import sys

import pytest
from helpers_repo_template import REPO_ROOT
from safetensors import safe_open

EXAMPLES = REPO_ROOT / "examples"

pytestmark = pytest.mark.slow  # subprocess runs of the examples


def run_example(script: str, *args, cwd) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_inference_example_without_arguments(tmp_path):
    stdout = run_example("inference.py", "--output-json", tmp_path / "out.json", cwd=tmp_path)
    out = json.loads((tmp_path / "out.json").read_text())
    labels = out["labels"]
    assert len(out["pipeline"]) == len(out["model"]) == 5
    for ranked, record in zip(out["pipeline"], out["model"]):
        assert len(ranked) == 3 and {entry["label"] for entry in ranked} <= set(labels)
        scores = [entry["score"] for entry in ranked]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5  # 3 classes: top 3 is all
        assert [label for label, _ in record["fused"]] == [entry["label"] for entry in ranked]
        for branch in ("vlm_branch", "distilled_head"):
            assert abs(sum(score for _, score in record[branch]) - 1) < 1e-5
        assert record["gate_weights"] is None  # the default concat_linear gate has no per-image weights
        assert f"{record['image']}: fused" in stdout
    assert out["max_difference"] < 1e-5
    assert "pipeline and model agree" in stdout


def test_inference_example_on_a_model_folder(tiny_folder, tmp_path):
    from PIL import Image

    paths = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    Image.new("RGB", (70, 50), (10, 200, 10)).save(paths[0])
    Image.linear_gradient("L").save(paths[1])
    Image.new("RGBA", (30, 90), (200, 0, 0, 255)).save(paths[2])
    run_example(
        "inference.py",
        tiny_folder,
        "--images",
        *paths,
        "--top-k",
        "2",
        "--batch-size",
        "2",
        "--output-json",
        tmp_path / "out.json",
        cwd=tmp_path,
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert [record["image"] for record in out["model"]] == ["a.png", "b.jpg", "c.png"]
    assert all(len(ranked) == 2 for ranked in out["pipeline"])
    assert out["max_difference"] < 1e-5


def test_finetune_with_trainer_example(tiny_folder, tmp_path):
    output_dir = tmp_path / "finetuned"
    stdout = run_example("finetune_with_trainer.py", "--output-dir", output_dir, cwd=tmp_path)
    metrics = {
        name: (float(before), float(after))
        for name, before, after in re.findall(r"^test (\w+)\s+before ([\d.]+)\s+after ([\d.]+)$", stdout, re.M)
    }
    assert set(metrics) == {"loss", "accuracy", "head_accuracy", "vlm_accuracy"}, stdout
    loss_before, loss_after = metrics["loss"]
    assert loss_after < 0.7 * loss_before, metrics
    assert metrics["accuracy"][1] > metrics["accuracy"][0], metrics
    assert metrics["vlm_accuracy"][0] == metrics["vlm_accuracy"][1]  # the VLM is frozen
    assert re.search(r"trainable parameters: [\d,]+ of [\d,]+ \(head \+ gate\)", stdout)
    assert "reloaded from" in stdout

    # A complete model folder; the VLM weights are the ones it started from (the same seeded tiny model).
    files = {path.name for path in output_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_emovlm_kd.py",
        "configuration_emovlm_kd.py",
        "processor_config.json",
        "image_processing_emovlm_kd.py",
        "processing_emovlm_kd.py",
        "image_decoding_emovlm_kd.py",
        "tokenizer.json",
    } <= files
    tuned_file, base_file = output_dir / "model.safetensors", tiny_folder / "model.safetensors"
    with safe_open(tuned_file, "pt") as tuned, safe_open(base_file, "pt") as base:
        vlm_keys = [key for key in base.keys() if key.startswith("vlm.")]
        assert vlm_keys and all(tuned.get_tensor(key).equal(base.get_tensor(key)) for key in vlm_keys)
        head_keys = [key for key in base.keys() if key.startswith(("head.", "gate."))]
        assert any(not tuned.get_tensor(key).equal(base.get_tensor(key)) for key in head_keys)
