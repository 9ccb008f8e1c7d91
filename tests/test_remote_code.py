"""The saved model folder loads through the Auto classes and the pipeline in a fresh process without this package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from emovlm_kd.testing import make_images

# Runs in a fresh interpreter, from an unrelated directory, with this package's modules made unimportable.
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    BLOCKED = {"emovlm_kd", "modeling_emovlm_kd", "configuration_emovlm_kd", "image_processing_emovlm_kd",
               "vlm_adapters_emovlm_kd"}

    class BlockProjectModules:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockProjectModules())
    import torch
    from PIL import Image
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                              AutoProcessor, pipeline)

    folder, out_path = sys.argv[1], sys.argv[2]
    for name in BLOCKED:
        try:
            importlib.import_module(name)
            raise SystemExit(f"{name} should not be importable")
        except ModuleNotFoundError:
            pass
    import importlib
    kinds = {
        "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
        "auto_model": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
        "image_processor": type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)).__name__,
        "processor": type(AutoProcessor.from_pretrained(folder, trust_remote_code=True)).__name__,
    }
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    kinds["model"] = type(model).__name__
    kinds["model_module"] = type(model).__module__
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.new("RGB", (100, 80), (200, 10, 10)), Image.linear_gradient("L").resize((300, 300)),
              Image.new("RGB", (30, 200), (0, 99, 1))]
    with torch.no_grad():
        logits = model(**processor(images)).logits.tolist()
    odd = [Image.new("P", (50, 50)), Image.new("RGBA", (60, 40)), Image.new("CMYK", (40, 40)),
           Image.new("I;16", (33, 33)), Image.new("RGB", (1, 1))]
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    kinds["pipeline"] = type(classifier).__name__
    single = classifier(images[0], top_k=None)
    batched = classifier(images + odd, batch_size=3, top_k=None)
    # transparent images: the pipeline must see the same pixels as the processor (no alpha dropped on the way)
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 40))
    with torch.no_grad():
        transparent_probs = model(**processor([transparent])).logits.softmax(-1)[0].tolist()
    transparent_pipeline = classifier(transparent, top_k=None)
    try:
        classifier(sys.argv[3])
        bad_file_error = None
    except ValueError as error:
        bad_file_error = str(error)
    json.dump({"kinds": kinds, "logits": logits, "single": single, "batched": batched,
               "transparent_probs": transparent_probs, "transparent_pipeline": transparent_pipeline,
               "id2label": {str(k): v for k, v in model.config.id2label.items()}, "bad_file_error": bad_file_error},
              open(out_path, "w"))
    """
)


def run_fresh(folder, tmp_path, python=sys.executable):
    """FRESH_PROCESS_SCRIPT on `folder`, run by `python` (the floor-versions test gives another venv's)."""
    script, out_path, bad_file = tmp_path / "fresh.py", tmp_path / "out.json", tmp_path / "notes.jpg"
    script.write_text(FRESH_PROCESS_SCRIPT)
    bad_file.write_text("not an image")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    result = subprocess.run(
        [str(python), str(script), str(folder), str(out_path), str(bad_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out_path.read_text())


def test_folder_contents(tiny_folder):
    files = set(os.listdir(tiny_folder))
    expected = {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "configuration_emovlm_kd.py",
        "modeling_emovlm_kd.py",
        "image_processing_emovlm_kd.py",
        "processing_emovlm_kd.py",
        "image_decoding_emovlm_kd.py",
        "pipeline_emovlm_kd.py",
        "vlm_adapters_emovlm_kd.py",
        "tokenizer.json",
    }
    assert expected <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_emovlm_kd.EmoVLMKDConfig",
        "AutoModel": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
        "AutoModelForImageClassification": "modeling_emovlm_kd.EmoVLMKDForImageClassification",
    }
    assert config["custom_pipelines"]["image-classification"]["impl"] == (
        "pipeline_emovlm_kd.EmoVLMKDImageClassificationPipeline"
    )
    assert config["model_type"] == "emovlm_kd" and config["vlm_config"]["model_type"] == "qwen2_vl"
    processor = json.loads((tiny_folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_emovlm_kd.EmoVLMKDProcessor"}
    assert processor["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_emovlm_kd.EmoVLMKDImageProcessor"
    )
    with safe_open(tiny_folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert any(k.startswith(("vlm.visual.", "vlm.model.visual.")) for k in keys) and any(
        k.startswith("head.") for k in keys
    )
    assert any(k.startswith("gate.") for k in keys)


@pytest.mark.slow
def test_fresh_process_reproduces_logits_and_pipeline(tiny, tiny_folder, tmp_path):
    check_fresh_result(tiny, run_fresh(tiny_folder, tmp_path), tmp_path)


def check_fresh_result(tiny, result: dict, tmp_path):
    """The fresh process's classes, logits and pipeline outputs are those of the in-process model `tiny`."""
    model, image_processor, _ = tiny
    with torch.no_grad():
        expected = model(**image_processor(make_images())).logits

    kinds = result["kinds"]
    assert kinds["model"] == kinds["auto_model"] == "EmoVLMKDForImageClassification"
    assert kinds["model_module"].startswith("transformers_modules.")
    assert kinds["config"] == "EmoVLMKDConfig"
    assert kinds["image_processor"] == "EmoVLMKDImageProcessor"
    assert kinds["processor"] == "EmoVLMKDProcessor"
    assert kinds["pipeline"] == "EmoVLMKDImageClassificationPipeline"
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-6, rtol=1e-5)

    labels = set(model.config.labels)
    for prediction in [result["single"]] + result["batched"]:
        assert {entry["label"] for entry in prediction} == labels
        assert abs(sum(entry["score"] for entry in prediction) - 1) < 1e-5
    assert len(result["batched"]) == 8
    expected_probs = expected.softmax(-1)[0]
    single = {entry["label"]: entry["score"] for entry in result["single"]}
    for index, label in model.config.id2label.items():
        assert abs(single[label] - expected_probs[index].item()) < 1e-5
    transparent = {entry["label"]: entry["score"] for entry in result["transparent_pipeline"]}
    for index, probability in enumerate(result["transparent_probs"]):
        assert abs(transparent[result["id2label"][str(index)]] - probability) < 1e-6
    assert result["bad_file_error"] is not None and str(tmp_path / "notes.jpg") in result["bad_file_error"]
    # batched pipeline calls agree with unbatched ones
    batched_first = {entry["label"]: entry["score"] for entry in result["batched"][0]}
    for label in labels:
        assert abs(batched_first[label] - single[label]) < 1e-5
