"""Stage 6: assemble the final model repo under `<run_dir>/model/` and optionally push it to the Hub.

The VLM of stage 3 is wrapped with the trained head and gate; the repo holds `config.json` (with `auto_map`),
`model.safetensors`, the remote-code files, the processor (`processor_config.json`: the image processor, which writes
the prompt, and the VLM's tokenizer; loaded by `AutoProcessor`),
the Inference Endpoints `handler.py` and the Gradio Space app (`space/`) when the package ships them, and a model
card with the results of stage 5 and the recipe the run followed (`emovlm_kd.model_card`). Before saving, the
assembled model is checked against the cached pipeline (`emovlm_kd.verification`). `--push-to-hub REPO_ID` uploads
the folder with `huggingface_hub`.

The hosted widget of the Hub does not run custom code, so the card carries precomputed examples instead: a few test
images with the exported model's own outputs, in `widget/` (`emovlm_kd.widgets`: only test images, never a training
or validation one, unless `--widget-image` names files).
"""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from huggingface_hub import HfApi

from emovlm_kd.artifacts import assemble_model, calibration_temperature, load_gate, read_head_spec
from emovlm_kd.dependencies import RANGES, pin_requirements
from emovlm_kd.model_card import base_model_id, build_model_card, training_summary, vlm_name
from emovlm_kd.run_dir import (
    RESULTS_FILE,
    DataError,
    current_umask,
    file_digest,
    hash_json,
    read_class_names,
    stage_output,
    upstream_fingerprint,
)
from emovlm_kd.settings import NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import has_source, source_name
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage
from emovlm_kd.training import load_stage_data
from emovlm_kd.verification import verification_data, verify_against_cache
from emovlm_kd.widgets import MAX_WIDGET_IMAGES, widget_images, write_widget
from modeling_emovlm_kd import tokenizer_with_chat_template
from processing_emovlm_kd import EmoVLMKDProcessor

logger = logging.getLogger(__name__)

STAGE = "export"
REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "repo_template"
ROOT_TEMPLATE_FILES = ("handler.py", "requirements.txt")  # Inference Endpoints look for these at the repo root


@dataclass
class ExportArguments:
    SECRETS: ClassVar[tuple[str, ...]] = ("hub_token",)  # never written to run_config.yaml, markers or logs
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "push_to_hub": RESULT,
        "private": RESULT,
        "hub_token": NOTHING,
        "commit_message": NOTHING,
        "model_name": RESULT,
        "dataset_name": RESULT,
        "base_model": RESULT,
        "license": RESULT,
        "vlm_dtype": RESULT,
        "verify_images": RESULT,
        "widget_images": RESULT,
        "widget_image": RESULT,  # also by the files' contents
    }

    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the repo to this Hub model id (REPO_ID)"})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private"})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN / the cached login); never recorded"}
    )
    commit_message: str = field(default="Upload EmoVLM-KD model", metadata={"help": "Commit message of the upload"})
    model_name: str | None = field(
        default=None, metadata={"help": "Repo name in the card (default: --push-to-hub or the run dir's name)"}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset name for the card (default: the data folder's)"}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base VLM for the card (default: the VLM the run used)"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "License of the model repo"})
    vlm_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the exported VLM (default: the one stage 3 used)"}
    )
    verify_images: int = field(
        default=4, metadata={"help": "Test images to check the assembled model on (0: skip; needs the dataset)"}
    )
    widget_images: int | None = field(
        default=None,
        metadata={
            "help": f"Test images shown with the model's outputs on the Hub page (default: one per class, at most "
            f"{MAX_WIDGET_IMAGES}; 0: none)"
        },
    )
    widget_image: list[str] = field(
        default_factory=list,
        metadata={"help": "Image files to show on the Hub page instead (titled by file name): --widget-image A B"},
    )


ARGUMENTS = ExportArguments
# Settings that change the written repo (the token and commit message do not).
FINGERPRINT_FIELDS = fingerprint_fields(ExportArguments)


def _template_files() -> dict[str, Path]:
    """Files shipped into every repo: `{path in repo: source}`."""
    files = {name: REPO_TEMPLATE / name for name in ROOT_TEMPLATE_FILES if (REPO_TEMPLATE / name).is_file()}
    space = REPO_TEMPLATE / "space"
    if space.is_dir():
        files.update({f"space/{p.name}": p for p in sorted(space.iterdir()) if p.is_file() and p.suffix != ".pyc"})
    return files


def write_template_file(source: Path, destination: Path):
    """Copy a template file into the repo; a `requirements.txt` gets the supported version ranges of the libraries it
    names (declared once, in `emovlm_kd.dependencies`)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.name == "requirements.txt":
        destination.write_text(pin_requirements(source.read_text()))
    else:
        shutil.copy(source, destination)


def fingerprint(run_args, args: ExportArguments) -> str:
    template = {name: file_digest(path) for name, path in _template_files().items()}
    widget_files = [[Path(path).name, file_digest(path)] for path in args.widget_image if Path(path).is_file()]
    return hash_json(
        {
            "stage": STAGE,
            "evaluate": upstream_fingerprint(run_args.run_dir, "evaluate", STAGE),
            "calibration_temperature": calibration_temperature(run_args.run_dir),
            "repo_template": template,
            "widget_files": widget_files,
            "dependency_ranges": RANGES,  # written into the repo's requirements files
            **{name: getattr(args, name) for name in FINGERPRINT_FIELDS},
        }
    )


def write_repo(
    run_args, args: ExportArguments, model, image_processor, vlm_processor, output: Path, examples=()
) -> list[dict]:
    """The model repo: weights and remote code, processor and tokenizer, template files, widget examples, model card,
    plots. Returns the card's `widget:` entries."""
    head_spec = read_head_spec(run_args.run_dir)
    _, gate_spec = load_gate(run_args.run_dir)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    base_model = base_model_id(run_args.run_dir, head_spec, args.base_model)
    model.config.vlm_config.name_or_path = base_model or ""  # never a path on the training machine
    # processor_config.json (the image processor's settings too), the tokenizer, the chat template, processing code
    EmoVLMKDProcessor(image_processor, tokenizer_with_chat_template(vlm_processor)).save_pretrained(output)
    model.save_pretrained(output)
    for name, source in _template_files().items():
        write_template_file(source, output / name)
    results_file = stage_output(run_args.run_dir, "evaluate") / RESULTS_FILE
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    repo_id = args.model_name or args.push_to_hub or f"emovlm-kd-{Path(run_args.run_dir).resolve().name}"
    dataset_name = args.dataset_name or source_name(run_args)
    vlm_description = vlm_name(run_args.run_dir, head_spec)
    generates = head_spec["model_config"]["vlm_branch_mode"] == "generate"
    generation = model.generate_mode_config() if generates else None  # what the generate mode runs with
    widget = write_widget(output, model, image_processor, list(examples))
    card = build_model_card(
        repo_id,
        head_spec["class_names"],
        results,
        base_model,
        dataset_name,
        training_summary(run_args.run_dir, run_args, head_spec, gate_spec, vlm_description, generation),
        license=args.license,
        vlm_description=vlm_description,
        widget=widget,
        vlm_branch_mode=head_spec["model_config"]["vlm_branch_mode"],
    )
    card.save(output / "README.md")
    plots = stage_output(run_args.run_dir, "evaluate")
    for plot in sorted([*plots.glob("confusion_*.png"), *plots.glob("reliability_*.png")]):
        shutil.copy(plot, output / plot.name)
    _normal_modes(output)
    return widget


def _normal_modes(folder: Path):
    """The modes a plain `cp` would give (some writers create 0600 files): readable by whoever may read the folder."""
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def push_to_hub(args: ExportArguments, output: Path) -> str:
    api = HfApi(token=args.hub_token)
    repo_url = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=args.push_to_hub, folder_path=str(output), commit_message=args.commit_message, repo_type="model"
    )
    logger.info(f"Pushed {str(output)!r} to {repo_url}")
    return str(repo_url)


def run(run_args, args: ExportArguments) -> dict:
    stage_run = begin_stage(run_args, args, STAGE, fingerprint, load_data=False)
    accelerator = stage_run.accelerator
    head_spec = read_head_spec(run_args.run_dir)
    if head_spec["class_names"] != read_class_names(run_args.run_dir):
        raise DataError(f"The head of {run_args.run_dir!r} was trained for other classes than the run's labels.json")
    missing = [path for path in args.widget_image if not Path(path).is_file()]
    if missing:
        raise DataError(f"--widget-image file(s) not found: {missing}")
    wants_data = args.verify_images > 0 or (args.widget_images != 0 and not args.widget_image)
    data = None
    if wants_data and has_source(run_args):  # every process: loading data and features may synchronise them
        data = load_stage_data(run_args, accelerator, STAGE, class_names=head_spec["class_names"])
    verify = args.verify_images > 0 and data is not None
    if verify:
        images, features = verification_data(accelerator, run_args, data, head_spec, args.verify_images)
    summary = {"stage": STAGE}

    def build_repo(output: Path) -> dict:
        model, image_processor, vlm_processor = assemble_model(run_args.run_dir, args.vlm_dtype)
        model.to(accelerator.device)
        if verify:
            summary["verified_max_logit_difference"] = verify_against_cache(
                run_args.run_dir, model, image_processor, images, features
            )
        examples = widget_images(data, head_spec["class_names"], args.widget_images, args.widget_image)
        widget = write_repo(run_args, args, model, image_processor, vlm_processor, output, examples)
        summary["widget_images"] = [entry["src"] for entry in widget]
        if args.push_to_hub:
            summary["hub_url"] = push_to_hub(args, output)
        return {key: value for key, value in summary.items() if key != "stage"}

    summary["output"] = str(complete_stage(stage_run, build_repo))
    return summary


__all__ = [
    "ARGUMENTS",
    "STAGE",
    "ExportArguments",
    "fingerprint",
    "push_to_hub",
    "run",
    "write_repo",
    "write_template_file",
]
