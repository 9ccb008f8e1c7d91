"""`emovlm-kd-convert-reference`: a model trained with the paper's reference code (github.com/sange1104/EmoVLM-KD)
becomes an exported model folder. The reference's files are written out here with its exact key names and shapes
(distill_model.py `QwenDistillationModel`, train_gate.py:105-181), over a tiny Qwen2-VL, and the converted model's
head and gate are checked against the reference modules' formulas."""

import json
import logging
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from emovlm_kd.convert_reference import (
    CARD_RECIPE,
    REFERENCE_GATES,
    ConvertArguments,
    convert_gate,
    convert_head,
    load_tensors,
    main,
)
from emovlm_kd.run_dir import DataError
from emovlm_kd.tiny import build_tiny_vlm, build_tiny_vlm_processor

CLASSES = ["positive", "negative", "neutral"]  # as given; the reference's output order is sorted
LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj"]  # train_vlm.py: LoraConfig(r=8, lora_alpha=8, ...)


def reference_visual_keys(vision) -> dict[str, tuple]:
    """`Qwen2VisionTransformerPretrainedModel` of distill_model.py: its state_dict keys and shapes for `vision`."""
    embed, merged = vision.embed_dim, vision.embed_dim * vision.spatial_merge_size**2
    mlp = int(vision.embed_dim * vision.mlp_ratio)
    shapes = {"patch_embed.proj.weight": (embed, 3, vision.temporal_patch_size, vision.patch_size, vision.patch_size)}
    for block in range(vision.depth):
        for name, shape in {
            "norm1.weight": (embed,),
            "norm1.bias": (embed,),
            "norm2.weight": (embed,),
            "norm2.bias": (embed,),
            "attn.qkv.weight": (3 * embed, embed),
            "attn.qkv.bias": (3 * embed,),
            "attn.proj.weight": (embed, embed),
            "attn.proj.bias": (embed,),
            "mlp.fc1.weight": (mlp, embed),
            "mlp.fc1.bias": (mlp,),
            "mlp.fc2.weight": (embed, mlp),
            "mlp.fc2.bias": (embed,),
        }.items():
            shapes[f"blocks.{block}.{name}"] = shape
    shapes.update(
        {
            "merger.ln_q.weight": (embed,),
            "merger.ln_q.bias": (embed,),
            "merger.mlp.0.weight": (merged, merged),
            "merger.mlp.0.bias": (merged,),
            "merger.mlp.2.weight": (vision.hidden_size, merged),
            "merger.mlp.2.bias": (vision.hidden_size,),
        }
    )
    return shapes


def reference_distill_state(vlm, num_labels: int, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """`QwenDistillationModel(qwen_model, num_labels, depth).state_dict()`: `visual_encoder.visual_encoder.*` (a copy
    of `qwen_model.visual`) and `distillation_head.mlp.*` ([Linear-GELU-Dropout] per size of
    `[1024, 512, 256, 128, 64][:depth]`, then Linear; input 3584 for the 7B, the VLM's hidden size)."""
    own = {k.removeprefix("model.visual."): v for k, v in vlm.state_dict().items() if k.startswith("model.visual.")}
    state = {}
    for name, shape in reference_visual_keys(vlm.config.vision_config).items():
        assert tuple(own[name].shape) == shape, name
        state[f"visual_encoder.visual_encoder.{name}"] = own[name].clone()
    generator = torch.Generator().manual_seed(seed)
    sizes = [vlm.config.get_text_config().hidden_size, *[1024, 512, 256, 128, 64][:depth], num_labels]
    for layer, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        state[f"distillation_head.mlp.{3 * layer}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * 0.05
        state[f"distillation_head.mlp.{3 * layer}.bias"] = torch.randn(fan_out, generator=generator) * 0.05
    return state


def reference_gate_state(gate: str, c: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The gate's `state_dict()` in train_gate.py:105-181 (C = number of classes)."""
    shapes = {
        "ConcatLinearGate": {"fc.weight": (c, 2 * c), "fc.bias": (c,)},
        "BilinearGate": {"bilinear.weight": (c, c, c), "bilinear.bias": (c,), "fc.weight": (c, c), "fc.bias": (c,)},
        "MoEGate": {
            **{f"experts.{e}.weight": (c, 2 * c) for e in range(3)},
            **{f"experts.{e}.bias": (c,) for e in range(3)},
            "gate.weight": (3, 2 * c),
            "gate.bias": (3,),
        },
        "DynamicWeightingGate": {"gate.weight": (2, 2 * c), "gate.bias": (2,), "fc.weight": (c, c), "fc.bias": (c,)},
        "CrossGatingGate": {
            f"{m}.{p}": (c, c) if p == "weight" else (c,) for m in ("gate1", "gate2", "fc") for p in ("weight", "bias")
        },
    }[gate]
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def reference_gate_output(gate: str, s: dict, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """The forward of each gate of train_gate.py, written out."""
    x = torch.cat([v1, v2], dim=1)
    if gate == "ConcatLinearGate":
        return F.linear(x, s["fc.weight"], s["fc.bias"])
    if gate == "BilinearGate":
        return F.linear(F.bilinear(v1, v2, s["bilinear.weight"], s["bilinear.bias"]), s["fc.weight"], s["fc.bias"])
    if gate == "MoEGate":
        weights = F.softmax(F.linear(x, s["gate.weight"], s["gate.bias"]), dim=1)
        outputs = torch.stack([F.linear(x, s[f"experts.{e}.weight"], s[f"experts.{e}.bias"]) for e in range(3)])
        return (outputs * weights.unsqueeze(2).transpose(0, 1)).sum(dim=0)
    if gate == "DynamicWeightingGate":
        w = F.softmax(F.linear(x, s["gate.weight"], s["gate.bias"]), dim=1)
        return F.linear(w[:, 0:1] * v1 + w[:, 1:2] * v2, s["fc.weight"], s["fc.bias"])
    g1 = torch.sigmoid(F.linear(v2, s["gate1.weight"], s["gate1.bias"]))
    g2 = torch.sigmoid(F.linear(v1, s["gate2.weight"], s["gate2.bias"]))
    return F.linear(g1 * v1 + g2 * v2, s["fc.weight"], s["fc.bias"])


def reference_head_output(state: dict, x: torch.Tensor) -> torch.Tensor:
    """`ExtendedDistillationHead.forward` in eval mode (dropout off): GELU between the Linear layers."""
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("distillation_head.mlp.")})
    for position, layer in enumerate(layers):
        x = F.linear(x, state[f"distillation_head.mlp.{layer}.weight"], state[f"distillation_head.mlp.{layer}.bias"])
        if position < len(layers) - 1:
            x = F.gelu(x)
    return x


@pytest.fixture(scope="module")
def reference_outputs(tmp_path_factory):
    """A base VLM folder, the reference's LoRA adapter folder (saved with the language-model key names of the
    transformers the reference ran), distill_<data>.pth and gate_<data>.pth."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("reference")
    processor = build_tiny_vlm_processor()
    base = build_tiny_vlm(processor)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, bias="none", target_modules=LORA_TARGETS)
    tuned = get_peft_model(build_tiny_vlm(processor), lora)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:  # zero at initialisation: give the adapter something to merge
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    tuned.save_pretrained(root / "qwen7b_data")
    adapter_file = root / "qwen7b_data" / "adapter_model.safetensors"
    adapter = load_file(adapter_file)
    assert any(".language_model.layers." in key for key in adapter)
    save_file({k.replace(".language_model.layers.", ".layers."): v for k, v in adapter.items()}, adapter_file)
    torch.save(reference_distill_state(base, len(CLASSES)), root / "distill_data.pth")
    torch.save(reference_gate_state("ConcatLinearGate", len(CLASSES)), root / "gate_data.pth")
    return {"root": root, "base": base, "adapter": adapter}


def test_converted_folder_loads_and_computes_the_reference_formulas(reference_outputs, tmp_path):
    from transformers import AutoModelForImageClassification

    root = reference_outputs["root"]
    argv = ["--base-vlm", str(root / "base"), "--adapter", str(root / "qwen7b_data")]
    argv += ["--distill", str(root / "distill_data.pth"), "--gate", str(root / "gate_data.pth")]
    argv += ["--gate-type", "ConcatLinearGate", "--labels", *CLASSES, "--output", str(tmp_path / "model")]
    main([*argv, "--vlm-dtype", "float32"])

    files = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "modeling_emovlm_kd.py", "processor_config.json"} <= files
    assert {"handler.py", "README.md", "tokenizer_config.json"} <= files  # stage 6's write_repo wrote it
    assert CARD_RECIPE in (tmp_path / "model" / "README.md").read_text()
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    assert model.config.labels == sorted(CLASSES)  # LabelBinarizer's order, the reference's output vector
    assert (model.config.classification_prompt, model.config.vlm_branch_mode) == ("None", "generate")
    assert (model.config.generate_do_sample, model.config.generate_temperature) == (True, 0.8)

    distill, gate = load_tensors(root / "distill_data.pth"), load_tensors(root / "gate_data.pth")
    pooled = torch.randn(4, model.config.vlm_config.get_text_config().hidden_size)
    v1, v2 = torch.randn(4, 3), F.one_hot(torch.tensor([0, 2, 1, 1]), 3).float()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(pooled), reference_head_output(distill, pooled))
        fused = model.forward_gate(v1, v2)[0]
        torch.testing.assert_close(fused, reference_gate_output("ConcatLinearGate", gate, v1, v2))
    # the adapter (saved with the older `model.layers` names) is merged: W + (alpha / r) B A
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    key = key.replace(".layers.", ".language_model.layers.")
    adapter = {part: reference_outputs["adapter"][key.format(part)] for part in "AB"}
    base = reference_outputs["base"].model.language_model.layers[1].self_attn.v_proj.weight
    merged = model.vlm.model.language_model.layers[1].self_attn.v_proj.weight
    torch.testing.assert_close(merged, base + adapter["B"] @ adapter["A"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", sorted(REFERENCE_GATES))
def test_every_reference_gate_converts_with_its_formula(gate):
    state = reference_gate_state(gate, 4, seed=1)
    converted = convert_gate(state, REFERENCE_GATES[gate], 4)
    v1, v2 = torch.randn(5, 4), F.one_hot(torch.tensor([0, 3, 1, 1, 2]), 4).float()
    with torch.no_grad():
        torch.testing.assert_close(converted(v1, v2)[0], reference_gate_output(gate, state, v1, v2))


def test_conversion_refuses_what_does_not_fit_and_never_unpickles_objects(reference_outputs, tmp_path, caplog):
    base = reference_outputs["base"]
    state = reference_distill_state(base, 3)
    head, hidden = convert_head(dict(state), base, 3)
    assert hidden == [1024, 512]
    broken = {k: v for k, v in state.items() if not k.endswith("blocks.1.mlp.fc2.bias")}
    broken["distillation_head.extra.weight"] = torch.zeros(1)
    listed = (
        r"missing keys \['visual_encoder.visual_encoder.blocks.1.mlp.fc2.bias'\], "
        r"unexpected keys \['distillation_head.extra.weight'\]"
    )
    with pytest.raises(DataError, match=listed):
        convert_head(broken, base, 3)
    with pytest.raises(DataError, match=r"shapes \['fc.weight: \(3, 6\), expected \(4, 8\)'"):
        convert_gate(reference_gate_state("ConcatLinearGate", 3), "concat_linear", 4)
    nudged = dict(state)
    name = "visual_encoder.visual_encoder.merger.mlp.2.bias"
    nudged[name] = nudged[name] + 0.25
    with caplog.at_level(logging.WARNING, logger="emovlm_kd.convert_reference"):
        convert_head(nudged, base, 3)
    assert "max difference 0.25" in caplog.text

    # any pickled object besides tensors and containers (a callable here, harmless even if it were called)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": os.getcwd}))
    with pytest.raises(DataError, match="weights_only=True"):
        load_tensors(tmp_path / "evil.pth")
    assert ConvertArguments(
        distill="d", gate="g", output="o", dataset_preset="emotion6"
    ).class_names() == ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    with pytest.raises(ValueError, match="--labels or --dataset-preset"):
        ConvertArguments(distill="d", gate="g", output="o")


def test_reference_annotations_become_stage_0_records(tmp_path):
    """`<data>_annotations_train.json` (generate_instruction.py) is stage 0's output, split with the reference's
    patterns (train_vlm.py:46-54); unparseable, unmatched and malformed entries are reported, not guessed."""
    from emovlm_kd.arguments import RunArguments
    from emovlm_kd.instruction_records import done_examples, read_records
    from emovlm_kd.run_dir import read_complete
    from emovlm_kd.stages.instruction_data import InstructionDataArguments, enabled, run
    from emovlm_kd.testing import make_imagefolder

    data_dir = make_imagefolder(tmp_path / "data", ["negative", "positive"], per_class=2, size=(8, 8))
    answer = "1. **Key elements**\nDark clouds over an empty road.\n\n2. **Reasoning**\nThe gloom suggests loss."
    entries = [
        {"gpt_response": answer, "img": "negative_000.jpg", "label": "negative"},
        {"gpt_response": "It looks sad.", "img": "positive_000.jpg", "label": "positive"},
        {"gpt_response": answer, "img": "gone.jpg", "label": "positive"},
        {"img": "negative_001.png"},
    ]
    for entry in entries[:3]:
        entry["img_path"] = f"images/data/train/{entry['label']}/{entry['img']}"
    annotations = tmp_path / "data_annotations_train.json"
    annotations.write_text(json.dumps(entries))
    run_args = RunArguments(run_dir=str(tmp_path / "run"), data_dir=str(data_dir), report_to="none")
    args = InstructionDataArguments(import_annotations=str(annotations))
    assert enabled(args)
    summary = run(run_args, args)
    assert (summary["imported"], summary["unparseable"], summary["problems"]) == (1, 1, 3)
    records = read_records(tmp_path / "run" / "instruction_data.jsonl")
    done = records["train/negative/negative_000.jpg"]
    assert (done["observation"], done["reasoning"]) == ("Dark clouds over an empty road.", "The gloom suggests loss.")
    assert records["train/positive/positive_000.jpg"]["status"] == "failed"
    assert list(done_examples(tmp_path / "run" / "instruction_data.jsonl")) == ["train/negative/negative_000.jpg"]
    assert read_complete(tmp_path / "run", "instruction_data")["summary"]["imported"] == 1
