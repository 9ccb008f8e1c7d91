"""Stage 1 (LoRA instruction tuning) on the tiny VLM and small generated datasets, offline."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.data import load_imagefolder, open_image_rgb
from emovlm_kd.instruction_tasks import IGNORE_INDEX, InstructionEncoder, build_examples
from emovlm_kd.run_dir import complete_marker, is_complete, read_complete
from emovlm_kd.stages import instruction_tuning
from emovlm_kd.stages.instruction_tuning import add_lora, export_merged
from emovlm_kd.testing import make_imagefolder
from emovlm_kd.vlm import load_vlm_and_processor

CLASSES = ["negative", "neutral", "positive"]
SEED = 42
TUNED_RUN = {"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "seed": SEED}


def stage_args(data_dir, run_dir, vlm="tiny", **overrides):
    argv = [
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--vlm",
        str(vlm),
        "--report-to",
        "none",
        "--num-workers",
        "0",
    ]
    for name, value in overrides.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return parse_stage_args(instruction_tuning, argv)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruction-tuning") / "data"
    return make_imagefolder(root, CLASSES, per_class={"train": 4, "val": 2}, splits=("train", "val"))


@pytest.fixture(scope="module")
def tuned_run(dataset, tmp_path_factory):
    """Two epochs over all three tasks; instruction data for all but one image, plus one record with a stale label."""
    run_dir = tmp_path_factory.mktemp("tuned-run")
    images = sorted((dataset / "train").rglob("*.*"))
    with (run_dir / "instruction_data.jsonl").open("w") as file:
        for index, path in enumerate(images[1:]):
            label = path.parent.name if index else "positive" if path.parent.name != "positive" else "negative"
            record = {
                "image": path.relative_to(dataset).as_posix(),
                "label": label,
                "status": "done",
                "observation": "The image shows a dark sky, bright colours and a quiet lake.",
                "reasoning": "The storm and the dark sky make the scene feel tense.",
            }
            file.write(json.dumps(record) + "\n")
        file.write(
            json.dumps(
                {
                    "image": images[0].relative_to(dataset).as_posix(),
                    "label": images[0].parent.name,
                    "status": "failed",
                    "reason": "HTTP 503",
                }
            )
            + "\n"
        )
    return run_dir, instruction_tuning.run(*stage_args(dataset, run_dir, **TUNED_RUN))


def test_answer_only_labels_and_exact_classification_prompt(dataset):
    """The classification example is token for token what EmoVLM-KD scores; labels cover the answer alone."""
    from emovlm_kd.tiny import build_tiny_model

    model, image_processor, processor = build_tiny_model(CLASSES)
    encoder = InstructionEncoder(processor, CLASSES, max_answer_tokens=5)
    paths = sorted(str(path) for path in (dataset / "val").rglob("*.*"))[:3]
    items = [encoder.encode(open_image_rgb(path), "classification", label) for path in paths for label in range(3)]

    scored_inputs = image_processor(paths)
    prompt = scored_inputs["input_ids"][0][scored_inputs["attention_mask"][0].bool()]
    first = items[0]
    answer_positions = first["labels"] != IGNORE_INDEX
    assert torch.equal(first["input_ids"][~answer_positions], prompt)
    assert torch.equal(first["pixel_values"], scored_inputs["pixel_values"][: len(first["pixel_values"])])
    for label in range(3):
        item = items[label]
        mask = item["labels"] != IGNORE_INDEX
        assert item["labels"][mask].tolist() == model.config.answer_token_ids[label]
        assert mask.tolist() == [False] * len(prompt) + [True] * len(model.config.answer_token_ids[label])
        assert torch.equal(item["input_ids"][mask], item["labels"][mask])
    assert first["mm_token_type_ids"].sum() == (prompt == processor.image_token_id).sum() > 0

    # a free-text answer: cut to max_answer_tokens, then the end-of-turn token
    observation = encoder.encode(open_image_rgb(paths[0]), "observation", "The image shows a dark sky and a lake.")
    answer = observation["labels"][observation["labels"] != IGNORE_INDEX].tolist()
    assert len(answer) == 6 and answer[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    # right padding: pad token, attention 0, label -100; and teacher-forced likelihoods equal the model's scores
    batch = encoder.collate(items)
    lengths = [len(item["input_ids"]) for item in items]
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == encoder.pad_token_id).all()
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    with torch.no_grad():
        log_probs = model.vlm(**inputs).logits[:, :-1].float().log_softmax(-1)
        scores = model(**scored_inputs).vlm_log_likelihoods
    targets = batch["labels"][:, 1:]
    token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    teacher_forced = (token_log_probs * (targets != IGNORE_INDEX)).sum(-1).view(3, 3)
    torch.testing.assert_close(teacher_forced, scores, atol=1e-4, rtol=0)


def test_lora_targets_language_attention_only():
    vlm, _ = load_vlm_and_processor("tiny")
    model = add_lora(vlm, instruction_tuning.ARGUMENTS())
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    projections = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("visual" in name for name, _ in model.named_modules() if "lora_" in name)


def test_merged_export_equals_the_adapted_model(tmp_path):
    """`export_merged` output loads with AutoModelForImageTextToText and computes what base + adapter computes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm, processor = load_vlm_and_processor("tiny")
    model = add_lora(vlm, instruction_tuning.ARGUMENTS())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    model.eval()
    encoder = InstructionEncoder(processor, CLASSES)
    image = Image.new("RGB", (90, 70), (200, 30, 90))
    batch = encoder.collate([encoder.encode(image, "classification", 2), encoder.encode(image, "inference", "calm")])
    batch.pop("labels")
    with torch.no_grad():
        adapted = model(**batch).logits
    export_merged(model, processor, tmp_path / "vlm")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").eval()
    assert AutoProcessor.from_pretrained(tmp_path / "vlm").tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    base, _ = load_vlm_and_processor("tiny")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
        assert (merged(**batch).logits - base(**batch).logits).abs().max() > 1e-2


def test_three_task_tuning_and_export(tuned_run, dataset):
    from transformers import AutoModelForImageTextToText

    run_dir, summary = tuned_run
    assert summary["tasks"] == ["observation", "inference", "classification"]
    assert summary["examples"] == {"observation": 10, "inference": 10, "classification": 12}  # 1 failed, 1 stale
    assert summary["epoch_losses"][-1] < summary["epoch_losses"][0]
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 10
    assert complete_marker(run_dir, "instruction_tuning").exists()
    assert not (run_dir / "checkpoints" / "instruction_tuning").exists()  # removed once the stage is complete
    assert json.loads((run_dir / "labels.json").read_text())["class_names"] == CLASSES

    # only the language model's q/k/v/o projections changed: vision tower, embeddings, MLPs and LM head are the base's
    merged = AutoModelForImageTextToText.from_pretrained(run_dir / "vlm")
    base, _ = load_vlm_and_processor("tiny", seed=SEED)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert base_state.keys() == merged_state.keys()
    changed = {name for name in base_state if not torch.equal(base_state[name], merged_state[name])}
    attention = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    assert changed == {name for name in base_state if "language_model" in name and name.endswith(attention)}

    # the all-stages command skips the stage for the same inputs: the recorded fingerprint is the one it computes
    assert is_complete(
        run_dir, "instruction_tuning", instruction_tuning.fingerprint(*stage_args(dataset, run_dir, **TUNED_RUN))
    )
    assert read_complete(run_dir, "instruction_tuning")["summary"]["epoch_losses"] == summary["epoch_losses"]


def test_resume_equals_uninterrupted(tuned_run, dataset, tmp_path):
    """Stopped after epoch 1, then resumed: the same merged VLM as the uninterrupted run."""
    from safetensors.torch import load_file

    run_dir, summary = tuned_run
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(run_dir / "instruction_data.jsonl", stopped)
    first = instruction_tuning.run(*stage_args(dataset, stopped, stop_after_epoch=1, **TUNED_RUN))
    assert first["stopped"] and first["epochs_done"] == 1
    assert not (stopped / "vlm").exists() and (stopped / "checkpoints" / "instruction_tuning" / "epoch_1").is_dir()

    resumed = instruction_tuning.run(*stage_args(dataset, stopped, resume=True, **TUNED_RUN))
    assert resumed["resumed_after_epochs"] == 1 and resumed["global_steps"] == summary["global_steps"]
    assert resumed["epoch_losses"] == pytest.approx(summary["epoch_losses"], abs=1e-6)
    expected, actual = (
        load_file(run_dir / "vlm" / "model.safetensors"),
        load_file(stopped / "vlm" / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_learning_check_classification_only(tmp_path, caplog):
    """Classification-only tuning of the tiny VLM learns the colour signal: the EmoVLM-KD VLM branch (answer
    likelihoods) then beats the majority class on held-out images.

    Two facts about the random tiny VLM shape this check. Its LM head is N(0, 0.02) over ~600 tokens with hidden
    size 64, so no token can get more than ~0.6% probability: every answer token costs >= ~5 nats, and a label of two
    tokens can never out-score a label of one. The classes are therefore one token each in the tiny vocabulary (a
    pretrained VLM has no such floor). And 64 px images give 4 image tokens among ~45, which dilutes the signal in
    attention so much that learning takes ~3x longer than with 112 px images (16 image tokens).
    """
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    classes = ["amusement", "contentment", "sadness"]
    data_dir = make_imagefolder(
        tmp_path / "data",
        classes,
        per_class={"train": 16, "val": 10},
        splits=("train", "val"),
        size=(112, 112),
        seed=1,
    )
    run_dir = tmp_path / "run"
    args = stage_args(data_dir, run_dir, epochs=8, batch_size=4, learning_rate=1e-2, seed=1)
    with caplog.at_level(logging.WARNING):
        summary = instruction_tuning.run(*args)
    assert summary["tasks"] == ["classification"] and summary["instruction_data"].startswith("classification only")
    assert any("classification only" in record.message for record in caplog.records)

    data = load_imagefolder(data_dir)
    val_labels = torch.tensor(data.splits["val"]["label"])
    majority = val_labels.bincount().max().item() / len(val_labels)
    accuracies = {}
    for name, vlm_name in (("base", "tiny"), ("tuned", str(run_dir / "vlm"))):
        vlm, processor = load_vlm_and_processor(vlm_name, seed=1)
        model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, classes).eval()
        image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
        with torch.no_grad():
            out = model(**image_processor(list(data.splits["val"]["image_path"])))
        accuracies[name] = (out.vlm_log_likelihoods.argmax(-1) == val_labels).float().mean().item()
    print(f"VLM branch accuracy on val: {accuracies}, majority baseline {majority:.3f}")
    assert accuracies["tuned"] > majority + 0.2
    assert accuracies["tuned"] > accuracies["base"]


def test_examples_without_instruction_data():
    examples = build_examples([0, 1], {1: {"observation": "o", "reasoning": "r"}})
    expected = [(0, "classification", 0), (1, "observation", "o"), (1, "inference", "r"), (1, "classification", 1)]
    assert [(e.row, e.task, e.answer) for e in examples] == expected


def test_4bit_needs_a_gpu(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--load-in-4bit needs a CUDA GPU"):
        instruction_tuning.run(*stage_args(dataset, tmp_path / "run", load_in_4bit=True))
    assert not (tmp_path / "run").exists()  # refused before any work


def test_train_script_help(monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parent.parent / "train" / "instruction_tuning.py"
    monkeypatch.setattr("sys.argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    usage = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--load-in-4bit" in usage and "--resume" in usage
    assert "--learning-rate LEARNING_RATE AdamW learning rate (default: 0.0001)" in usage
