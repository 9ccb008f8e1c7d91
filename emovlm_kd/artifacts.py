"""The trained pieces of a run and the model assembled from them.

    <run_dir>/head/head.safetensors + head_spec.json   stage 3: the distilled head, and what the VLM features were
                                                       (VLM, its identity, classes, model config fields, in_features)
    <run_dir>/gate/gate.safetensors + gate_spec.json   stage 4: the gate and its settings

The specs are plain JSON records of this package, not Hugging Face `config.json` files. Stages 4-6 read them to
apply the head and the gate to cached features, and export assembles the final `EmoVLMKDForImageClassification`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emovlm_kd.run_dir import RESULTS_FILE, stage_output
from modeling_emovlm_kd import GATES, EmoVLMKDHead, vlm_scores_from_log_likelihoods

HEAD_WEIGHTS = "head.safetensors"
HEAD_SPEC = "head_spec.json"
GATE_WEIGHTS = "gate.safetensors"
GATE_SPEC = "gate_spec.json"


def _write_json(path: Path, value: dict):
    path.write_text(json.dumps(value, indent=2) + "\n")


def save_head(output: Path, head: torch.nn.Module, spec: dict):
    output.mkdir(parents=True, exist_ok=True)
    save_file(head.state_dict(), output / HEAD_WEIGHTS)
    _write_json(output / HEAD_SPEC, spec)


def read_head_spec(run_dir) -> dict:
    """The head spec of stage 3 (VLM, classes, model config): what stages 4-6 rebuild the model from."""
    return json.loads((stage_output(run_dir, "distill") / HEAD_SPEC).read_text())


def spec_vlm(run_dir, spec: dict) -> str:
    """The VLM a head spec was trained on: the run's own `vlm/` (stage 1), wherever the run directory now is, or
    the name or folder given."""
    return str(stage_output(run_dir, "instruction_tuning")) if spec.get("instruction_tuned") else spec["vlm"]


def load_head(run_dir) -> EmoVLMKDHead:
    """The distilled head of a run, in eval mode."""
    spec = read_head_spec(run_dir)
    config = spec["model_config"]
    head = EmoVLMKDHead(
        spec["in_features"], config["head_hidden_sizes"], len(spec["class_names"]), config["head_dropout"]
    )
    head.load_state_dict(load_file(stage_output(run_dir, "distill") / HEAD_WEIGHTS))
    return head.eval()


def build_gate(spec: dict, num_labels: int) -> torch.nn.Module:
    return GATES[spec["gate_type"]](num_labels, num_experts=spec["gate_num_experts"])


def save_gate(output: Path, gate: torch.nn.Module, spec: dict):
    output.mkdir(parents=True, exist_ok=True)
    save_file(gate.state_dict(), output / GATE_WEIGHTS)
    _write_json(output / GATE_SPEC, spec)


def load_gate(run_dir) -> tuple[torch.nn.Module, dict]:
    """The trained gate of a run (eval mode) and its spec."""
    output = stage_output(run_dir, "gate")
    spec = json.loads((output / GATE_SPEC).read_text())
    gate = build_gate(spec, len(spec["class_names"]))
    gate.load_state_dict(load_file(output / GATE_WEIGHTS))
    return gate.eval(), spec


@torch.no_grad()
def head_logits(head, image_embeds: torch.Tensor) -> torch.Tensor:
    head.eval()
    return head(image_embeds.to(next(head.parameters()).device)).float().cpu()


@torch.no_grad()
def fused_logits(gate, head_output: torch.Tensor, vlm_scores: torch.Tensor) -> torch.Tensor:
    gate.eval()
    device = next(gate.parameters()).device
    return gate(head_output.to(device), vlm_scores.to(device))[0].float().cpu()


def cached_vlm_scores(features: dict[str, torch.Tensor], vlm_branch_mode: str, vlm_branch_input: str) -> torch.Tensor:
    """What the gate sees of the VLM branch, from cached features (as `EmoVLMKDForImageClassification` computes it)."""
    if vlm_branch_mode == "generate":
        return features["vlm_generated"]
    return vlm_scores_from_log_likelihoods(features["vlm_log_likelihoods"], vlm_branch_input)


def cached_vlm_predictions(features: dict[str, torch.Tensor], vlm_branch_mode: str) -> torch.Tensor:
    """The VLM branch's predicted class per image; -1 where a generated answer named no class."""
    if vlm_branch_mode == "generate":
        one_hot = features["vlm_generated"]
        return torch.where(one_hot.sum(-1) > 0, one_hot.argmax(-1), torch.full_like(one_hot[:, 0], -1).long())
    return features["vlm_log_likelihoods"].argmax(-1)


def gate_inputs(head, features: dict, head_spec: dict, gate_spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(head logits, VLM gate input) of a split's cached features."""
    vlm_scores = cached_vlm_scores(
        features, head_spec["model_config"]["vlm_branch_mode"], gate_spec["vlm_branch_input"]
    )
    return head_logits(head, features["image_embeds"]), vlm_scores


def calibration_temperature(run_dir) -> float:
    """The temperature stage 5 fitted on the validation split for the fused logits (1.0 when it fitted none, or has
    not run)."""
    results = stage_output(run_dir, "evaluate") / RESULTS_FILE
    if not results.exists():
        return 1.0
    return float(json.loads(results.read_text()).get("calibration", {}).get("temperature", 1.0))


def assemble_model(run_dir, dtype=None):
    """The final model: the run's VLM with the trained head and gate, and the calibration temperature of stage 5.
    `(model, image_processor, vlm_processor)`. `dtype`: the VLM's (default: the one stage 3 used)."""
    from emovlm_kd.vlm import build_emovlm_kd

    spec = read_head_spec(run_dir)
    _, gate_spec = load_gate(run_dir)
    # the gate spec's settings besides the classes are config fields (declared MODEL_CONFIG by stage 4)
    config = {**spec["model_config"], **{key: value for key, value in gate_spec.items() if key != "class_names"}}
    config["calibration_temperature"] = calibration_temperature(run_dir)
    model, image_processor, vlm_processor = build_emovlm_kd(
        spec_vlm(run_dir, spec),
        spec["class_names"],
        dtype=dtype or spec.get("vlm_dtype", "auto"),
        max_image_side=spec.get("max_image_side"),
        **config,
    )
    dtype = model.head.mlp[0].weight.dtype
    for module, stage, weights in ((model.head, "distill", HEAD_WEIGHTS), (model.gate, "gate", GATE_WEIGHTS)):
        state = load_file(stage_output(run_dir, stage) / weights)
        module.load_state_dict({key: value.to(dtype) for key, value in state.items()})
    return model.eval(), image_processor, vlm_processor


__all__ = [
    "GATE_SPEC",
    "GATE_WEIGHTS",
    "HEAD_SPEC",
    "HEAD_WEIGHTS",
    "assemble_model",
    "build_gate",
    "cached_vlm_predictions",
    "calibration_temperature",
    "cached_vlm_scores",
    "fused_logits",
    "gate_inputs",
    "head_logits",
    "load_gate",
    "load_head",
    "read_head_spec",
    "save_gate",
    "save_head",
    "spec_vlm",
]
