"""Stage 6: assemble the final model repo under `<run_dir>/model/` and optionally push it to the Hub.

The VLM of stage 3 is wrapped with the trained head and gate; the repo holds `config.json` (with `auto_map`),
`model.safetensors`, the remote-code files, the image processor (which writes the prompt) and the VLM's tokenizer,
the Inference Endpoints `handler.py` and the Gradio Space app (`space/`) when the package ships them, and a model
card with the results of stage 5. Before saving, the assembled model's fused logits on a few images are checked
against the cached pipeline's. `--push-to-hub REPO_ID` uploads the folder with `huggingface_hub`.
"""

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from emovlm_kd.cache import get_features
from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.data import read_class_names, read_complete, stage_output, write_complete
from emovlm_kd.model_card import build_model_card
from emovlm_kd.stages import (
    add_run_args,
    finish_stage,
    load_run_data,
    make_accelerator,
    start_stage,
    upstream_fingerprint,
)
from emovlm_kd.stages.distill import HEAD_WEIGHTS, load_head, read_spec
from emovlm_kd.stages.gate import GATE_WEIGHTS, fused_logits, gate_inputs, load_gate

logger = logging.getLogger(__name__)

STAGE = "export"
REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "repo_template"
ROOT_TEMPLATE_FILES = ("handler.py", "requirements.txt")  # Inference Endpoints look for these at the repo root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_args(parser, data_required=False)
    group = parser.add_argument_group("export")
    group.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="Upload the repo to this Hub model id")
    group.add_argument("--private", action="store_true", help="Create the Hub repo as private")
    group.add_argument("--hub-token", default=None, help="Hub token (default: HF_TOKEN / the cached login)")
    group.add_argument("--commit-message", default="Upload EmoVLM-KD model")
    group.add_argument("--model-name", default=None, help="Repo name in the card (default: --push-to-hub or run dir)")
    group.add_argument("--dataset-name", default=None, help="Dataset name for the card (default: the data folder's)")
    group.add_argument("--base-model", default=None, help="Base VLM for the card (default: the VLM the run used)")
    group.add_argument("--license", default="apache-2.0")
    group.add_argument(
        "--verify-images",
        type=int,
        default=4,
        help="Test images to check the assembled model on (0: skip; needs --data-dir)",
    )
    return parser


def _template_files() -> dict[str, Path]:
    """Files shipped into every repo: `{path in repo: source}`."""
    files = {name: REPO_TEMPLATE / name for name in ROOT_TEMPLATE_FILES if (REPO_TEMPLATE / name).is_file()}
    space = REPO_TEMPLATE / "space"
    if space.is_dir():
        files.update({f"space/{p.name}": p for p in sorted(space.iterdir()) if p.is_file() and p.suffix != ".pyc"})
    return files


def fingerprint(args) -> str:
    keys = ("push_to_hub", "private", "model_name", "dataset_name", "base_model", "license", "verify_images")
    template_files = {name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for name, path in _template_files().items()}
    return hash_of(
        {
            "stage": STAGE,
            "evaluate": upstream_fingerprint(args.run_dir, "evaluate", STAGE),
            "repo_template": template_files,
            **{k: getattr(args, k) for k in keys},
        }
    )


def assemble_model(run_dir):
    """The final model: the run's VLM with the trained head and gate. `(model, image_processor, vlm_processor)`."""
    from emovlm_kd.data import build_emovlm_kd

    spec = read_spec(run_dir)
    _, gate_config = load_gate(run_dir)
    config = {
        **spec["model_config"],
        **{k: gate_config[k] for k in ("gate_type", "gate_num_experts", "vlm_branch_input")},
    }
    model, image_processor, vlm_processor = build_emovlm_kd(
        spec["vlm"], spec["class_names"], dtype=spec.get("vlm_dtype", "auto"), **config
    )
    dtype = model.head.mlp[0].weight.dtype
    model.head.load_state_dict(
        {k: v.to(dtype) for k, v in load_file(stage_output(run_dir, "distill") / HEAD_WEIGHTS).items()}
    )
    model.gate.load_state_dict(
        {k: v.to(dtype) for k, v in load_file(stage_output(run_dir, "gate") / GATE_WEIGHTS).items()}
    )
    return model.eval(), image_processor, vlm_processor


def verification_data(accelerator, args, spec: dict, count: int):
    """(image paths, cached features) of the first `count` test (else val) images. Runs on every process."""
    data = load_run_data(args, accelerator, class_names=spec["class_names"])
    split = "test" if "test" in data.splits else "val"
    features = get_features(accelerator, args.run_dir, data, spec, [split], num_workers=0)[split]
    return data.splits[split]["image_path"][:count], {name: value[:count] for name, value in features.items()}


@torch.no_grad()
def verify_against_cache(run_dir, model, image_processor, paths: list[str], features: dict) -> float:
    """Max |difference| between the assembled model's fused logits and the cached pipeline's on `paths`."""
    spec = read_spec(run_dir)
    gate, gate_config = load_gate(run_dir)
    expected = fused_logits(gate, *gate_inputs(load_head(run_dir), features, spec, gate_config))
    inputs = image_processor(list(paths), return_tensors="pt").to(model.device)
    actual = model(**inputs).logits.float().cpu()
    difference = float((actual - expected).abs().max())
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if difference > tolerance:
        raise RuntimeError(
            f"The assembled model's logits differ from the trained pipeline's by {difference:.3g} (> {tolerance}) "
            f"on {len(paths)} images: the exported model would not be the one evaluated"
        )
    logger.info(f"Assembled model matches the trained pipeline on {len(paths)} images (max |Δlogit| {difference:.2e})")
    return difference


def _base_model(args, spec: dict) -> str | None:
    """The Hub id of the base VLM for the card, when there is one."""
    if args.base_model:
        return args.base_model
    if Path(spec["vlm"]).resolve() == stage_output(args.run_dir, "instruction_tuning").resolve():
        record = read_complete(args.run_dir, "instruction_tuning") or {}
        base = record.get("summary", {}).get("vlm") or record.get("vlm")
        return None if base is None or base == "tiny" or Path(base).exists() else base
    return None if spec["vlm"] == "tiny" or Path(spec["vlm"]).exists() else spec["vlm"]


def _vlm_description(args, spec: dict) -> str:
    """How the card names the VLM: its base name (never a path on the training machine), and whether it was tuned."""
    tuned = Path(spec["vlm"]).resolve() == stage_output(args.run_dir, "instruction_tuning").resolve()
    base = spec["vlm"]
    if tuned:
        record = read_complete(args.run_dir, "instruction_tuning") or {}
        base = record.get("summary", {}).get("vlm") or record.get("vlm") or "base VLM"
    if Path(base).exists():
        base = Path(base).name
    base = "the built-in tiny random-init Qwen2-VL" if base == "tiny" else base
    return f"{base}, LoRA instruction-tuned by stage 1" if tuned else base


def _training_summary(run_dir, spec: dict, gate_config: dict, vlm_description: str) -> dict:
    teacher = read_complete(run_dir, "teacher") or {}
    return {
        "VLM": f"{vlm_description} (frozen in stages 3-6)",
        "Teacher": f"`{teacher.get('teacher')}` fine-tuned for {teacher.get('epochs')} epochs" if teacher else None,
        "Head": f"MLP {spec['model_config']['head_hidden_sizes']} distilled with "
        f"alpha={spec['model_config']['kd_alpha']}, "
        f"T={spec['model_config']['kd_temperature']}",
        "Gate": f"`{gate_config['gate_type']}` on the VLM's {gate_config['vlm_branch_input']}",
        "VLM branch": f"{spec['model_config']['vlm_branch_mode']} mode",
    }


def write_repo(args, model, image_processor, vlm_processor, output: Path, spec: dict, gate_config: dict):
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    vlm_processor.tokenizer.save_pretrained(output)
    image_processor.save_pretrained(output)  # after the tokenizer: its preprocessor_config.json is the one to keep
    model.save_pretrained(output)
    for name, source in _template_files().items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, output / name)
    results_file = stage_output(args.run_dir, "evaluate") / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    repo_id = args.model_name or args.push_to_hub or f"emovlm-kd-{Path(args.run_dir).resolve().name}"
    dataset_name = args.dataset_name or (Path(args.data_dir).resolve().name if args.data_dir else None)
    vlm_description = _vlm_description(args, spec)
    card = build_model_card(
        repo_id, spec["class_names"], results, _base_model(args, spec), dataset_name,
        _training_summary(args.run_dir, spec, gate_config, vlm_description), license=args.license,
        vlm_description=vlm_description,
    )  # fmt: skip
    card.save(output / "README.md")
    for plot in sorted(stage_output(args.run_dir, "evaluate").glob("confusion_*.png")):
        shutil.copy(plot, output / plot.name)


def push_to_hub(args, output: Path) -> str:
    api = HfApi(token=args.hub_token)
    repo_url = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=args.push_to_hub, folder_path=str(output), commit_message=args.commit_message, repo_type="model"
    )
    logger.info(f"Pushed {str(output)!r} to {repo_url}")
    return str(repo_url)


def run(args) -> dict:
    accelerator = make_accelerator(args, STAGE)
    start_stage(accelerator, args.run_dir, STAGE)
    stage_fingerprint = fingerprint(args)
    spec = read_spec(args.run_dir)
    if spec["class_names"] != read_class_names(args.run_dir):
        raise ValueError(f"The head of {args.run_dir!r} was trained for other classes than the run's labels.json")
    output = stage_output(args.run_dir, STAGE)
    summary = {"stage": STAGE, "output": str(output)}
    verify = args.verify_images > 0 and args.data_dir
    if verify:  # every process: loading data and features may synchronise them
        paths, features = verification_data(accelerator, args, spec, args.verify_images)
    if accelerator.is_main_process:
        model, image_processor, vlm_processor = assemble_model(args.run_dir)
        model.to(accelerator.device)
        if verify:
            summary["verified_max_logit_difference"] = verify_against_cache(
                args.run_dir, model, image_processor, paths, features
            )
        _, gate_config = load_gate(args.run_dir)
        write_repo(args, model, image_processor, vlm_processor, output, spec, gate_config)
        if args.push_to_hub:
            summary["hub_url"] = push_to_hub(args, output)
        write_complete(args.run_dir, STAGE, stage_fingerprint, **{k: v for k, v in summary.items() if k != "stage"})
    finish_stage(accelerator, args, STAGE)
    return summary


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = ["assemble_model", "build_parser", "fingerprint", "push_to_hub", "run"]
