"""Convert a model trained with the paper's reference code (github.com/sange1104/EmoVLM-KD) into an exported model
folder, laid out as stage 6 writes one (`emovlm_kd.stages.export.write_repo` writes it), in the spirit of
transformers' `convert_*_to_hf` scripts.

The reference leaves, per dataset `<data>`:

    <output_dir>/vlm/qwen7b_<data>/           the LoRA adapter of stage 1 (peft), over `Qwen/Qwen2-VL-7B-Instruct`
    <output_dir>/distill/distill_<data>.pth   `QwenDistillationModel.state_dict()` (distill_model.py): the head
                                              `distillation_head.mlp.*` and a full copy of the visual encoder
                                              `visual_encoder.visual_encoder.*`
    <output_dir>/gate/gate_<data>.pth         the gate's `state_dict()` (train_gate.py:105-181, `--gate`)

    emovlm-kd-convert-reference --base-vlm Qwen/Qwen2-VL-7B-Instruct --adapter out/vlm/qwen7b_FI \
        --distill out/distill/distill_FI.pth --gate out/gate/gate_FI.pth --gate-type ConcatLinearGate \
        --dataset-preset fi --output converted/fi

What the converted model reproduces, and why (docs/migration.md):
  * classes in sorted order: the reference's output vector is `LabelBinarizer`'s (train_gate.py `main`);
  * the head's logits and the VLM's one-hot enter the gate in the positions the reference trained it with;
  * the classification prompt is the text "None" by default: `get_final_task_message` returns nothing
    (data_utils.py:131-146), so that is what the reference's VLM was tuned on and asked;
  * the VLM branch by generation, as `train_gate.py:67-73` calls it, over the base VLM's generation config.
The `.pth` files are read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.
"""

import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch

from configuration_emovlm_kd import GATE_TYPES
from emovlm_kd.arguments import DATASET_PRESETS, RunArguments
from emovlm_kd.artifacts import save_gate, save_head
from emovlm_kd.run_dir import DataError
from emovlm_kd.settings import CONTENT, MODEL_CONFIG, NOTHING, Affects
from emovlm_kd.stages.export import ExportArguments, write_repo
from emovlm_kd.vlm import load_vlm_and_processor
from modeling_emovlm_kd import GATES, EmoVLMKDHead

logger = logging.getLogger(__name__)

# `--gate` of train_gate.py -> this package's `gate_type` (the same modules, parameter names and shapes).
REFERENCE_GATES = dict(
    zip(
        ("ConcatLinearGate", "BilinearGate", "MoEGate", "DynamicWeightingGate", "CrossGatingGate"),
        GATE_TYPES,
        strict=True,
    )
)
HEAD_PREFIX = "distillation_head."
VISUAL_COPY_PREFIX = "visual_encoder.visual_encoder."
# The text the reference's VLM saw as its classification prompt (get_final_task_message returns None).
REFERENCE_CLASSIFICATION_PROMPT = "None"
RECIPE_NAME = "reference-conversion"
CARD_RECIPE = (
    "converted from the reference implementation (github.com/sange1104/EmoVLM-KD) by "
    "`emovlm-kd-convert-reference`: its LoRA adapter merged into the base VLM, its distilled head and gate"
)
# Qwen2-VL adapters saved with transformers < 4.52 name the language model `model.layers`; it is
# `model.language_model.layers` since (transformers' own checkpoint conversion of Qwen2-VL does the same).
LEGACY_LM_KEY = (re.compile(r"^base_model\.model\.model\.layers\."), "base_model.model.model.language_model.layers.")


@dataclass
class ConvertArguments:
    # A one-off conversion, not a fingerprinted stage: what each setting reaches.
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "base_vlm": CONTENT,
        "adapter": CONTENT,
        "distill": CONTENT,
        "gate": CONTENT,
        "gate_type": MODEL_CONFIG,
        "labels": CONTENT,  # the classes (id2label)
        "dataset_preset": CONTENT,  # the classes (id2label)
        "output": NOTHING,
        "vlm_dtype": CONTENT,
        "vlm_branch_mode": MODEL_CONFIG,
        "classification_prompt": MODEL_CONFIG,
        "model_name": NOTHING,
    }

    base_vlm: str = field(
        default="Qwen/Qwen2-VL-7B-Instruct", metadata={"help": "The base VLM (config.json's vlm_model): id or folder"}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "The reference's LoRA adapter folder (vlm/qwen7b_<data>); none: the base VLM"}
    )
    distill: str | None = field(
        default=None, metadata={"help": "distill_<data>.pth (QwenDistillationModel). Required"}
    )
    gate: str | None = field(default=None, metadata={"help": "gate_<data>.pth. Required"})
    gate_type: str = field(
        default="ConcatLinearGate",
        metadata={"help": f"The gate's --gate of train_gate.py {list(REFERENCE_GATES)} (or {list(GATE_TYPES)})"},
    )
    labels: list[str] | None = field(default=None, metadata={"help": "The classes (the train/ folder names)"})
    dataset_preset: str | None = field(
        default=None, metadata={"help": f"Instead of --labels: the classes of {sorted(DATASET_PRESETS)}"}
    )
    output: str | None = field(default=None, metadata={"help": "The model folder to write. Required"})
    vlm_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the exported VLM"})
    vlm_branch_mode: str = field(
        default="generate",
        metadata={"help": "'generate' (what the gate was trained on, the reference's) or 'score' (exact scoring)"},
    )
    classification_prompt: str = field(
        default=REFERENCE_CLASSIFICATION_PROMPT,
        metadata={"help": "The classification prompt the VLM was tuned on: the reference's was the text 'None'"},
    )
    model_name: str | None = field(default=None, metadata={"help": "Repo name in the card (default: the folder's)"})

    def __post_init__(self):
        missing = [name for name in ("distill", "gate", "output") if not getattr(self, name)]
        if missing:
            raise ValueError(f"--{' --'.join(missing)} required")
        if bool(self.labels) == bool(self.dataset_preset):
            raise ValueError("Give the classes with --labels or --dataset-preset (one of them)")
        if self.dataset_preset and self.dataset_preset not in DATASET_PRESETS:
            raise ValueError(f"--dataset-preset must be one of {sorted(DATASET_PRESETS)}, got {self.dataset_preset!r}")
        if self.gate_type not in REFERENCE_GATES and self.gate_type not in GATE_TYPES:
            raise ValueError(f"--gate-type must be one of {list(REFERENCE_GATES)}, got {self.gate_type!r}")

    def class_names(self) -> list[str]:
        """The reference's output order: `LabelBinarizer` sorts the class names."""
        names = DATASET_PRESETS[self.dataset_preset].class_names if self.dataset_preset else self.labels
        return sorted(names)


def load_tensors(path) -> dict[str, torch.Tensor]:
    """A pickled `state_dict` read as tensors only (`weights_only=True`); anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling anything but tensors and containers fails here
        raise DataError(f"{str(path)!r} is not a state_dict of tensors (read with weights_only=True): {error}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{str(path)!r} is not a state_dict of tensors")
    return state


def check_keys(state: dict, expected: dict[str, tuple], what: str):
    """A `DataError` listing every missing, unexpected and wrongly shaped key of a reference `state_dict`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key}: {tuple(state[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    if missing or unexpected or shapes:
        raise DataError(
            f"{what} does not match the reference's module: missing keys {missing}, unexpected keys {unexpected}"
            + (f", shapes {shapes}" if shapes else "")
        )


def convert_head(state: dict, vlm, num_labels: int) -> tuple[EmoVLMKDHead, list[int]]:
    """`QwenDistillationModel.distillation_head` (`ExtendedDistillationHead`: [Linear-GELU-Dropout] x depth, Linear)
    as this package's head, after checking the visual-encoder copy against the VLM's own encoder."""
    visual = {k.removeprefix("model.visual."): v for k, v in vlm.state_dict().items() if k.startswith("model.visual.")}
    linear = sorted({int(k.split(".")[2]) for k in state if k.startswith(HEAD_PREFIX + "mlp.")})
    if not linear:
        raise DataError(f"No {HEAD_PREFIX}mlp.* keys: not a distill_<data>.pth of the reference")
    sizes = [state[f"{HEAD_PREFIX}mlp.{i}.weight"].shape for i in linear if f"{HEAD_PREFIX}mlp.{i}.weight" in state]
    in_features = vlm.config.get_text_config().hidden_size
    hidden = [int(shape[0]) for shape in sizes[:-1]]
    head = EmoVLMKDHead(in_features, hidden, num_labels, dropout=0.1)
    expected = {HEAD_PREFIX + k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected.update({VISUAL_COPY_PREFIX + k: tuple(v.shape) for k, v in visual.items()})
    check_keys(state, expected, "The distilled model")
    head.load_state_dict({k.removeprefix(HEAD_PREFIX): state[k] for k in expected if k.startswith(HEAD_PREFIX)})
    difference = max((state[VISUAL_COPY_PREFIX + k].float() - v.float()).abs().max().item() for k, v in visual.items())
    if difference > 0:
        logger.warning(
            f"The distilled model's copy of the visual encoder differs from the VLM's own (max difference "
            f"{difference:.3g}); the converted model uses the VLM's, once, as this package always does"
        )
    return head.eval(), hidden


def convert_gate(state: dict, gate_type: str, num_labels: int) -> torch.nn.Module:
    gate = GATES[gate_type](num_labels)
    check_keys(state, {k: tuple(v.shape) for k, v in gate.state_dict().items()}, f"The gate ({gate_type})")
    gate.load_state_dict(state)
    return gate.eval()


def merged_vlm(base: str, adapter: str | None, dtype: str):
    """The base VLM with the reference's LoRA adapter merged in: `(vlm, processor)`. Every adapter weight must find
    its place (older Qwen2-VL key names are mapped), else a `DataError` lists those that do not."""
    vlm, processor = load_vlm_and_processor(base, dtype=dtype)
    if adapter is None:
        return vlm, processor
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(adapter)
    if (folder / "adapter_model.safetensors").is_file():
        weights = load_file(folder / "adapter_model.safetensors")
    else:
        weights = load_tensors(folder / "adapter_model.bin")
    weights = {LEGACY_LM_KEY[0].sub(LEGACY_LM_KEY[1], k): v for k, v in weights.items()}
    model = get_peft_model(vlm, LoraConfig.from_pretrained(str(folder)))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise DataError(
            f"The adapter {adapter!r} does not fit {base!r}: unexpected keys {sorted(result.unexpected_keys)[:20]}, "
            f"missing LoRA keys {sorted(missing)[:20]}"
        )
    return model.merge_and_unload().eval(), processor


def model_config(args: ConvertArguments, gate_type: str, hidden: list[int]) -> dict:
    """The EmoVLM-KD config fields of the converted model (the reference's settings)."""
    return {
        "classification_prompt": args.classification_prompt,
        "vlm_branch_mode": args.vlm_branch_mode,
        "vlm_branch_input": "one_hot",
        "generate_do_sample": True,
        "generate_temperature": 0.8,
        "generate_top_p": 1.0,
        "max_new_tokens": 256,
        "head_hidden_sizes": hidden,
        "head_dropout": 0.1,
        "kd_alpha": 0.5,  # train_distillation.py's defaults, for the card
        "kd_temperature": 2.0,
        "gate_type": gate_type,
    }


def convert(args: ConvertArguments, work_dir=None) -> Path:
    """Write the converted model folder (`args.output`); `work_dir` keeps the run-directory records it is written
    from (`head/`, `gate/`; a temporary folder by default)."""
    from image_processing_emovlm_kd import EmoVLMKDImageProcessor
    from modeling_emovlm_kd import EmoVLMKDForImageClassification

    class_names = args.class_names()
    gate_type = REFERENCE_GATES.get(args.gate_type, args.gate_type)
    vlm, processor = merged_vlm(args.base_vlm, args.adapter, args.vlm_dtype)
    head, hidden = convert_head(load_tensors(args.distill), vlm, len(class_names))
    gate = convert_gate(load_tensors(args.gate), gate_type, len(class_names))
    config = model_config(args, gate_type, hidden)
    model = EmoVLMKDForImageClassification.from_vlm(vlm, processor, class_names, **config).eval()
    dtype = model.head.mlp[0].weight.dtype
    model.head.load_state_dict({k: v.to(dtype) for k, v in head.state_dict().items()})
    model.gate.load_state_dict({k: v.to(dtype) for k, v in gate.state_dict().items()})
    image_processor = EmoVLMKDImageProcessor.from_vlm_processor(processor, model.config)
    with tempfile.TemporaryDirectory() as temporary:
        run_dir = Path(work_dir or temporary)
        spec = {"vlm": args.base_vlm, "instruction_tuned": False, "class_names": class_names}
        save_head(run_dir / "head", head, {**spec, "in_features": head.mlp[0].in_features, "model_config": config})
        save_gate(
            run_dir / "gate",
            gate,
            {"gate_type": gate_type, "gate_num_experts": 3, "vlm_branch_input": "one_hot", "class_names": class_names},
        )
        (run_dir / "labels.json").write_text(json.dumps(class_names))
        run_args = RunArguments(run_dir=str(run_dir), recipe_name=RECIPE_NAME, report_to="none")
        export_args = ExportArguments(model_name=args.model_name or Path(args.output).name, verify_images=0)
        output = Path(args.output)
        write_repo(run_args, export_args, model, image_processor, processor, output)
    card = output / "README.md"
    card.write_text(card.read_text().replace(f"`{RECIPE_NAME}`", CARD_RECIPE))
    logger.info(f"Converted the reference's model into {str(output)!r}")
    return output


def main(argv=None) -> Path:
    """The `emovlm-kd-convert-reference` command (`train/convert_reference.py`)."""
    from transformers import HfArgumentParser

    from emovlm_kd.console import exit_with_error, setup_logging

    setup_logging()
    try:
        (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(argv)
        return convert(args)
    except (ValueError, DataError) as error:
        exit_with_error(error)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["ConvertArguments", "REFERENCE_GATES", "convert", "convert_gate", "convert_head", "load_tensors", "main"]
