"""One adapter per VLM family: exact scores against the stock model for each family (Qwen3-VL's deepstack
included), one vision pass, explain, processor geometry, remote code, and the refusals that keep scores honest."""

import functools

import pytest
import torch

from emovlm_kd.testing import make_images
from emovlm_kd.tiny import build_tiny_model, build_tiny_vlm, build_tiny_vlm_processor
from modeling_emovlm_kd import EmoVLMKDForImageClassification
from vlm_adapters_emovlm_kd import ADAPTERS, ImageEmbeds, get_adapter

# Qwen2-VL and Qwen2.5-VL are also scored against the stock model in test_modeling's quick tests; here they run
# with the slow tests, Qwen3-VL every time.
FAMILIES = [
    pytest.param("qwen2_vl", marks=pytest.mark.slow),
    pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
    "qwen3_vl",
]
# multi-token answers sharing prefixes: `sad` / `sadness` / `sad calm`, and the common `{'emotion': '`
LABELS = ["sad", "sadness", "joy", "sad calm"]


def stock_log_likelihoods(model, image_processor, images):
    """A forward of the stock `...ForConditionalGeneration` over the full chat (system turn, task text, image,
    answer) for every (image, class), each alone: what the one-pass scoring must reproduce."""
    table = torch.zeros(len(images), model.config.num_labels)
    for row, image in enumerate(images):
        inputs = image_processor([image])
        for label, answer in enumerate(model.config.answer_token_ids):
            answer = torch.tensor([answer])
            input_ids = torch.cat([inputs["input_ids"], answer], dim=1)
            logits = model.vlm(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1),
            ).logits
            log_probs = logits[0, -answer.shape[1] - 1 : -1].float().log_softmax(-1)
            table[row, label] = log_probs.gather(-1, answer[0, :, None]).sum()
    return table


@functools.cache
def tiny_model(family: str):
    return build_tiny_model(LABELS, seed=1, vlm_kwargs={"family": family})


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_stock_model_batched_with_padding(family):
    model, image_processor, _ = tiny_model(family)
    assert model.vlm.config.model_type == family
    answers = model.config.answer_token_ids
    assert all(len(answer) > 3 for answer in answers)

    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    common = min(shared(answers[0], other) for other in answers[1:])  # the answer format's `{'emotion': '`
    assert common > 1 and max(shared(a, b) for a in answers for b in answers if a is not b) > common
    images = make_images()
    inputs = image_processor(images)
    assert not inputs["attention_mask"].all(), "the batch should exercise padding"
    calls = []
    handle = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            scored = model(**inputs).vlm_log_likelihoods
    finally:
        handle.remove()
    assert len(calls) == 1, "one vision pass per forward"
    with torch.no_grad():
        reference = stock_log_likelihoods(model, image_processor, images)
    torch.testing.assert_close(scored, reference, atol=1e-4, rtol=0)
    assert (reference.max(-1).values - reference.min(-1).values).min() > 1e-3


def test_qwen3_vl_deepstack_features_change_the_scores():
    """Without the deepstack addition the scores differ from the stock model's: the equality above tests it."""
    model, image_processor, _ = tiny_model("qwen3_vl")
    inputs = image_processor(make_images())
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    with torch.no_grad():
        embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
        assert len(embeds.deepstack) == 3 and embeds.deepstack[0].shape == (2, *embeds[0].shape)
        with_deepstack = model.score_answers(*branch, embeds)
        zeroed = ImageEmbeds(embeds, [torch.zeros_like(levels) for levels in embeds.deepstack])
        without = model.score_answers(*branch, zeroed)
    assert (with_deepstack - without).abs().max() > 1e-3
    with pytest.raises(ValueError, match="deepstack"):
        model.score_answers(*branch, tuple(embeds))  # a plain tuple lost them: refused, not scored without


@pytest.mark.parametrize("family", [pytest.param("qwen2_5_vl", marks=pytest.mark.slow), "qwen3_vl"])
def test_explain_greedy_tokens_equal_stock_generate(family):
    model, image_processor, _ = build_tiny_model(["negative", "positive"], vlm_kwargs={"family": family})
    images = make_images()[:2]
    inputs = image_processor(images)
    with torch.no_grad():
        out = model(**inputs, output_image_hidden_states=True)
    seen = {}
    generate_tokens = model.generate_tokens

    def spy(*args, **kwargs):
        seen["tokens"] = generate_tokens(*args, **kwargs)
        seen["prompt"] = args[:2]
        return seen["tokens"]

    model.generate_tokens = spy
    try:
        texts = model.explain(**inputs, image_hidden_states=out.image_hidden_states, max_new_tokens=6)
    finally:
        del model.generate_tokens
    input_ids, attention_mask = seen["prompt"]
    for row, image in enumerate(images):
        prompt = input_ids[row][attention_mask[row].bool()][None]  # the explain prompt of this image, unpadded
        single = image_processor([image])
        pixels = single["pixel_values"]
        with torch.no_grad():
            stock = model.vlm.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                pixel_values=pixels,
                image_grid_thw=single["image_grid_thw"],
                mm_token_type_ids=(prompt == model.config.vlm_config.image_token_id).long(),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=model.stop_token_ids(),
            )
        stock_new = stock[0, prompt.shape[1] :].tolist()
        ours = seen["tokens"][row]
        assert len(ours) > 0 and ours == stock_new[: len(ours)], (row, ours, stock_new)
    assert len(texts) == 2


def test_processor_geometry_comes_from_the_vlm_processor():
    processor = build_tiny_vlm_processor(family="qwen3_vl")
    geometry = ADAPTERS["qwen3_vl"].processor_geometry(processor.image_processor)
    assert (geometry["patch_size"], geometry["merge_size"], geometry["resize_factor"]) == (16, 2, 32)
    assert geometry["image_mean"] == [0.5] * 3 and geometry["image_std"] == [0.5] * 3
    model, image_processor, _ = build_tiny_model(["a", "b"], vlm_kwargs={"family": "qwen3_vl"})
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    inputs = image_processor(make_images()[:1])
    grid = inputs["image_grid_thw"][0]
    # one LM token per 32 x 32 pixels, as many placeholders as image embeddings
    assert int((inputs["input_ids"] == image_processor.image_token_id).sum()) == int(grid.prod()) // 4
    qwen2 = ADAPTERS["qwen2_vl"].processor_geometry(build_tiny_vlm_processor().image_processor)
    assert qwen2["resize_factor"] == 28


def test_qwen3_vl_image_hidden_states_keep_their_deepstack_features():
    model, image_processor, _ = tiny_model("qwen3_vl")
    inputs = image_processor(make_images()[:2])
    with torch.no_grad():
        hidden = model(**inputs, output_image_hidden_states=True).image_hidden_states
    assert isinstance(hidden, ImageEmbeds) and hidden.deepstack is not None
    with pytest.raises(ValueError, match="deepstack"):
        model.explain(**inputs, image_hidden_states=tuple(hidden), max_new_tokens=2)


def tiny_qwen3_5_vlm(processor):
    """A tiny Qwen3.5 (hybrid attention: 3 of 4 language-model layers are linear attention)."""
    from transformers import AutoModelForImageTextToText, Qwen3_5Config

    tokenizer = processor.tokenizer
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
        },
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return AutoModelForImageTextToText.from_config(config).eval()


def test_hybrid_attention_qwen3_5_is_refused_with_the_reason():
    """Qwen3.5's linear-attention layers ignore the trie's 4-D mask: refused at from_vlm and at load (the config),
    never scored wrongly."""
    processor = build_tiny_vlm_processor(family="qwen3_vl")
    vlm = tiny_qwen3_5_vlm(processor)
    assert "linear_attention" in vlm.config.text_config.layer_types
    with pytest.raises(ValueError, match=r"cannot be scored exactly: 3 of its 4 .*linear_attention.*4-D"):
        EmoVLMKDForImageClassification.from_vlm(vlm, processor, ["a", "b"])
    from configuration_emovlm_kd import EmoVLMKDConfig

    with pytest.raises(ValueError, match="linear_attention"):  # what a saved folder's config meets at load
        EmoVLMKDConfig(id2label={0: "a", 1: "b"}, vlm_config=vlm.config.to_dict())


def test_sliding_window_shorter_than_the_scoring_pass_is_refused():
    import copy

    from transformers import AutoModelForImageTextToText

    from image_processing_emovlm_kd import EmoVLMKDImageProcessor

    processor = build_tiny_vlm_processor()
    config = copy.deepcopy(build_tiny_vlm(processor, seed=2).config)
    text_config = config.get_text_config()
    text_config.sliding_window, text_config.layer_types = 64, ["sliding_attention"] * text_config.num_hidden_layers
    torch.manual_seed(2)
    vlm = AutoModelForImageTextToText.from_config(config).eval()
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, ["sad", "joy"])
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
    images = make_images()[:2]
    inputs = image_processor(images)
    assert inputs["input_ids"].shape[1] > 64
    with pytest.raises(ValueError, match="sliding window \\(64 tokens\\)"):
        model(**inputs)
    text_config.sliding_window = 4096  # longer than prompt + trie: the one-pass mask is exact again
    with torch.no_grad():
        scored = model(**inputs).vlm_log_likelihoods
        torch.testing.assert_close(scored, stock_log_likelihoods(model, image_processor, images), atol=1e-4, rtol=0)


def test_attention_implementations_that_drop_custom_masks_are_refused():
    processor = build_tiny_vlm_processor()
    vlm = build_tiny_vlm(processor)
    language_model = get_adapter(vlm.config).language_model(vlm)
    language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        EmoVLMKDForImageClassification.from_vlm(vlm, processor, ["a", "b"])
    # the generate branch does not need the mask
    EmoVLMKDForImageClassification.from_vlm(vlm, processor, ["a", "b"], vlm_branch_mode="generate")


@pytest.mark.slow  # peft's import; stage 1 on Qwen3-VL also runs in the quickstart test
def test_stage_1_lora_targets_come_from_the_adapter():
    from types import SimpleNamespace

    from emovlm_kd.stages.instruction_tuning import add_lora

    processor = build_tiny_vlm_processor(family="qwen3_vl")
    vlm = build_tiny_vlm(processor, family="qwen3_vl")
    settings = SimpleNamespace(lora_r=2, lora_alpha=2, lora_dropout=0.0, load_in_4bit=False, gradient_checkpointing=False)
    peft_model = add_lora(vlm, settings)
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert len(wrapped) == 4 * vlm.config.text_config.num_hidden_layers  # q, k, v, o of every layer, nothing else
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert all(".language_model." in name and name.split(".")[-1] in projections for name in wrapped)


def test_saved_folder_ships_the_adapter_file_and_a_resave_keeps_it(tmp_path):
    from transformers import AutoModelForImageClassification

    from emovlm_kd.tiny import save_tiny_model_folder

    first = save_tiny_model_folder(tmp_path / "first", vlm_kwargs={"family": "qwen3_vl"})
    assert (tmp_path / "first" / "vlm_adapters_emovlm_kd.py").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(first, trust_remote_code=True)
    assert type(reloaded).__module__.startswith("transformers_modules")  # the folder's code, not the package's
    reloaded.save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / "vlm_adapters_emovlm_kd.py").exists()
    from transformers import AutoImageProcessor

    inputs = AutoImageProcessor.from_pretrained(first, trust_remote_code=True)(make_images())
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "second", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, reloaded(**inputs).logits)


def test_head_input_can_concatenate_the_pooled_deepstack_levels(tmp_path):
    """Stage 3's optional head input (off by default): pooled embeddings + every pooled deepstack level."""
    model, image_processor, _ = build_tiny_model(["a", "b"], vlm_kwargs={"family": "qwen3_vl"}, head_input_deepstack=True)
    inputs = image_processor(make_images())
    with torch.no_grad():
        out = model(**inputs, output_image_hidden_states=True)
    hidden, levels = model.config.vlm_config.text_config.hidden_size, 2
    assert model.head.mlp[0].in_features == hidden * (1 + levels) and out.image_embeds.shape == (3, hidden * 3)
    plain = torch.stack([embeds.mean(0) for embeds in out.image_hidden_states])
    torch.testing.assert_close(out.image_embeds[:, :hidden], plain)
    first_level = torch.stack([levels[0].mean(0) for levels in out.image_hidden_states.deepstack])
    torch.testing.assert_close(out.image_embeds[:, hidden : 2 * hidden], first_level)
    model.save_pretrained(tmp_path / "saved")  # the setting travels in the config: the head loads at its width
    reloaded = EmoVLMKDForImageClassification.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, out.logits)
    from configuration_emovlm_kd import EmoVLMKDConfig

    assert EmoVLMKDConfig(id2label={0: "a", 1: "b"}).head_input_deepstack is False
    with pytest.raises(ValueError, match="head_input_deepstack needs a VLM with deepstack"):
        build_tiny_model(["a", "b"], head_input_deepstack=True)


# Runs in a fresh interpreter with this package's modules (remote-code files included) made unimportable: the
# exported folder must bring its own code, the adapter file with it.
BLOCKED_RELOAD = """
import json, sys
BLOCKED = {"emovlm_kd", "modeling_emovlm_kd", "configuration_emovlm_kd", "image_processing_emovlm_kd",
           "pipeline_emovlm_kd", "vlm_adapters_emovlm_kd"}

class BlockProjectModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockProjectModules())
from transformers import AutoModelForImageClassification, pipeline

folder, images = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
results = classifier(images, batch_size=2, top_k=None, explain=True, max_new_tokens=8)
print(json.dumps({"family": model.config.vlm_config.model_type, "module": type(model).__module__,
                  "results": results}))
"""


@pytest.mark.slow
def test_quickstart_with_tiny_qwen3_vl_exports_a_model_that_loads_without_the_package(tmp_path):
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py"), "--vlm", "tiny-qwen3-vl", "--run-dir", run_dir],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"The model folder is {run_dir / 'model'}" in result.stdout
    model_dir = run_dir / "model"
    assert (model_dir / "vlm_adapters_emovlm_kd.py").exists() and (model_dir / "handler.py").exists()
    assert json.loads((model_dir / "config.json").read_text())["vlm_config"]["model_type"] == "qwen3_vl"
    # stage 1 taught the tiny Qwen3-VL the colour signal: every branch beats the majority class on held-out images
    baseline = float(re.search(r"\| majority-class baseline \| [\d.]+ \| – \| ([\d.]+) \|", result.stdout).group(1))
    for row in ("VLM branch", "Distilled head", "EmoVLM-KD \\(fused\\)"):
        accuracy = float(re.search(rf"\| {row} \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", result.stdout).group(1))
        assert accuracy > baseline + 0.2, (row, accuracy, baseline)
    images = sorted(str(path) for path in (run_dir / "data" / "test").rglob("*") if path.is_file())[:3]
    reload = subprocess.run(
        [sys.executable, "-c", BLOCKED_RELOAD, str(model_dir), json.dumps(images)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": ""},
    )
    assert reload.returncode == 0, reload.stderr[-4000:]
    loaded = json.loads(reload.stdout.strip().splitlines()[-1])
    assert loaded["family"] == "qwen3_vl" and loaded["module"].startswith("transformers_modules")
    assert len(loaded["results"]) == 3
    for result in loaded["results"]:
        scores = [prediction["score"] for prediction in result["predictions"]]
        assert len(scores) == 3 and abs(sum(scores) - 1) < 1e-4 and isinstance(result["explanation"], str)


@pytest.mark.slow  # ~10 s: three ways of loading the folder
def test_qwen3_vl_folder_serves_through_the_pipeline_the_handler_and_the_space(tmp_path):
    """Export's three ways of serving a model, on a Qwen3-VL folder: the same probabilities, explanations from
    the forward's own image embeddings (deepstack features kept)."""
    import base64
    import sys

    from transformers import pipeline

    from emovlm_kd.tiny import save_tiny_model_folder
    from helpers_repo_template import HANDLER, SPACE_DIR, image_bytes, load_module

    folder = save_tiny_model_folder(tmp_path / "model", vlm_kwargs={"family": "qwen3_vl"})
    image = make_images()[0]
    raw = image_bytes(image, "PNG")
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    piped = classifier(image, top_k=None, explain=True, max_new_tokens=4)
    handler = load_module(HANDLER, "qwen3_handler").EndpointHandler(folder)
    served = handler({"inputs": base64.b64encode(raw).decode(), "parameters": {"explain": True, "max_new_tokens": 4}})
    assert {p["label"]: round(p["score"], 5) for p in piped["predictions"]} == {
        p["label"]: round(p["score"], 5) for p in served["predictions"]
    }
    assert piped["explanation"] == served["explanation"]
    sys.path.insert(0, str(SPACE_DIR))
    try:
        space = load_module(SPACE_DIR / "app.py", "qwen3_space_app")
    finally:
        sys.path.remove(str(SPACE_DIR))
    output = space.EmotionPredictor(folder, max_new_tokens=4)(image, explain_task="inference")
    fused = dict(zip(classifier.model.config.labels, output["fused"].tolist()))
    assert {label: round(score, 5) for label, score in fused.items()} == {
        p["label"]: round(p["score"], 5) for p in piped["predictions"]
    }
    assert output["explanation"] == piped["explanation"]


def test_padding_the_scoring_pass_to_a_multiple_of_8_changes_no_score_in_float32():
    """The dummy nodes that round the pass up are never attended to: every score is the unpadded one."""
    model, image_processor, _ = tiny_model("qwen3_vl")
    inputs = image_processor(make_images())
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    seen = []
    handle = model.vlm.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    scores = {}
    try:
        with torch.no_grad():
            embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
            for multiple in (1, 8, 5):
                model.scoring_pad_multiple = multiple
                scores[multiple] = model.score_answers(*branch, embeds)
    finally:
        handle.remove()
        model.scoring_pad_multiple = EmoVLMKDForImageClassification.scoring_pad_multiple
    assert seen[1] % 8 == 0 and seen[2] % 5 == 0 and seen[0] <= seen[1] < seen[0] + 8 and seen[0] % 8 != 0
    torch.testing.assert_close(scores[8], scores[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[5], scores[1], atol=1e-5, rtol=0)


def test_an_image_processor_of_another_geometry_is_refused():
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor

    model, _, _ = tiny_model("qwen3_vl")
    qwen2_processor = build_tiny_vlm_processor()  # 14-px patches: not what the Qwen3-VL vision tower reads
    with pytest.raises(ValueError, match=r"does not fit the qwen3_vl VLM: patch_size 14 \(the VLM's: 16\)"):
        EmoVLMKDImageProcessor.from_vlm_processor(qwen2_processor, model.config)
