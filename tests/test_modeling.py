"""The model: exact class scoring, one vision pass, losses, gates, generation mode."""

import pytest
import torch
import torch.nn.functional as F

from configuration_emovlm_kd import GATE_TYPES, EmoVLMKDConfig
from emovlm_kd.testing import EMOTIONS_8, make_images
from emovlm_kd.tiny import build_tiny_model
from modeling_emovlm_kd import GATES, AnswerTrie, distillation_loss, parse_generated_answer
from processing_emovlm_kd import EmoVLMKDProcessor, render_chat


def brute_force_log_likelihoods(model, image_processor, images):
    """A separate full VLM forward over prompt + answer for every (image, class), as the stock model computes it."""
    table = torch.zeros(len(images), model.config.num_labels)
    for row, image in enumerate(images):
        inputs = image_processor([image])
        for label, answer in enumerate(model.config.answer_token_ids):
            answer = torch.tensor([answer])
            input_ids = torch.cat([inputs["input_ids"], answer], dim=1)
            mm_token_type_ids = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
            logits = model.vlm(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=mm_token_type_ids,
            ).logits
            log_probs = logits[0, -answer.shape[1] - 1 : -1].float().log_softmax(-1)
            table[row, label] = log_probs.gather(-1, answer[0, :, None]).sum()
    return table


LABEL_SETS = {
    "2-classes": ["negative", "positive"],
    "shared-prefixes": ["sad", "sadness", "joy"],
    "8-mikels": EMOTIONS_8,
    "12-mixed": EMOTIONS_8 + ["sad", "joy", "surprise", "neutral calm"],
}


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_score_branch_equals_brute_force(labels):
    model, image_processor, _ = build_tiny_model(labels, seed=1)
    images = make_images()  # different sizes -> different prompt lengths -> left padding in the batch
    inputs = image_processor(images)
    assert not inputs["attention_mask"].all(), "the batch should exercise padding"
    with torch.no_grad():
        scored = model(**inputs).vlm_log_likelihoods
        reference = brute_force_log_likelihoods(model, image_processor, images)
    assert scored.shape == (len(images), len(labels))
    torch.testing.assert_close(scored, reference, atol=1e-4, rtol=0)
    # the test is meaningful only if classes actually get different scores
    assert (reference.max(-1).values - reference.min(-1).values).min() > 1e-3


def test_labels_with_shared_prefix_share_trie_nodes(tiny):
    answers = [[1, 2, 3, 9], [1, 2, 4, 5, 9], [1, 6, 9]]
    trie = AnswerTrie(answers)
    assert len(trie) == 9  # 1,2,3,9 | 4,5,9 | 6,9 -> shared "1 2" stored once
    tensors = trie.tensors(torch.device("cpu"))
    assert tensors["paths"].sum(-1).tolist() == [4, 5, 3]
    assert all(trie.parents[node] < node for node in range(len(trie)))


def test_visual_encoder_runs_once_per_image(tiny):
    model, image_processor, _ = tiny
    calls = []
    handle = model.vlm.model.visual.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["grid_thw"].clone()), with_kwargs=True
    )
    try:
        inputs = image_processor(make_images())
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], inputs["image_grid_thw"])  # every image exactly once, in that one call


def test_visual_encoder_runs_once_in_generate_mode():
    model, image_processor, _ = build_tiny_model(
        ["sad", "sadness", "joy"], vlm_branch_mode="generate", max_new_tokens=4
    )
    calls = []
    handle = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(**image_processor(make_images()))
    handle.remove()
    assert len(calls) == 1
    assert out.vlm_log_likelihoods is None
    assert set(out.vlm_scores.unique().tolist()) <= {0.0, 1.0}
    assert (out.vlm_scores.sum(-1) <= 1).all()


def test_generated_answers_parse_like_the_reference():
    labels = ["anger", "angry", "awe"]
    assert parse_generated_answer("{'emotion':'anger'}", labels) == 0
    assert parse_generated_answer("{'emotion': 'anger'}", labels) == 0
    assert parse_generated_answer("{'emotion':  \t'awe'}", labels) == 2  # any whitespace after the colon
    assert parse_generated_answer("I think the answer is {'emotion': 'angry'} because of the fist.", labels) == 1
    assert parse_generated_answer("{'emotion': 'awe'} or {'emotion': 'anger'}", labels) == 2  # the first match
    assert parse_generated_answer("{'emotion': 'joy'} {'emotion': 'anger'}", labels) is None  # first is no class
    assert parse_generated_answer("{'emotion': 'Anger'}", labels) is None  # exact class names only
    assert parse_generated_answer("anger", labels) is None  # unparseable -> all zeros in the model
    assert parse_generated_answer("answer: anger!", labels, answer_format="answer: <label>!") == 0


def test_generate_mode_parses_decoded_text(monkeypatch):
    model, image_processor, _ = build_tiny_model(["sad", "sadness", "joy"], vlm_branch_mode="generate")
    texts = ["{'emotion':'sadness'}", "It is {'emotion': 'joy'}.", "no idea"]
    monkeypatch.setattr(model, "decode", lambda tokens: texts[: len(tokens)])
    with torch.no_grad():
        out = model(**image_processor(make_images()))
    assert out.vlm_scores.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]


def test_generate_mode_matches_stock_greedy_generation():
    model, image_processor, _ = build_tiny_model(["negative", "positive"], vlm_branch_mode="generate")
    inputs = image_processor([make_images()[0]])
    image_embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    with torch.no_grad():
        generated = model.generate_tokens(*branch, image_embeds, max_new_tokens=6)
        stock = model.vlm.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=model.stop_token_ids())
    stock_new = stock[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(generated[0]) > 0 and generated[0] == stock_new[: len(generated[0])]
    model.config.max_new_tokens = 6
    _, texts = model.generate_answers(*branch, image_embeds)
    assert texts == model.tokenizer.batch_decode(generated, skip_special_tokens=True)


def test_sampling_is_seeded_and_follows_the_reference_settings():
    model, image_processor, _ = build_tiny_model(
        ["negative", "positive"], vlm_branch_mode="generate", max_new_tokens=8, generate_do_sample=True
    )
    assert (model.config.generate_temperature, model.config.generate_top_p) == (0.8, 1.0)
    assert EmoVLMKDConfig(id2label={0: "a", 1: "b"}).max_new_tokens == 256
    inputs = image_processor(make_images())
    image_embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])

    def sample(seed):
        return model.generate_tokens(*branch, image_embeds, generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again and first != other
    greedy = model.generate_tokens(*branch, image_embeds, do_sample=False)
    assert greedy == model.generate_tokens(*branch, image_embeds, do_sample=False) and greedy != first
    out = model(**inputs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.vlm_scores, model(**inputs, generator=torch.Generator().manual_seed(0)).vlm_scores)


def test_top_p_keeps_the_smallest_nucleus():
    model, _, _ = build_tiny_model(["a", "b"], generate_do_sample=True, generate_top_p=0.5)
    logits = torch.tensor([[2.0, 1.9, -5.0, -5.0]]) * model.config.generate_temperature  # probs ~0.52, 0.47, ...
    history = torch.tensor([[3]])

    def draws():
        _, processors = model.token_selection(history, True, 4)
        return {
            model._next_token(history, logits, processors, True, torch.Generator().manual_seed(seed)).item()
            for seed in range(50)
        }

    assert draws() == {0}
    model.config.generate_top_p = 0.9
    assert draws() == {0, 1}


def test_distillation_loss_matches_formula_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, 2])
    temperature, alpha = 2.0, 0.5
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s = [torch.tensor(v / temperature).exp().item() for v in s_row]
        t = [torch.tensor(v / temperature).exp().item() for v in t_row]
        p_s = [v / sum(s) for v in s]
        p_t = [v / sum(t) for v in t]
        kl += sum(pt * (torch.tensor(pt).log().item() - torch.tensor(ps).log().item()) for pt, ps in zip(p_t, p_s))
    kl = kl / 2 * temperature**2
    ce = 0.0
    for s_row, y in zip(student.tolist(), labels.tolist()):
        ce += -(s_row[y] - torch.tensor(s_row).exp().sum().log().item())
    ce /= 2
    expected = alpha * kl + (1 - alpha) * ce
    got = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(student, teacher, None, temperature=temperature).item() == pytest.approx(kl, rel=1e-5)
    assert distillation_loss(teacher, teacher, None).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("gate_type", list(GATES))
def test_gate_shapes_and_gradients(gate_type):
    num_labels, batch = 5, 4
    gate = GATES[gate_type](num_labels, num_experts=3)
    head_logits = torch.randn(batch, num_labels, requires_grad=True)
    vlm_scores = torch.randn(batch, num_labels).softmax(-1).requires_grad_()
    logits, weights = gate(head_logits, vlm_scores)
    assert logits.shape == (batch, num_labels)
    expected_weights = {"moe": (batch, 3), "dynamic_weighting": (batch, 2), "cross_gating": (batch, 2, num_labels)}
    if gate_type in expected_weights:
        assert weights.shape == expected_weights[gate_type]
    else:
        assert weights is None
    F.cross_entropy(logits, torch.arange(batch) % num_labels).backward()
    for name, parameter in gate.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert head_logits.grad.abs().sum() > 0 and vlm_scores.grad.abs().sum() > 0


@pytest.mark.parametrize("gate_type", list(GATES))
def test_model_with_every_gate(gate_type):
    model, image_processor, _ = build_tiny_model(["a", "b", "c", "d"], gate_type=gate_type)
    out = model(**image_processor(make_images()[:2]), labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, 4) and torch.isfinite(out.loss)


def test_losses_and_frozen_vlm():
    model, image_processor, _ = build_tiny_model(["a", "b", "c"])
    model.train()
    assert not model.vlm.training, "a frozen VLM stays in eval mode"
    inputs = image_processor(make_images())
    labels = torch.tensor([0, 1, 2])
    teacher_logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    out = model(**inputs, labels=labels, teacher_logits=teacher_logits)
    kd = distillation_loss(out.head_logits, teacher_logits, labels, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(out.distillation_loss, kd)
    torch.testing.assert_close(out.loss, kd + F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert all(p.grad is None for p in model.vlm.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is not None for p in model.gate.parameters())
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", "gate"}


def test_one_hot_gate_input_and_probabilities():
    model, image_processor, _ = build_tiny_model(["a", "b", "c"], vlm_branch_input="one_hot")
    with torch.no_grad():
        out = model(**image_processor(make_images()))
    assert torch.equal(out.vlm_scores, F.one_hot(out.vlm_log_likelihoods.argmax(-1), 3).float())
    model.config.vlm_branch_input = "probs"
    with torch.no_grad():
        out = model(**image_processor(make_images()))
    torch.testing.assert_close(out.vlm_scores.sum(-1), torch.ones(3))


def test_config_rejects_bad_values():
    from configuration_emovlm_kd import EmoVLMKDConfig

    with pytest.raises(ValueError, match="gate_type"):
        EmoVLMKDConfig(id2label={0: "a", 1: "b"}, gate_type="nope")
    with pytest.raises(ValueError, match="at least 2"):
        EmoVLMKDConfig(id2label={0: "a"})
    with pytest.raises(ValueError, match="answer_token_ids"):
        EmoVLMKDConfig(id2label={0: "a", 1: "b"}, answer_token_ids=[[1, 2]])


def test_qwen2_5_vl_family_scores_exactly():
    model, image_processor, _ = build_tiny_model(["sad", "sadness", "joy"], vlm_kwargs={"family": "qwen2_5_vl"})
    assert model.vlm.config.model_type == "qwen2_5_vl"
    images = make_images()
    with torch.no_grad():
        scored = model(**image_processor(images)).vlm_log_likelihoods
        reference = brute_force_log_likelihoods(model, image_processor, images)
    torch.testing.assert_close(scored, reference, atol=1e-4, rtol=0)


def test_unsupported_vlm_family_is_a_clear_error():
    from configuration_emovlm_kd import EmoVLMKDConfig

    with pytest.raises(ValueError, match="not supported"):
        EmoVLMKDConfig(id2label={0: "a", 1: "b"}, vlm_config={"model_type": "llava"})


def test_eager_attention_scores_like_sdpa():
    model, image_processor, _ = build_tiny_model(["sad", "sadness", "joy"])
    inputs = image_processor(make_images())
    with torch.no_grad():
        sdpa = model(**inputs).vlm_log_likelihoods
        model.vlm.set_attn_implementation("eager")
        assert model.vlm.model.language_model.config._attn_implementation == "eager"
        eager = model(**inputs).vlm_log_likelihoods
    torch.testing.assert_close(sdpa, eager, atol=1e-4, rtol=0)


def test_from_vlm_keeps_the_vlm_weights_and_builds_a_fresh_head():
    from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    processor = build_tiny_vlm_processor()
    vlm = build_tiny_vlm(processor, seed=3)
    before = {name: tensor.clone() for name, tensor in vlm.state_dict().items()}
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, ["calm", "angry"], gate_type="bilinear")
    assert model.vlm is vlm
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.vlm.state_dict().items())
    for parameter in list(model.head.parameters()) + list(model.gate.parameters()):
        assert parameter.device.type == "cpu" and torch.isfinite(parameter).all()
    weight = model.head.mlp[0].weight
    assert 0.01 < weight.std().item() < 0.03  # the head's own init (std 0.02), not left uninitialised
    assert model.config.id2label == {0: "calm", 1: "angry"} and len(model.config.answer_token_ids) == 2


def test_trie_leaves_stay_out_of_the_language_model_pass():
    trie = AnswerTrie([[1, 2, 3, 9], [1, 2, 4, 5, 9], [1, 6, 9]])
    tensors = trie.tensors(torch.device("cpu"))
    # nodes with children: 1, 2, 3, 4, 5, 6 of the 9; the three end tokens (leaves) are only predicted, never run
    assert tensors["context_tokens"].tolist() == [1, 2, 3, 4, 5, 6]
    assert tensors["context_ancestors"].shape == (6, 6)


def reference_gate_formula(gate_type, p, v1, v2):
    """The reference's gates (train_gate.py) written out on a state dict `p`."""
    x = torch.cat([v1, v2], dim=1)
    if gate_type == "concat_linear":
        return x @ p["fc.weight"].T + p["fc.bias"]
    if gate_type == "bilinear":
        bilinear = torch.einsum("bi,kij,bj->bk", v1, p["bilinear.weight"], v2) + p["bilinear.bias"]
        return bilinear @ p["fc.weight"].T + p["fc.bias"]
    if gate_type == "moe":
        weights = torch.softmax(x @ p["gate.weight"].T + p["gate.bias"], dim=1)
        experts = [x @ p[f"experts.{e}.weight"].T + p[f"experts.{e}.bias"] for e in range(weights.shape[1])]
        return sum(weights[:, e : e + 1] * experts[e] for e in range(weights.shape[1]))
    if gate_type == "dynamic_weighting":
        weights = torch.softmax(x @ p["gate.weight"].T + p["gate.bias"], dim=1)
        return (weights[:, 0:1] * v1 + weights[:, 1:2] * v2) @ p["fc.weight"].T + p["fc.bias"]
    if gate_type == "cross_gating":
        g1 = torch.sigmoid(v2 @ p["gate1.weight"].T + p["gate1.bias"])
        g2 = torch.sigmoid(v1 @ p["gate2.weight"].T + p["gate2.bias"])
        return (g1 * v1 + g2 * v2) @ p["fc.weight"].T + p["fc.bias"]
    raise AssertionError(gate_type)


def linear_shapes(name, fan_in, fan_out):
    return {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}


def reference_gate_shapes(gate_type, c, experts=3):
    """The reference's parameter names and shapes (nn.Linear(in, out).weight is (out, in))."""
    if gate_type == "concat_linear":
        return linear_shapes("fc", 2 * c, c)
    if gate_type == "bilinear":
        return {"bilinear.weight": (c, c, c), "bilinear.bias": (c,), **linear_shapes("fc", c, c)}
    if gate_type == "moe":
        shapes = {k: v for e in range(experts) for k, v in linear_shapes(f"experts.{e}", 2 * c, c).items()}
        return {**shapes, **linear_shapes("gate", 2 * c, experts)}
    if gate_type == "dynamic_weighting":
        return {**linear_shapes("gate", 2 * c, 2), **linear_shapes("fc", c, c)}
    return {**linear_shapes("gate1", c, c), **linear_shapes("gate2", c, c), **linear_shapes("fc", c, c)}


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_gates_compute_the_reference_functions_with_its_parameters(gate_type):
    num_labels, batch = 6, 5
    torch.manual_seed(0)
    gate = GATES[gate_type](num_labels, num_experts=3).double()
    state = gate.state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    assert shapes == reference_gate_shapes(gate_type, num_labels)
    head_logits = torch.randn(batch, num_labels, dtype=torch.float64) * 3
    vlm_scores = torch.randn(batch, num_labels, dtype=torch.float64).softmax(-1)
    fused, weights = gate(head_logits, vlm_scores)
    expected = reference_gate_formula(gate_type, state, head_logits, vlm_scores)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    if gate_type == "dynamic_weighting":  # documented weights: the (head, VLM) mixing weights
        features = torch.cat([head_logits, vlm_scores], 1)
        torch.testing.assert_close(weights, torch.softmax(features @ state["gate.weight"].T + state["gate.bias"], 1))
    if gate_type == "cross_gating":  # documented weights: gates on the head (from the VLM) and the VLM
        on_head = torch.sigmoid(vlm_scores @ state["gate1.weight"].T + state["gate1.bias"])
        on_vlm = torch.sigmoid(head_logits @ state["gate2.weight"].T + state["gate2.bias"])
        torch.testing.assert_close(weights, torch.stack([on_head, on_vlm], dim=1))


def test_gate_registry_is_keyed_by_the_config_gate_types():
    assert tuple(GATES) == GATE_TYPES
    for gate_type, gate in GATES.items():  # e.g. "dynamic_weighting" -> DynamicWeightingGate
        camel = "".join(word.capitalize() for word in gate_type.split("_")).replace("Moe", "MoE")
        assert gate.__name__ == f"{camel}Gate", (gate_type, gate.__name__)
    with pytest.raises(ValueError, match="gate_type must be one of"):
        EmoVLMKDConfig(id2label={0: "a", 1: "b"}, gate_type="ConcatLinearGate")


def test_initializer_range_sets_the_head_and_gate_init():
    model, _, _ = build_tiny_model(["a", "b", "c"], initializer_range=0.2, head_hidden_sizes=[256])
    assert 0.18 < model.head.mlp[0].weight.std().item() < 0.22
    assert model.head.mlp[0].bias.abs().max() == 0


def test_return_dict_false_gives_a_tuple(tiny):
    model, image_processor, _ = tiny
    inputs = image_processor(make_images()[:2])
    with torch.no_grad():
        as_dict = model(**inputs, labels=torch.tensor([0, 1]))
        as_tuple = model(**inputs, labels=torch.tensor([0, 1]), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


def test_from_vlm_needs_the_labels():
    from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    processor = build_tiny_vlm_processor()
    vlm = build_tiny_vlm(processor)
    with pytest.raises(TypeError):
        EmoVLMKDForImageClassification.from_vlm(vlm, processor)  # noqa
    with pytest.raises(ValueError, match="class labels"):
        EmoVLMKDForImageClassification.from_vlm(vlm, processor, [])
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, {0: "calm", 1: "tense"})
    assert model.config.labels == ["calm", "tense"] and model.config.label2id == {"calm": 0, "tense": 1}
    assert model.tokenizer is processor.tokenizer


def without_dtype(config: dict) -> dict:
    """A config dict without the `dtype` entries that loading fills in for the sub-configs."""
    return {k: without_dtype(v) if isinstance(v, dict) else v for k, v in config.items() if k != "dtype"}


def test_save_and_load_in_process_gives_the_same_model(tiny, tmp_path):
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    model, image_processor, _ = tiny
    model.save_pretrained(tmp_path)
    EmoVLMKDProcessor(image_processor, model.tokenizer).save_pretrained(tmp_path)  # the folder can decode text
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "chat_template.jinja").exists()
    loaded = EmoVLMKDForImageClassification.from_pretrained(tmp_path)
    assert without_dtype(loaded.config.to_diff_dict()) == without_dtype(model.config.to_diff_dict())
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    inputs = image_processor(make_images())
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    for name in ("logits", "head_logits", "vlm_scores", "vlm_log_likelihoods"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=0, rtol=0)
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.explain(**inputs, max_new_tokens=4) == model.explain(**inputs, max_new_tokens=4)


def old_gate_layout(gate_type, state, num_labels):
    """The gate weights as the code before the reference alignment named and shaped them."""
    gate = {k.removeprefix("gate."): v for k, v in state.items() if k.startswith("gate.")}
    renamed = {
        "concat_linear": {"fc": "proj"},
        "bilinear": {"bilinear": "bilinear"},
        "moe": {"experts": "experts", "gate": "router"},
        "dynamic_weighting": {"gate": "weighting"},
        "cross_gating": {"gate1": "gate_head", "gate2": "gate_vlm"},
    }[gate_type]
    old = {}
    for name, tensor in gate.items():
        module = name.split(".")[0]
        if module in renamed:
            old[name.replace(module, renamed[module], 1)] = tensor
    if gate_type == "cross_gating":  # the fusion was Linear(2C -> C)
        old["proj.weight"], old["proj.bias"] = torch.randn(num_labels, 2 * num_labels), torch.randn(num_labels)
    kept = {k: v for k, v in state.items() if not k.startswith("gate.")}
    return {**kept, **{f"gate.{k}": v for k, v in old.items()}}


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_checkpoints_with_the_old_gate_definitions_are_refused(tiny_folder, tmp_path, gate_type):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    num_labels = 3
    state = load_file(tiny_folder / "model.safetensors")
    torch.manual_seed(0)
    new_gate = GATES[gate_type](num_labels, num_experts=3).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("gate.")}
    state.update({f"gate.{k}": v for k, v in new_gate.items()})
    for layout, weights in (("new", state), ("old", old_gate_layout(gate_type, state, num_labels))):
        folder = tmp_path / layout
        shutil.copytree(tiny_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "gate_type": gate_type}))
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = EmoVLMKDForImageClassification.from_pretrained(tmp_path / "new")  # control: the current layout loads
    assert all(torch.equal(loaded.gate.state_dict()[k], v) for k, v in new_gate.items())
    with pytest.raises(ValueError, match=r"gate weights of .* do not fit this code's .*gate.*retrain the gate"):
        EmoVLMKDForImageClassification.from_pretrained(tmp_path / "old")


def count_vision_passes(model):
    calls = []
    handle = model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_explain_returns_one_text_per_image_from_one_vision_pass(tiny):
    model, image_processor, _ = tiny
    inputs = image_processor(make_images())
    calls, handle = count_vision_passes(model)
    try:
        with torch.no_grad():
            out = model(**inputs, output_image_hidden_states=True)
        assert len(calls) == 1 and len(out.image_hidden_states) == 3
        texts = model.explain(**inputs, image_hidden_states=out.image_hidden_states, max_new_tokens=5)
        assert len(calls) == 1, "explain ran the visual encoder again"
        observations = model.explain(**inputs, task="observation", max_new_tokens=5)
        assert len(calls) == 2, "explain without image_hidden_states runs the visual encoder once"
    finally:
        handle.remove()
    assert len(texts) == 3 and all(isinstance(text, str) and text for text in texts)
    assert len(observations) == 3
    # the same images from their own vision pass: the same texts
    assert model.explain(**inputs, max_new_tokens=5) == texts
    sampled = [model.explain(**inputs, max_new_tokens=5, do_sample=True, seed=seed) for seed in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_explain_prompts_with_the_task_of_the_config(tiny, monkeypatch):
    model, image_processor, vlm_processor = tiny
    inputs = image_processor(make_images()[:2])
    seen = {}
    generate_tokens = model.generate_tokens

    def spy(input_ids, attention_mask, *args, **kwargs):
        seen["input_ids"], seen["attention_mask"] = input_ids, attention_mask
        return generate_tokens(input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(model, "generate_tokens", spy)
    model.explain(**inputs, task="observation", max_new_tokens=2)
    for row, image in enumerate(make_images()[:2]):
        # what the VLM processor makes of the observation chat for this image alone
        text = render_chat(model.config, "observation", vlm_processor)
        expected = vlm_processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
        assert seen["input_ids"][row][seen["attention_mask"][row].bool()].tolist() == expected.tolist()
    assert model.config.observation_prompt in vlm_processor.tokenizer.decode(seen["input_ids"][0])


def test_generation_without_a_tokenizer_is_a_clear_error(tiny):
    import copy

    model, image_processor, _ = tiny
    model = copy.copy(model)
    object.__setattr__(model, "tokenizer", None)
    with pytest.raises(ValueError, match="needs the VLM's tokenizer"):
        model.explain(**image_processor(make_images()[:1]))
    with pytest.raises(ValueError, match="Unknown task"):
        model.explain(**image_processor(make_images()[:1]), task="reasoning")
