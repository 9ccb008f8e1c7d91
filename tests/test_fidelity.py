"""The paper's method through the stages (issue 10): dataset presets, one set of VLM inputs for stages 1 and 3, the
whole-sequence loss, the stage-1 warm-up on 1 and 2 processes, the teacher's transforms, the paper recipe, and the
`generate` mode with sampling from stage 1 to the exported model."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from accelerate import PartialState
from PIL import Image
from safetensors.torch import load_file

from configuration_emovlm_kd import EmoVLMKDConfig
from emovlm_kd.arguments import DATASET_PRESETS, RunArguments, VLMInputArguments
from emovlm_kd.cache import vlm_feature_key
from emovlm_kd.instruction_tasks import IGNORE_INDEX, InstructionEncoder
from emovlm_kd.run_dir import DataError, read_class_names, read_complete, write_complete
from emovlm_kd.stages import distill, instruction_tuning, run_all
from emovlm_kd.teachers import DEFAULT_TEACHER, create_teacher, teacher_transforms
from emovlm_kd.sources import source_hash
from emovlm_kd.testing import (
    imagefolder_to_dataset,
    launch_two_processes,
    make_imagefolder,
    make_images,
    save_dataset,
)
from emovlm_kd.tiny import build_tiny_model
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from emovlm_kd.training import load_stage_data, preset_class_names

REPO_ROOT = Path(__file__).resolve().parent.parent
FI_LIST = "['amusement', 'excitement', 'sadness', 'fear', 'contentment', 'anger', 'disgust', 'awe']"
# The class list and the two example answers of the reference's classification prompt (data_utils.py:131-146).
REFERENCE_PROMPT_CLASSES = {
    "fi": (FI_LIST, "anger", "amusement"),
    "emoset": (FI_LIST, "anger", "amusement"),
    "emotion6": ("['anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise']", "anger", "disgust"),
    "flickr": ("['positive', 'negative']", "positive", "negative"),
    "instagram": ("['positive', 'negative']", "positive", "negative"),
    "abstract": (FI_LIST, "anger", "amusement"),  # no prompt of their own in the reference: FI's list
    "artphoto": (FI_LIST, "anger", "amusement"),
}


def config_for(classes, **settings) -> EmoVLMKDConfig:
    return EmoVLMKDConfig(
        id2label=dict(enumerate(classes)), label2id={name: i for i, name in enumerate(classes)}, **settings
    )


@pytest.mark.parametrize("preset", sorted(DATASET_PRESETS))
def test_presets_fix_the_reference_class_order_and_prompt(preset, tmp_path):
    classes = list(DATASET_PRESETS[preset].class_names)
    splits = ("train", "val", "test") if DATASET_PRESETS[preset].val_folder else ("train", "test")
    data_dir = make_imagefolder(tmp_path / "data", sorted(classes), per_class=2, splits=splits, size=(8, 8))
    run_args = RunArguments(run_dir=str(tmp_path / "run"), data_dir=str(data_dir), dataset_preset=preset)
    data = load_stage_data(run_args, PartialState(), "teacher")
    # labels in the reference's order (not the folders' alphabetical one), fixed for the whole run
    assert data.class_names == classes and read_class_names(run_args.run_dir) == classes
    assert data.val_from_train == (not DATASET_PRESETS[preset].val_folder)
    listed, first, second = REFERENCE_PROMPT_CLASSES[preset]
    prompt = config_for(data.class_names).prompt_text("classification")
    assert f"from the following {len(classes)} categories {listed}. Answer" in prompt
    assert f"{{'emotion':'{first}'}} or {{'emotion':'{second}'}}" in prompt


def test_preset_mismatches_are_clear_errors(tmp_path):
    state = PartialState()
    other = make_imagefolder(tmp_path / "other", ["calm", "joy"], per_class=2, splits=("train", "val"), size=(8, 8))
    with pytest.raises(DataError, match=r"--dataset-preset flickr: .*\['calm', 'joy'\]"):
        load_stage_data(
            RunArguments(run_dir=str(tmp_path / "r1"), data_dir=str(other), dataset_preset="flickr"), state, "x"
        )
    no_val = make_imagefolder(tmp_path / "no-val", ["positive", "negative"], per_class=3, size=(8, 8))
    with pytest.raises(
        DataError, match="--dataset-preset instagram: the reference validates on the dataset's own val/"
    ):
        load_stage_data(
            RunArguments(run_dir=str(tmp_path / "r2"), data_dir=str(no_val), dataset_preset="instagram"), state, "x"
        )
    with pytest.raises(ValueError, match="holds out 10% of train"):
        RunArguments(run_dir="r", dataset_preset="emotion6", val_fraction=0.2)
    with pytest.raises(DataError, match="earlier stages were trained on"):
        preset_class_names(RunArguments(run_dir="r", dataset_preset="flickr"), ["negative", "positive"])
    assert run_all.plan(["--run-dir", "R", "--dataset-preset", "fi", "--stages", "teacher"])[1].preset.val_folder



@pytest.mark.parametrize("source", ["folder", "datasets"])
def test_holdout_presets_ignore_a_given_val_split(source, tmp_path, caplog):
    """EmoSet, Emotion6, Abstract and ArtPhoto: the reference validates on a stratified 10 % of train/ with
    `random_state=42` and never reads a val split (data_utils.py:109-122); a preset does the same, says so, and
    holds out the same images whatever --seed is."""
    classes = sorted(DATASET_PRESETS["emotion6"].class_names)
    splits = {"train": 10, "val": 2, "test": 1}
    data_dir = make_imagefolder(tmp_path / "data", classes, splits, splits=tuple(splits), size=(8, 8))
    location = {"data_dir": str(data_dir)}
    if source == "datasets":
        location = {"dataset": str(save_dataset(imagefolder_to_dataset(data_dir), tmp_path / "disk", "disk"))}

    def load(run_dir, **options):
        run_args = RunArguments(run_dir=str(tmp_path / run_dir), dataset_preset="emotion6", **location, **options)
        data = load_stage_data(run_args, PartialState(), "teacher")
        return data, sorted(data.key("val", i) for i in range(len(data.splits["val"]))), source_hash(run_args)

    with caplog.at_level("WARNING", logger="emovlm_kd.sources"):
        data, val_keys, data_hash = load("r1")
    assert data.val_from_train and len(data.splits["val"]) == 6  # 10 % of 60, one per class at least
    assert len(data.splits["train"]) == 54 and "/val/" not in "".join(val_keys)
    assert "the val split of" in caplog.text and "is ignored" in caplog.text
    _, val_keys_seed_7, data_hash_seed_7 = load("r2", seed=7)  # --seed still seeds the rest, not this split
    assert (val_keys_seed_7, data_hash_seed_7) == (val_keys, data_hash)
    if source == "datasets":
        with pytest.raises(DataError, match="--dataset-preset emotion6 holds out val from train .* --val-split val"):
            load("r3", val_split="val")

def test_vlm_inputs_are_one_setting_for_stages_1_and_3(tmp_path):
    """A bare `--set` reaches both stages; it is in their fingerprints, in the cache key, and stage 3 refuses a VLM
    tuned on other inputs than it would score with."""
    data_dir = make_imagefolder(tmp_path / "data", per_class=2, size=(8, 8))
    custom = "Which of <label_list> fits? One word."
    argv = [
        "--run-dir",
        str(tmp_path / "run"),
        "--data-dir",
        str(data_dir),
        "--stages",
        "instruction_tuning",
        "distill",
    ]
    _, run_args, plans = run_all.plan([*argv, "--set", f"classification_prompt={custom}", "max_image_side=512"])
    tuning, scoring = (plan.args for plan in plans)
    assert tuning.vlm_input_settings() == scoring.vlm_input_settings()
    assert (scoring.classification_prompt, scoring.max_image_side) == (custom, 512)
    _, _, default_plans = run_all.plan(argv)
    default_tuning, default_scoring = (plan.args for plan in default_plans)
    assert instruction_tuning.fingerprint(run_args, tuning) != instruction_tuning.fingerprint(run_args, default_tuning)
    spec = distill.feature_spec(run_args, scoring, ["a", "b"])
    default_spec = distill.feature_spec(run_args, default_scoring, ["a", "b"])
    assert spec["model_config"]["classification_prompt"] == custom and spec["max_image_side"] == 512
    for changed in ({"max_image_side": 768}, {"model_config": {**spec["model_config"], "system_message": ""}}):
        assert vlm_feature_key({**spec, **changed}, "split") != vlm_feature_key(spec, "split")
    assert vlm_feature_key(spec, "split") != vlm_feature_key(default_spec, "split")

    # stage 1 completed with the default inputs: stage 3 with the custom prompt is refused, with the same accepted
    write_complete(run_args.run_dir, "instruction_tuning", "tuned", settings=default_tuning.vlm_input_settings())
    with pytest.raises(DataError, match="classification_prompt: tuned on .* here 'Which of"):
        distill.run(run_args, scoring)
    distill.check_tuned_vlm_inputs(run_args, default_scoring)


def test_whole_sequence_loss_masks_only_padding_and_image_tokens(tiny):
    _, _, processor = tiny
    classes = ["negative", "neutral", "positive"]
    image = Image.new("RGB", (70, 50), (20, 90, 200))
    answer_only = InstructionEncoder(processor, classes).encode(image, "inference", "A calm lake.")
    whole = InstructionEncoder(processor, classes, loss_on="all").encode(image, "inference", "A calm lake.")
    assert torch.equal(whole["input_ids"], answer_only["input_ids"])
    answer = answer_only["labels"] != IGNORE_INDEX
    assert torch.equal(whole["labels"][answer], answer_only["labels"][answer])
    tokenizer = processor.tokenizer
    image_tokens = {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    masked = whole["labels"] == IGNORE_INDEX
    assert masked.sum() == (whole["mm_token_type_ids"] == 1).sum() + 2  # the placeholders and the vision markers
    assert all(token in image_tokens for token in whole["input_ids"][masked].tolist())
    assert torch.equal(whole["labels"][~masked], whole["input_ids"][~masked])  # the system and user turns too
    with pytest.raises(ValueError, match="loss_on"):
        InstructionEncoder(processor, classes, loss_on="prompt")


def learning_rates(run_dir: str, epochs=2, batch_size=4, images=40, warmup_ratio=0.3) -> tuple[list[float], int]:
    """The stage-1 scheduler (`warmup_schedule`, prepared as stage 1 prepares it) stepped by the stages' epoch loop:
    the learning rate after every optimizer update, and the warm-up length in updates."""
    import math

    from emovlm_kd.accelerator_setup import make_accelerator
    from emovlm_kd.epoch_loop import train_one_epoch

    args = instruction_tuning.ARGUMENTS(epochs=epochs, batch_size=batch_size, warmup_ratio=warmup_ratio)
    accelerator = make_accelerator(RunArguments(run_dir=run_dir, report_to="none"), "warmup")
    model = torch.nn.Linear(2, 1)
    loader = torch.utils.data.DataLoader(torch.randn(images, 2), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    scheduler, warmup = instruction_tuning.warmup_schedule(
        optimizer.optimizer, args, updates_per_epoch, accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    rates = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        train_one_epoch(
            accelerator,
            model,
            loader,
            optimizer,
            lambda model, batch: model(batch).pow(2).mean(),
            scheduler=scheduler,
            on_update=lambda loss, bar: rates.append(scheduler.get_last_lr()[0]),
        )
    return rates, warmup


def test_stage1_warmup_counts_optimizer_updates(tmp_path):
    rates, warmup = learning_rates(str(tmp_path))
    assert len(rates) == 20 and warmup == 6  # 3 % of the paper, 30 % here: ceil(0.3 * 20 updates)
    assert rates[: warmup - 1] == sorted(rates[: warmup - 1]) and max(rates[: warmup - 1]) < 1e-4
    assert rates[warmup - 1 :] == [1e-4] * (len(rates) - warmup + 1)


WARMUP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from emovlm_kd.processes import end_processes
from test_fidelity import learning_rates
rates, warmup = learning_rates(sys.argv[1])
if PartialState().is_main_process:
    print("RATES " + json.dumps({{"rates": rates, "warmup": warmup, "processes": PartialState().num_processes}}))
end_processes()  # as the stages do: a gloo group left alive can abort the process at exit
"""


@pytest.mark.slow
def test_stage1_warmup_is_the_same_on_two_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes (see test_accelerate_multiprocess.py): `batch_size` is per process
    (docs/multi-gpu.md), so 2 processes with batch 4 make the updates of one process with batch 8, with the same
    learning rate after every update: the warm-up is the same share of the updates actually made."""
    script = tmp_path / "warmup.py"
    script.write_text(WARMUP_SCRIPT.format(tests=str(REPO_ROOT / "tests")))
    log = tmp_path / "launch.log"
    launch_two_processes(script, [str(tmp_path / "run")], log)
    two = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("RATES "))[6:])
    rates, warmup = learning_rates(str(tmp_path / "one"), batch_size=8)
    assert two["processes"] == 2 and two["warmup"] == warmup == 3
    assert two["rates"] == pytest.approx(rates) and len(rates) == 10


def test_teacher_is_the_references_vit_with_its_transforms():
    """Default weights: the original ViT-B/16-384 (`google/vit-base-patch16-384`); transforms as `data_utils.py`."""
    from torchvision import transforms

    assert DEFAULT_TEACHER == "vit_base_patch16_384.orig_in21k_ft_in1k"
    with torch.device("meta"):  # the data config only; no weights are needed
        model = create_teacher(DEFAULT_TEACHER, 8, pretrained=False)
    train, evaluation = teacher_transforms(model)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])]
    reference_train = transforms.Compose(
        [transforms.RandomResizedCrop(384), transforms.RandomHorizontalFlip()] + normalize
    )
    reference_test = transforms.Compose([transforms.Resize(384), transforms.CenterCrop(384)] + normalize)
    image = Image.effect_mandelbrot((500, 420), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    torch.testing.assert_close(evaluation(image), reference_test(image), rtol=0, atol=0)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = train(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, reference_train(image), rtol=0, atol=0)


@pytest.mark.parametrize("preset, weights", [("vgg", "timm/vgg16.tv_in1k"), ("resnet", "timm/resnet50.tv_in1k")])
def test_torchvision_teachers_are_timms_ports_with_the_references_transforms(preset, weights):
    """`train_ViT.py --model vgg|resnet` (train_ViT.py:12-23): torchvision's VGG16 / ResNet50 ImageNet weights, here
    timm's ports of them, fed as the reference feeds every teacher (384 px, mean = std = 0.5, data_utils.py)."""
    from torchvision import transforms

    with torch.device("meta"):
        model = create_teacher(preset, 8, pretrained=False)
    assert model.pretrained_cfg["hf_hub_id"] == weights and model.num_classes == 8
    train, evaluation = teacher_transforms(model)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])]
    image = Image.effect_mandelbrot((500, 420), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    reference_test = transforms.Compose([transforms.Resize(384), transforms.CenterCrop(384)] + normalize)
    torch.testing.assert_close(evaluation(image), reference_test(image), rtol=0, atol=0)
    reference_train = transforms.Compose(
        [transforms.RandomResizedCrop(384), transforms.RandomHorizontalFlip()] + normalize
    )
    torch.manual_seed(0)
    ours = train(image)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, reference_train(image), rtol=0, atol=0)


def test_paper_recipe_selects_every_reference_behaviour():
    stages = ["instruction_data", "instruction_tuning", "teacher", "distill", "gate", "export"]
    _, run_args, plans = run_all.plan(["--recipe", "paper", "--run-dir", "R", "--stages", *stages])
    paper = {plan.stage: plan.args for plan in plans}
    asking = paper["instruction_data"]  # generate_instruction.py get_answer: gpt-4, no temperature, max_tokens 600
    assert (asking.model, asking.temperature, asking.max_tokens, asking.max_image_side) == ("gpt-4", 1.0, 600, 10**6)
    assert run_args.recipe_name == "paper"
    tuning = paper["instruction_tuning"]
    assert (tuning.loss_on, tuning.load_in_4bit, tuning.tf32, tuning.full_size_images) == ("all", True, True, True)
    assert tuning.max_answer_tokens == 4096
    assert tuning.warmup_ratio == 0  # "constant" ignores the reference's warmup_ratio=0.03 (train_vlm.py:102-103)
    assert tuning.max_image_side == paper["distill"].max_image_side == 1024  # capped in stages 3-5 only
    scoring = paper["distill"]
    assert (scoring.vlm_branch_mode, scoring.generate_do_sample, scoring.vlm_dtype) == ("generate", True, "float32")
    assert (scoring.generate_temperature, scoring.generate_top_p, scoring.max_new_tokens) == (0.8, 1.0, 256)
    # top_k and the repetition penalty from the VLM's generation config, as generate() took them: the "sample" is
    # the same every epoch, so the gate trains on the cached answer
    assert scoring.generate_top_k is None and not paper["gate"].resample_vlm_answers
    assert paper["gate"].vlm_branch_input == "one_hot"
    assert not paper["distill"].shuffle_each_epoch and not paper["gate"].shuffle_each_epoch
    # what both share: the stages' defaults are the reference's
    _, default_run, plans = run_all.plan(["--run-dir", "R", "--stages", *stages])
    default = {plan.stage: plan.args for plan in plans}
    assert default_run.recipe_name is None
    assert (default["instruction_tuning"].loss_on, default["distill"].vlm_branch_mode) == ("answer", "score")
    assert not default["gate"].resample_vlm_answers
    for stage in ("distill", "gate"):
        assert paper[stage].batch_size == default[stage].batch_size == 1
        assert paper[stage].learning_rate == default[stage].learning_rate
    assert paper["teacher"] == default["teacher"]
    assert (
        paper["distill"].vlm_input_settings()
        == default["distill"].vlm_input_settings()
        == (VLMInputArguments().vlm_input_settings())
    )


class RecordingEncoder(InstructionEncoder):
    """Stage 1's encoder, kept for the test to compare what stage 1 trained on with what the exported model scores."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.instances.append(self)


CUSTOM_PROMPT = "Which emotion of <label_list> does this image evoke"
# Bare keys set every selected stage that has them (stages 1 and 3 here).
PIPELINE_SETTINGS = {
    "classification_prompt": CUSTOM_PROMPT,
    "max_image_side": 48,
    "vlm_branch_mode": "generate",
    "generate_do_sample": True,
    "max_new_tokens": 6,
    "instruction_tuning.epochs": 1,
    "instruction_tuning.loss_on": "all",
    "teacher.epochs": 1,
    "distill.epochs": 2,
    "gate.epochs": 3,
    "gate.resample_vlm_answers": True,
}


def pipeline_argv(data_dir, run_dir, stages) -> list[str]:
    settings = [
        f"{key}={json.dumps(value)}"
        for key, value in PIPELINE_SETTINGS.items()
        if "." not in key or key.split(".")[0] in stages
    ]
    return ["--config", "quickstart", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--stages", *stages] + [
        "--set",
        *settings,
    ]


@pytest.mark.slow
def test_custom_prompt_and_sampled_generation_from_stage_1_to_the_exported_model(tmp_path):
    """Stages 1-6 with a custom classification prompt and image cap (one bare `--set` each), the whole-sequence
    loss, and the VLM branch as sampled generation with a fresh sample per epoch of gate training: stage 1 trains
    on exactly the prompt the exported model scores with, and the sampling is reproducible."""
    from transformers import AutoImageProcessor

    data_dir = make_imagefolder(tmp_path / "data", per_class={"train": 6, "test": 2})
    run_dir = tmp_path / "run"
    stages = ("instruction_tuning", "teacher", "distill", "gate", "evaluate", "export")
    RecordingEncoder.instances.clear()
    with mock.patch.object(instruction_tuning, "InstructionEncoder", RecordingEncoder):
        summary = run_all.run(*run_all.plan(pipeline_argv(data_dir, run_dir, stages)))
    assert read_complete(run_dir, "instruction_tuning")["settings"]["classification_prompt"] == CUSTOM_PROMPT

    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["classification_prompt"], config["generate_do_sample"]) == (CUSTOM_PROMPT, True)
    assert json.loads((model_dir / "processor_config.json").read_text())["image_processor"]["max_image_side"] == 48
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    image = sorted((data_dir / "test" / "neutral").iterdir())[0]
    scored = processor([str(image)])
    (encoder,) = RecordingEncoder.instances
    trained = encoder.encode(str(image), "classification", 1)
    prompt_length = int(scored["attention_mask"][0].sum())
    assert torch.equal(trained["input_ids"][:prompt_length], scored["input_ids"][0][-prompt_length:])
    assert torch.equal(trained["pixel_values"], scored["pixel_values"])
    assert "Which emotion of ['negative', 'neutral', 'positive'] does" in encoder.prompt_text("classification")
    assert encoder.loss_on == "all"

    # the gate saw a fresh sample per epoch (epoch 0: the cached one every stage uses)
    train_files = sorted((run_dir / "cache").glob("vlm-train-*"))
    assert len(train_files) == 3
    drawn = {path.name: load_file(path)["vlm_generated"] for path in train_files}
    assert all(((a == 0) | (a == 1)).all() and (a.sum(-1) <= 1).all() for a in drawn.values())
    assert summary["export"]["verified_max_logit_difference"] < 1e-3
    card = (model_dir / "README.md").read_text()
    assert "**Recipe**: `quickstart`" in card and "sampled (temperature 0.8, top-p 1.0" in card
    assert "a fresh sample every epoch of gate training" in card
    assert "loss on the whole sequence" in card
    assert yaml.safe_load((run_dir / "run_config.yaml").read_text())["run"]["recipe_name"] == "quickstart"

    # reproducible: the samples drawn again from scratch are the same, and so is the gate trained on them
    gate_weights = load_file(run_dir / "gate" / "gate.safetensors")
    for path in train_files:
        path.unlink()
    import emovlm_kd.vlm

    with mock.patch.object(emovlm_kd.vlm, "build_emovlm_kd", wraps=emovlm_kd.vlm.build_emovlm_kd) as build:
        run_all.run(*run_all.plan([*pipeline_argv(data_dir, run_dir, ("distill", "gate")), "--force"]))
    assert build.call_count == 2  # stage 3 loads the VLM once, and stage 4 once for both of its fresh samples
    assert sorted((run_dir / "cache").glob("vlm-train-*")) == train_files
    for path in train_files:
        torch.testing.assert_close(load_file(path)["vlm_generated"], drawn[path.name], rtol=0, atol=0)
    for key, value in load_file(run_dir / "gate" / "gate.safetensors").items():
        torch.testing.assert_close(value, gate_weights[key], rtol=0, atol=0, msg=key)


def paper_recipe_generation_settings() -> dict:
    """The `generate` mode's settings of `--recipe paper` (stage 3), as the exported model config holds them."""
    recipe = yaml.safe_load((REPO_ROOT / "emovlm_kd" / "recipes" / "paper.yaml").read_text())
    names = ("vlm_branch_mode", "generate_do_sample", "generate_temperature", "generate_top_p", "max_new_tokens")
    return {name: recipe["distill"][name] for name in names if name in recipe["distill"]}


def test_generate_mode_under_the_paper_recipe_is_vlm_generate_token_for_token():
    """train_gate.py:67-73 calls `generate(do_sample=True, temperature=0.8, top_p=1.0, max_new_tokens=256)` and
    transformers fills every other field from the checkpoint's generation config (Qwen2-VL's: `top_k: 1`,
    `repetition_penalty: 1.05`), so the reference's "sampling" keeps only the best, penalised token. The `generate`
    mode runs the same logits processors on the same token history: it equals `vlm.generate` token for token."""
    settings = paper_recipe_generation_settings()
    assert settings == {
        "vlm_branch_mode": "generate",
        "generate_do_sample": True,
        "generate_temperature": 0.8,
        "generate_top_p": 1.0,
        "max_new_tokens": 256,
    }
    settings["max_new_tokens"] = 12  # the tiny random VLM never stops on its own; 12 steps show the same
    model, image_processor, _ = build_tiny_model(["negative", "positive"], **settings)
    model.vlm.generation_config.update(top_k=1, repetition_penalty=1.05)
    model.config.vlm_generation_config = model.vlm.generation_config.to_diff_dict()
    inputs = image_processor(make_images()[:2])  # two sizes: left padding in the batch
    image_embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    stop = set(model.stop_token_ids())

    def until_stop(row):
        return row[: next((i for i, token in enumerate(row) if token in stop), len(row))]

    kwargs = {"do_sample": True, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 12}
    assert model.generate_kwargs() == kwargs
    with torch.no_grad():
        ours = [model.generate_tokens(*branch, image_embeds, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        torch.manual_seed(0)
        stock = model.vlm.generate(**inputs, **kwargs)
    stock = [until_stop(row) for row in stock[:, inputs["input_ids"].shape[1] :].tolist()]
    assert ours[0] == ours[1] == stock and all(len(row) > 3 for row in stock)  # top_k=1: the same for any seed
    config = model.generate_mode_config()
    assert (config.top_k, config.repetition_penalty, config.do_sample, config.temperature) == (1, 1.05, True, 0.8)

    # the repetition penalty is applied (on the prompt and the tokens so far): without it other tokens come out
    model.vlm.generation_config.repetition_penalty = 1.0
    with torch.no_grad():
        unpenalised = model.generate_tokens(*branch, image_embeds)
    assert unpenalised != stock
    # true sampling stays an explicit choice: top-k off, seeded draws differ
    model.vlm.generation_config.repetition_penalty = 1.05
    model.config.generate_top_k = 0
    with torch.no_grad():
        draws = [model.generate_tokens(*branch, image_embeds, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert draws[0] != draws[1] and draws[0] != stock


def test_exported_config_keeps_the_vlms_generation_config(tmp_path):
    """The exported model has no generation_config.json of its own: the VLM's travels in config.json and is the one
    the loaded model generates with."""
    from transformers import AutoModelForImageClassification

    model, _, processor = build_tiny_model(["negative", "positive"], vlm_branch_mode="generate")
    model.vlm.generation_config.update(top_k=1, repetition_penalty=1.05)
    model = EmoVLMKDForImageClassification.from_vlm(model.vlm, processor, ["negative", "positive"])
    assert model.config.vlm_generation_config["top_k"] == 1
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert (loaded.generate_mode_config().top_k, loaded.generate_mode_config().repetition_penalty) == (1, 1.05)


def test_cached_epochs_can_keep_one_order_as_the_reference_does():
    """train_distillation.py:33 and train_gate.py:189 go through one list in the same order every epoch; with
    `shuffle_each_epoch=False` stages 3-4 do (one shuffle, seeded by the run's seed)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from emovlm_kd.batch_semantics import cached_data_loader

    config = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=42)
    accelerator = Accelerator(cpu=True, dataloader_config=config)
    dataset = torch.utils.data.TensorDataset(torch.arange(12))

    def epochs(reshuffle):
        loader = cached_data_loader(accelerator, dataset, 1, reshuffle=reshuffle)
        orders = []
        for epoch in range(2):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            orders.append([int(batch[0]) for batch in loader])
        return orders

    fixed, reshuffled = epochs(False), epochs(True)
    assert fixed[0] == fixed[1] != list(range(12)) and sorted(fixed[0]) == list(range(12))
    assert reshuffled[0] != reshuffled[1]


def test_full_size_images_uncap_stage_1_only(tmp_path):
    """The reference caps images at 1024 px in stages 3-5 but trains stage 1 on full-size ones (data_utils.py
    `format_data`): `--full-size-images` gives stage 1's encoder no cap while the shared `max_image_side` stays."""

    class Stop(Exception):
        pass

    seen = {}

    def encoder(*args, max_image_side=None, **kwargs):
        seen["max_image_side"] = max_image_side
        raise Stop

    data_dir = make_imagefolder(tmp_path / "data", per_class=2, size=(8, 8))
    argv = ["--run-dir", str(tmp_path / "run"), "--data-dir", str(data_dir), "--stages", "instruction_tuning"]
    argv += ["--report-to", "none", "--num-workers", "0"]
    for full_size, expected in ((True, 0), (False, 1024)):
        _, run_args, (plan,) = run_all.plan([*argv, "--set", f"instruction_tuning.full_size_images={full_size}"])
        args = plan.args
        assert args.max_image_side == 1024 and args.vlm == "Qwen/Qwen2-VL-7B-Instruct"
        args.vlm = "tiny"
        with mock.patch.object(instruction_tuning, "InstructionEncoder", encoder), pytest.raises(Stop):
            instruction_tuning.run(run_args, args)
        assert seen["max_image_side"] == expected
