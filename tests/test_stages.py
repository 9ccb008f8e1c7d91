"""Stages 2-6 end to end on the tiny models and a generated dataset with a learnable colour signal (offline, CPU)."""

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.artifacts import assemble_model, cached_vlm_scores, load_gate
from emovlm_kd.run_dir import DataError, ensure_class_names, read_complete
from emovlm_kd.stages import distill, evaluate, export, gate, run_all, teacher
from emovlm_kd.teachers import create_teacher
from emovlm_kd.testing import add_bad_images, make_imagefolder, tiny_run_all_argv
from modeling_emovlm_kd import GATES

CLASSES = ["negative", "neutral", "positive"]
REPO_FILES = (
    "model.safetensors",
    "config.json",
    "modeling_emovlm_kd.py",
    "configuration_emovlm_kd.py",
    "image_processing_emovlm_kd.py",
    "image_decoding_emovlm_kd.py",
    "processing_emovlm_kd.py",
    "processor_config.json",
    "vlm_adapters_emovlm_kd.py",
    "tokenizer.json",
    "README.md",
    "handler.py",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """14 train + 6 test images per class, plus three unreadable files in train/neutral."""
    root = make_imagefolder(tmp_path_factory.mktemp("data") / "colours", CLASSES, {"train": 14, "test": 6})
    add_bad_images(root / "train" / "neutral")
    return root


@pytest.fixture(scope="module")
def pipeline(dataset, tmp_path_factory):
    """Stages 2-6 through the all-stages command; returns (run_dir, its summary)."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_all.run(*run_all.plan(tiny_run_all_argv(dataset, run_dir)))


def copy_run(run_dir, destination, *leave_out):
    """A copy of the fixture's run (stages then change the copy only), without the final repo and `leave_out`."""
    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("model", *leave_out))
    return destination


def stage_args(module, dataset, run_dir, *extra):
    """A stage's parsed `(run_args, args)` with the tiny settings of the `quickstart` recipe."""
    argv = ["--config", "quickstart", "--data-dir", str(dataset), "--run-dir", str(run_dir), *extra]
    return parse_stage_args(module, argv)


def test_every_stage_writes_its_outputs(pipeline):
    run_dir, summary = pipeline
    for stage in ("teacher", "distill", "gate", "evaluate", "export"):
        assert "skipped" not in summary[stage] and read_complete(run_dir, stage)["fingerprint"]
    assert json.loads((run_dir / "labels.json").read_text())["class_names"] == CLASSES
    assert {p.name for p in (run_dir / "teacher").iterdir()} >= {"model.safetensors", "config.json"}
    assert json.loads((run_dir / "teacher" / "config.json").read_text())["label_names"] == CLASSES
    # one VLM and one teacher cache file per split; the training checkpoints are gone once stages complete
    cached = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (run_dir / "cache").iterdir())
    assert cached == ["teacher-test", "teacher-train", "teacher-val", "vlm-test", "vlm-train", "vlm-val"]
    assert not (run_dir / "checkpoints" / "teacher").exists()
    assert (run_dir / "head" / "head.safetensors").exists() and (run_dir / "gate" / "gate.safetensors").exists()
    for split in ("val", "test"):
        assert (run_dir / "eval" / f"confusion_{split}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["splits"]["test"]) >= {"teacher", "vlm", "head", "fused", "majority_baseline_accuracy"}
    per_class = results["splits"]["test"]["fused"]["per_class"]
    assert list(per_class) == CLASSES and sum(v["support"] for v in per_class.values()) == 18


def test_learning_check_head_and_fused_beat_majority(pipeline):
    run_dir, _ = pipeline
    test = json.loads((run_dir / "eval" / "results.json").read_text())["splits"]["test"]
    baseline = test["majority_baseline_accuracy"]
    assert baseline == pytest.approx(1 / 3)
    assert test["teacher"]["accuracy"] > baseline + 0.2
    assert test["head"]["accuracy"] > baseline + 0.2
    assert test["fused"]["accuracy"] > baseline + 0.2
    assert test["fused"]["macro_f1"] > 0.5


def test_unreadable_images_are_reported_and_skipped(pipeline, dataset):
    run_dir, summary = pipeline
    bad = {str(dataset / "train" / "neutral" / name) for name in ("empty.jpg", "truncated.jpg", "notes.jpg")}
    for stage in ("teacher", "distill"):
        reported = dict(read_complete(run_dir, stage)["unreadable_images"])
        assert set(reported) == bad and all(reported.values())
    assert {path for path, _ in summary["teacher"]["unreadable_images"]} == bad
    embeds = load_file(next((run_dir / "cache").glob("vlm-train-*")))["image_embeds"]
    val = load_file(next((run_dir / "cache").glob("vlm-val-*")))["image_embeds"]
    assert len(embeds) + len(val) == 42  # the 42 readable training images, none of the bad ones


def test_exported_repo_loads_with_auto_classes_and_pipeline(pipeline, dataset):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers import pipeline as hf_pipeline

    run_dir, _ = pipeline
    repo = run_dir / "model"
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_emovlm_kd.EmoVLMKDForImageClassification"
    assert [config["id2label"][str(i)] for i in range(3)] == CLASSES
    for name in REPO_FILES:
        assert (repo / name).is_file(), name
    assert (repo / "space" / "app.py").is_file()
    # nothing of the training machine or the run: no path, no marker, the modes a plain copy gives
    assert not list(repo.rglob("*COMPLETE*")) and (run_dir / "model.COMPLETE.json").exists()
    umask = os.umask(0)
    os.umask(umask)
    for path in (p for p in repo.rglob("*") if p.is_file()):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
        if path.suffix in (".json", ".md", ".py", ".txt", ".jinja"):
            text = path.read_text()
            assert str(run_dir) not in text and str(dataset) not in text and "/tmp/" not in text, path

    card = (repo / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "image-classification" and metadata["library_name"] == "transformers"
    assert metadata["datasets"] == ["colours"] and set(metadata["metrics"]) == {"accuracy", "f1"}
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    fused_accuracy = results["splits"]["test"]["fused"]["accuracy"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == round(fused_accuracy, 4)
    assert "trust_remote_code=True" in card and f"{fused_accuracy:.4f}" in card

    model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    images = sorted(str(p) for p in (dataset / "test").rglob("*.png"))
    with torch.no_grad():
        logits = model(**processor(images)).logits
    # the exported model is the evaluated one: its predictions equal stage 5's cached pipeline
    assembled, assembled_processor, _ = assemble_model(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(logits, assembled(**assembled_processor(images)).logits, rtol=1e-4, atol=1e-4)
    predictions = hf_pipeline("image-classification", model=model, image_processor=processor)(images[:2])
    assert predictions[0][0]["label"] in CLASSES


def test_widget_examples_hold_the_exported_models_outputs(pipeline, dataset, tmp_path):
    from transformers import pipeline as hf_pipeline

    run_dir, summary = pipeline
    repo = run_dir / "model"
    card = (repo / "README.md").read_text()
    widget = yaml.safe_load(card.split("---")[1])["widget"]
    assert [entry["example_title"] for entry in widget] == CLASSES  # one test image per class
    assert summary["export"]["widget_images"] == [entry["src"] for entry in widget]
    assert "computed by this model's image-classification pipeline when the repo was exported" in card
    classifier = hf_pipeline("image-classification", model=str(repo), trust_remote_code=True)
    for entry in widget:
        image = repo / entry["src"]
        assert image.read_bytes() == (dataset / "test" / entry["example_title"] / image.name).read_bytes()
        expected = classifier(str(image), top_k=len(CLASSES))
        assert [output["label"] for output in entry["output"]] == [output["label"] for output in expected]
        assert [output["score"] for output in entry["output"]] == pytest.approx(
            [output["score"] for output in expected], abs=1e-4
        )

    run_copy = copy_run(run_dir, tmp_path / "run")
    chosen = dataset / "test" / "positive" / "positive_001.png"
    export.run(*stage_args(export, dataset, run_copy, "--widget-image", str(chosen)))
    widget = yaml.safe_load((run_copy / "model" / "README.md").read_text().split("---")[1])["widget"]
    titled = [(entry["src"], entry["example_title"]) for entry in widget]
    assert titled == [("widget/positive_001.png", "positive_001")]
    export.run(*stage_args(export, dataset, run_copy, "--widget-images", "0"))
    assert "widget" not in yaml.safe_load((run_copy / "model" / "README.md").read_text().split("---")[1])
    assert not (run_copy / "model" / "widget").exists()


@pytest.mark.slow
def test_calibration_is_reported_and_reaches_the_exported_model(pipeline, dataset, tmp_path):
    """Stage 5 reports calibration per branch and split; with the fixture's few val images scaling is skipped (with
    the reason); allowed to fit on them, the temperature goes into the exported config and the model's logits."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

    run_dir, _ = pipeline
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "fewer than 20" in results["calibration"]["skipped"] and results["calibration"]["temperature"] == 1.0
    for split in ("val", "test"):
        for branch in ("teacher", "vlm", "head", "fused"):
            calibration = results["splits"][split][branch]["calibration"]
            assert set(calibration["before"]) >= {"ece", "mce", "nll", "brier"} and calibration["after"]
            assert (run_dir / "eval" / f"reliability_{split}_{branch}.png").read_bytes()[:4] == b"\x89PNG"
        coverage = results["splits"][split]["risk_coverage"]
        assert [row["coverage"] for row in coverage] == [1.0, 0.9, 0.8, 0.5]
        assert coverage[0]["accuracy"] == pytest.approx(results["splits"][split]["fused"]["accuracy"])
    assert json.loads((run_dir / "model" / "config.json").read_text())["calibration_temperature"] == 1.0
    card = (run_dir / "model" / "README.md").read_text()
    assert "Temperature scaling was skipped (the validation split has" in card
    assert "](reliability_test_fused.png)" in card and (run_dir / "model" / "reliability_test_fused.png").exists()
    index_results = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    assert {"ece", "nll", "brier"} <= {metric["type"] for result in index_results for metric in result["metrics"]}

    run_copy = copy_run(run_dir, tmp_path / "run")
    evaluate.run(*stage_args(evaluate, dataset, run_copy, "--calibration-min-images", "3"))
    results = json.loads((run_copy / "eval" / "results.json").read_text())
    temperature = results["calibration"]["temperature"]
    assert results["calibration"]["fitted_on"] == "val" and temperature != 1.0
    fused = results["splits"]["val"]["fused"]["calibration"]
    assert fused["temperature"] == temperature and fused["after"]["nll"] <= fused["before"]["nll"]
    export.run(*stage_args(export, dataset, run_copy, "--verify-images", "2"))  # the check divides by T as well
    repo = run_copy / "model"
    assert json.loads((repo / "config.json").read_text())["calibration_temperature"] == temperature
    assert f"`calibration_temperature` = {temperature:.4f}" in (repo / "README.md").read_text()

    model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    images = sorted(str(p) for p in (dataset / "test").rglob("*.png"))[:2]
    with torch.no_grad():
        outputs = model(**processor(images))
    gate_output = model.gate(outputs.head_logits, outputs.vlm_scores)[0]
    torch.testing.assert_close(outputs.logits, gate_output / temperature)
    classifier = EmoVLMKDImageClassificationPipeline(model=model, image_processor=processor)
    for image, probabilities in zip(images, outputs.logits.softmax(-1)):
        scores = {entry["label"]: entry["score"] for entry in classifier(image, top_k=len(CLASSES))}
        assert [scores[label] for label in CLASSES] == pytest.approx(probabilities.tolist(), abs=1e-5)


def test_push_to_hub_uses_hfapi(pipeline, dataset, tmp_path):
    run_dir = copy_run(pipeline[0], tmp_path / "run")
    with mock.patch.object(export, "HfApi") as hf_api:
        hf_api.return_value.create_repo.return_value = "https://huggingface.co/me/emovlm-kd-colours"
        args = stage_args(export, dataset, run_dir, "--push-to-hub", "me/emovlm-kd-colours", "--private")
        summary = export.run(*args)
    api = hf_api.return_value
    api.create_repo.assert_called_once_with("me/emovlm-kd-colours", private=True, exist_ok=True, repo_type="model")
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/emovlm-kd-colours" and Path(upload["folder_path"]) == run_dir / "model"
    assert summary["hub_url"].endswith("me/emovlm-kd-colours")
    assert "me/emovlm-kd-colours" in (run_dir / "model" / "README.md").read_text()


@pytest.mark.slow
def test_cache_is_reused_and_invalidated(pipeline, dataset, tmp_path):
    run_dir = copy_run(pipeline[0], tmp_path / "run")
    before = {p.name for p in (run_dir / "cache").iterdir()}
    # another head on the same features: no model is loaded
    with mock.patch("emovlm_kd.vlm.build_emovlm_kd", side_effect=AssertionError("VLM loaded")):
        with mock.patch("emovlm_kd.teachers.load_teacher", side_effect=AssertionError("teacher loaded")):
            distill.run(*stage_args(distill, dataset, run_dir, "--head-dropout", "0.2"))
    assert {p.name for p in (run_dir / "cache").iterdir()} == before

    # a changed image: that split's features are recomputed, the others reused
    data_copy = tmp_path / "colours"
    shutil.copytree(dataset, data_copy)
    changed = data_copy / "test" / "positive" / "positive_000.jpg"
    shutil.copy(data_copy / "test" / "negative" / "negative_000.jpg", changed)
    run_copy = copy_run(run_dir, tmp_path / "run-copy")
    evaluate.run(*stage_args(evaluate, data_copy, run_copy))
    new = {p.name for p in (run_copy / "cache").iterdir()} - before
    assert sorted(name.split("-")[0] + "-" + name.split("-")[1] for name in new) == ["teacher-test", "vlm-test"]

    # a different prompt: new VLM features, same teacher logits
    with mock.patch("emovlm_kd.teachers.load_teacher", side_effect=AssertionError("teacher loaded")):
        distill.run(*stage_args(distill, dataset, run_dir, "--classification-prompt", "Emotion? <labels>."))
    new = {p.name for p in (run_dir / "cache").iterdir()} - before
    assert sorted(name.split("-")[0] for name in new) == ["vlm", "vlm", "vlm"]


def test_cached_vlm_gate_input_matches_the_model():
    """What the gate trains on from the cache is what the model's forward gives its gate, for both branch inputs."""
    from emovlm_kd.testing import make_images
    from emovlm_kd.tiny import build_tiny_model

    log_likelihoods = torch.tensor([[-3.0, -1.0, -2.0], [-0.5, -4.0, -0.7]])
    cached = {"vlm_log_likelihoods": log_likelihoods}
    torch.testing.assert_close(cached_vlm_scores(cached, "score", "probs"), log_likelihoods.softmax(-1))
    assert cached_vlm_scores(cached, "score", "one_hot").tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    one_hot = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # generated answers; none parsed in row 2
    assert torch.equal(cached_vlm_scores({"vlm_generated": one_hot}, "generate", "probs"), one_hot)
    for branch_input in ("probs", "one_hot"):
        model, image_processor, _ = build_tiny_model(CLASSES, vlm_branch_input=branch_input)
        with torch.no_grad():
            outputs = model(**image_processor(make_images()))
        got = cached_vlm_scores({"vlm_log_likelihoods": outputs.vlm_log_likelihoods}, "score", branch_input)
        torch.testing.assert_close(got, outputs.vlm_scores)


@pytest.mark.parametrize("gate_type", ["bilinear", "moe", "dynamic_weighting", "cross_gating"])
def test_every_gate_variant_trains(pipeline, dataset, tmp_path, gate_type):
    run_copy = copy_run(pipeline[0], tmp_path / "run")
    summary = gate.run(*stage_args(gate, dataset, run_copy, "--gate-type", gate_type))
    trained, config = load_gate(run_copy)
    assert config["gate_type"] == gate_type and type(trained) is GATES[gate_type]
    assert summary["val_metrics"]["accuracy"] > 0.5


def test_class_mismatch_is_an_error_before_heavy_work(pipeline, dataset, tmp_path):
    run_dir, _ = pipeline
    reordered = tmp_path / "run"
    ensure_class_names(reordered, ["positive", "neutral", "negative"])  # another stage fixed another order
    with mock.patch.object(teacher, "create_teacher", side_effect=AssertionError("heavy work started")):
        with pytest.raises(DataError, match="differ from those fixed for this run"):
            teacher.run(*stage_args(teacher, dataset, reordered))
    other = make_imagefolder(tmp_path / "other", ["calm", "joy", "rage"], {"train": 10, "test": 2})
    run_copy = copy_run(run_dir, tmp_path / "run2", "cache")
    with mock.patch("emovlm_kd.vlm.build_emovlm_kd", side_effect=AssertionError("heavy work started")):
        for module in (teacher, gate, evaluate):
            with pytest.raises(DataError, match="differ"):
                module.run(*stage_args(module, other, run_copy))


def test_missing_upstream_stage_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(DataError, match="needs stage 'teacher' first"):
        distill.run(*stage_args(distill, dataset, tmp_path / "fresh"))


@pytest.mark.parametrize("module", [teacher, distill], ids=["teacher", "distill"])
def test_resume_after_interruption_equals_uninterrupted(pipeline, dataset, tmp_path, module):
    run_dir, _ = pipeline
    output, weights = {"teacher": ("teacher", "model.safetensors"), "distill": ("head", "head.safetensors")}[
        module.STAGE
    ]
    trained = {}
    for name, runs in {"uninterrupted": [[]], "resumed": [["--stop-after-epoch", "1"], ["--resume"]]}.items():
        run = copy_run(run_dir, tmp_path / name, output)
        summaries = [module.run(*stage_args(module, dataset, run, "--epochs", "2", *extra)) for extra in runs]
        assert [s.get("stopped", False) for s in summaries] == [True] * (len(runs) - 1) + [False]
        assert read_complete(run, module.STAGE) is not None
        trained[name] = load_file(run / output / weights)
    assert trained["uninterrupted"].keys() == trained["resumed"].keys()
    for key, value in trained["uninterrupted"].items():
        torch.testing.assert_close(trained["resumed"][key], value, rtol=0, atol=0, msg=key)


def test_stopped_stage_leaves_a_checkpoint_and_no_complete_marker(dataset, tmp_path):
    run = tmp_path / "run"
    summary = teacher.run(*stage_args(teacher, dataset, run, "--epochs", "2", "--stop-after-epoch", "1"))
    assert summary["stopped"] and summary["epochs_done"] == 1
    assert read_complete(run, "teacher") is None
    assert (run / "checkpoints" / "teacher" / "epoch_1" / "model.safetensors").exists()


@pytest.mark.slow
def test_stages_use_the_runs_instruction_tuned_vlm(pipeline, dataset, tmp_path):
    """Once stage 1 completed, stage 3 onwards use <run_dir>/vlm (and its fingerprint) instead of --vlm."""
    from emovlm_kd.run_dir import write_complete
    from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor

    run = copy_run(pipeline[0], tmp_path / "run")
    plan = run_all.plan(tiny_run_all_argv(dataset, run, stages=("distill", "gate", "evaluate", "export")))
    before = distill.fingerprint(*stage_args(distill, dataset, run))
    processor = build_tiny_vlm_processor()
    build_tiny_vlm(processor, seed=5).save_pretrained(run / "vlm")
    processor.save_pretrained(run / "vlm")
    write_complete(run, "instruction_tuning", "tuned-1", summary={"vlm": "Qwen/Qwen2-VL-2B-Instruct"})
    tuned = distill.fingerprint(*stage_args(distill, dataset, run))
    assert tuned != before

    summary = run_all.run(*plan)
    assert summary["distill"]["vlm"] == str(run / "vlm")
    assert len(list((run / "cache").glob("vlm-*"))) == 6  # the tiny VLM's features and the tuned one's
    exported, tuned_vlm = load_file(run / "model" / "model.safetensors"), load_file(run / "vlm" / "model.safetensors")
    lm_head = [key for key in exported if key.endswith("lm_head.weight")]
    assert len(lm_head) == 1 and torch.equal(exported[lm_head[0]], tuned_vlm["lm_head.weight"])
    card = yaml.safe_load((run / "model" / "README.md").read_text().split("---")[1])
    assert card["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"

    write_complete(run, "instruction_tuning", "tuned-2")  # stage 1 ran again: stage 3 is stale
    assert distill.fingerprint(*stage_args(distill, dataset, run)) != tuned


def test_the_card_describes_the_decoding_that_generate_mode_runs():
    """The card's VLM branch says what generation runs with (the run's settings over the VLM's own generation
    config): the paper recipe's "sampling" over Qwen2-VL's `top_k: 1` is effectively greedy; true sampling lists the
    temperature, top-p and top-k that apply."""
    from emovlm_kd.model_card import vlm_branch_description
    from emovlm_kd.tiny import build_tiny_model

    paper = {"generate_do_sample": True, "generate_temperature": 0.8, "generate_top_p": 1.0}
    model, _, _ = build_tiny_model(vlm_branch_mode="generate", **paper)
    model_config = {"vlm_branch_mode": "generate", "max_new_tokens": 256}

    def described(resampled=False, **settings):
        for name, value in settings.items():
            setattr(model.config, name, value)
        return vlm_branch_description(model_config, {}, resampled, model.generate_mode_config())

    model.vlm.generation_config.update(top_k=1, repetition_penalty=1.05)  # Qwen2-VL's generation_config.json
    assert described(resampled=True) == (
        "generated answer (effectively greedy: sampling with top-k 1 keeps only the best token; repetition penalty "
        "1.05, up to 256 tokens) parsed into a one-hot vector for the gate (redrawn every epoch of gate training: "
        "the same answer each time)"
    )
    assert "sampled (temperature 0.8, top-p 1.0, repetition penalty 1.05)," in described(generate_top_k=0)
    assert "sampled (temperature 0.5, top-p 0.9, top-k 20, repetition penalty 1.05)," in described(
        generate_temperature=0.5, generate_top_p=0.9, generate_top_k=20
    )
    assert described(True).endswith("(a fresh sample every epoch of gate training)")
    assert "(greedy (repetition penalty 1.05), up to" in described(generate_do_sample=False)
    model.vlm.generation_config.update(repetition_penalty=1.0)
    assert "(greedy, up to" in described()


def test_teacher_errors_are_clear():
    with pytest.raises(RuntimeError, match="pass --no-pretrained"):
        create_teacher("vit_tiny_patch16_224", 3, pretrained=True)  # offline: the weights cannot come
    with pytest.raises(ValueError, match="not a timm model name"):
        create_teacher("no_such_model", 3, pretrained=False)


def test_every_stage_defaults_to_the_papers_settings():
    defaults = {module.STAGE: module.ARGUMENTS() for module in (teacher, distill, gate)}
    paper = {
        "teacher": {
            "teacher": "vit_base_patch16_384.orig_in21k_ft_in1k",  # google/vit-base-patch16-384's weights
            "learning_rate": 3e-5,
            "weight_decay": 1e-5,
            "batch_size": 10,
            "epochs": 10,
            "pretrained": True,
        },
        "distill": {
            "kd_alpha": 0.5,
            "kd_temperature": 2.0,
            "learning_rate": 1e-5,
            "weight_decay": 1e-4,
            "epochs": 5,
            "batch_size": 1,  # one image per update, as published
            "head_hidden_sizes": [1024],
            "head_dropout": 0.1,
            "vlm": "Qwen/Qwen2-VL-7B-Instruct",
        },
        "gate": {
            "gate_type": "concat_linear",
            "learning_rate": 1e-4,
            "weight_decay": 1e-4,
            "epochs": 10,
            "batch_size": 1,
            "resample_vlm_answers": False,
        },
    }
    for stage, values in paper.items():
        assert {key: getattr(defaults[stage], key) for key in values} == values, stage


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", ["instruction_data", "instruction_tuning", "teacher", "distill", "gate", "evaluate", "export", "run_all"]
)
def test_every_train_script_runs_its_stage_cli(stage):
    """`python train/<stage>.py --help` works from a source checkout and lists the stage's settings."""
    import dataclasses
    import importlib
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "train" / f"{stage}.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    module = importlib.import_module(f"emovlm_kd.stages.{stage}")
    arguments = module.RunAllArguments if stage == "run_all" else module.ARGUMENTS
    for field in dataclasses.fields(arguments):
        assert f"--{field.name.replace('_', '-')}" in result.stdout, (stage, field.name)
    assert "--run-dir" in result.stdout and "--data-dir" in result.stdout
