"""Stage 6: assemble the final model repo under `<run_dir>/model/` and optionally push it to the Hub.

The VLM of stage 3 is wrapped with the trained head and gate; the repo holds `config.json` (with `auto_map`),
`model.safetensors`, the remote-code files, the processor (`processor_config.json`: the image processor, which writes
the prompt, and the VLM's tokenizer; loaded by `AutoProcessor`),
the Inference Endpoints `handler.py` and the Gradio Space app (`space/`) when the package ships them, and a model
card with the results of stage 5 and the recipe the run followed. Before saving, the assembled model's fused logits
on a few images are checked against the cached pipeline's (with sampled VLM answers, which differ by design from
draw to draw: its head logits, and its gate on its own VLM answers). `--push-to-hub REPO_ID` uploads the folder with
`huggingface_hub`.

The hosted widget of the Hub does not run custom code, so the card carries precomputed examples instead: a few test
images (one per class by default, at most 8) are copied into `widget/`, and the card's `widget:` metadata gives each
one's true class (`example_title`) and the exported model's own `[{label, score}]` for it (`output`), computed by its
image-classification pipeline at export time. Widget images come only from the dataset's test split (a run without
one gets none, unless `--widget-image` names files): no training or validation image is ever copied into the repo.
Their file names go through `safe_file_name`, so a class name such as `../../x` never leaves `widget/`.
"""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub import HfApi

from emovlm_kd.artifacts import (
    assemble_model,
    calibration_temperature,
    fused_logits,
    gate_inputs,
    load_gate,
    load_head,
    read_head_spec,
)
from emovlm_kd.cache import FeatureCache, samples_answers
from emovlm_kd.dependencies import RANGES, pin_requirements
from emovlm_kd.model_card import build_model_card, card_settings
from emovlm_kd.run_dir import (
    RESULTS_FILE,
    STAGES,
    DataError,
    current_umask,
    file_digest,
    hash_json,
    read_class_names,
    read_complete,
    safe_file_name,
    stage_output,
    upstream_fingerprint,
)
from emovlm_kd.settings import NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import WEB_IMAGE_FORMATS, has_source, source_name, web_image
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage
from emovlm_kd.training import load_stage_data
from emovlm_kd.vlm import TINY_VLM_FAMILIES, is_tiny_vlm
from modeling_emovlm_kd import tokenizer_with_chat_template
from processing_emovlm_kd import EmoVLMKDProcessor

logger = logging.getLogger(__name__)

STAGE = "export"
REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "repo_template"
ROOT_TEMPLATE_FILES = ("handler.py", "requirements.txt")  # Inference Endpoints look for these at the repo root
WIDGET_DIR = "widget"
MAX_WIDGET_IMAGES = 8


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


def eval_split(data) -> str:
    return "test" if "test" in data.splits else "val"


def verification_data(accelerator, run_args, data, head_spec: dict, count: int):
    """(images, cached features) of the first `count` test (else val) images. Runs on every process."""
    split = eval_split(data)
    features = FeatureCache(accelerator, run_args.run_dir, data).get(head_spec, [split])[split]
    images = [data.image(split, index) for index in range(min(count, len(data.splits[split])))]
    return images, {name: value[: len(images)] for name, value in features.items()}


@torch.no_grad()
def verify_against_cache(run_dir, model, image_processor, images: list, features: dict) -> float:
    """Max |difference| between the assembled model's fused logits and the cached pipeline's on `images` (with
    sampled VLM answers: between its head logits and the cached ones, and between its fused logits and the trained
    gate applied to the cached head logits and the model's own VLM answers)."""
    gate, gate_spec = load_gate(run_dir)
    head_spec = read_head_spec(run_dir)
    head_output, vlm_scores = gate_inputs(load_head(run_dir), features, head_spec, gate_spec)
    inputs = image_processor(list(images), return_tensors="pt").to(model.device)
    outputs = model(**inputs)
    if samples_answers(head_spec):
        vlm_scores = outputs.vlm_scores.float().cpu()
        head_difference = (outputs.head_logits.float().cpu() - head_output).abs().max()
    else:
        head_difference = torch.zeros(())
    expected = fused_logits(gate, head_output, vlm_scores) / model.config.calibration_temperature
    actual = outputs.logits.float().cpu()
    difference = max(float((actual - expected).abs().max()), float(head_difference))
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if difference > tolerance:
        raise RuntimeError(
            f"The assembled model's logits differ from the trained pipeline's by {difference:.3g} (> {tolerance}) "
            f"on {len(images)} images: the exported model would not be the one evaluated"
        )
    logger.info(
        f"Assembled model matches the trained pipeline on {len(images)} images (max |Δlogit| {difference:.2e})"
    )
    return difference


@dataclass
class WidgetImage:
    """An example of the Hub page: the encoded image, its file name in `widget/` and its title (the true class)."""

    data: bytes
    name: str
    title: str


def widget_images(args: ExportArguments, data, class_names: list[str]) -> list[WidgetImage]:
    """`--widget-image` files, else `--widget-images` test images: by default one per class, at most
    `MAX_WIDGET_IMAGES`; the first images of each class in turn when more are asked for. Never an image of the train
    or val split: without a test split, no widget images (the Hub page then shows none)."""
    if args.widget_image:
        return [
            WidgetImage(Path(path).read_bytes(), safe_file_name(Path(path).name), Path(path).stem)
            for path in args.widget_image
        ]
    count = min(len(class_names), MAX_WIDGET_IMAGES) if args.widget_images is None else args.widget_images
    if data is None or count <= 0:
        return []
    split = "test"
    if split not in data.splits:
        logger.info("No widget images: the dataset has no test split (only test images are copied into the repo)")
        return []
    by_class = {label: [] for label in range(len(class_names))}
    for index, label in enumerate(data.column(split, "label")):
        by_class[label].append(index)
    chosen = []
    for rank in range(max(len(indices) for indices in by_class.values())):
        chosen += [(label, indices[rank]) for label, indices in by_class.items() if rank < len(indices)]
    examples = []
    for label, index in chosen[:count]:
        name = safe_file_name(Path(data.key(split, index).replace("[", "-").rstrip("]")).name)
        folder = safe_file_name(class_names[label])  # labels are data: never a path
        examples.append(WidgetImage(data.image_bytes(split, index), f"{folder}/{name}", class_names[label]))
    return examples


def write_widget(output: Path, model, image_processor, examples: list[WidgetImage]) -> list[dict]:
    """Copy the examples into `<output>/widget/` and return the card's `widget:` entries, with the outputs of the
    model's image-classification pipeline on the written files."""
    from pipeline_emovlm_kd import EmoVLMKDImageClassificationPipeline

    classifier = EmoVLMKDImageClassificationPipeline(model=model, image_processor=image_processor)
    widget = []
    for example in examples:
        data, image_format = web_image(example.data, example.name)  # too large or not web-safe: a JPEG
        source = Path(WIDGET_DIR) / Path(example.name).with_suffix(WEB_IMAGE_FORMATS[image_format][1])
        if not (output / source).resolve().is_relative_to((output / WIDGET_DIR).resolve()):
            raise DataError(f"Widget file name {example.name!r} would leave {str(output / WIDGET_DIR)!r}")
        (output / source).parent.mkdir(parents=True, exist_ok=True)
        (output / source).write_bytes(data)
        outputs = classifier(str(output / source), top_k=model.config.num_labels)
        scores = [{"label": item["label"], "score": round(float(item["score"]), 4)} for item in outputs]
        widget.append({"src": source.as_posix(), "example_title": example.title, "output": scores})
    return widget


def _tuned_base(run_dir, head_spec: dict) -> tuple[bool, str | None]:
    """Whether the run's VLM is stage 1's output, and the VLM that stage 1 (or the run) started from."""
    if not head_spec.get("instruction_tuned"):
        return False, head_spec["vlm"]
    record = read_complete(run_dir, "instruction_tuning") or {}
    return True, record.get("summary", {}).get("vlm") or record.get("vlm")


def _base_model(run_dir, args: ExportArguments, head_spec: dict) -> str | None:
    """The Hub id of the base VLM for the card, when there is one (never a path on the training machine)."""
    if args.base_model:
        return args.base_model
    base = _tuned_base(run_dir, head_spec)[1]
    return None if base is None or is_tiny_vlm(base) or Path(base).exists() else base


def _vlm_description(run_dir, head_spec: dict) -> str:
    """How the card names the VLM: its base name (never a path on the training machine), and whether it was tuned."""
    tuned, base = _tuned_base(run_dir, head_spec)
    base = base or "base VLM"
    if Path(base).exists():
        base = Path(base).name
    base = f"the built-in tiny random-init {TINY_VLM_FAMILIES[base]} VLM" if is_tiny_vlm(base) else base
    return f"{base}, LoRA instruction-tuned by stage 1" if tuned else base


RECIPE_DESCRIPTIONS = {
    None: "the package's defaults (the paper's hyper-parameters, with this package's documented improvements)",
    "paper": "every behaviour of the paper's reference implementation",
    "quickstart": "the offline quickstart's tiny random-init models",
}


def recipe_description(run_dir, run_args) -> str:
    """Which recipe trained the model: the one every stage recorded in its COMPLETE.json, or each stage's."""
    records = {stage: read_complete(run_dir, stage) for stage in STAGES if stage != STAGE}
    recipes = {stage: record.get("settings", {}).get("recipe_name") for stage, record in records.items() if record}
    recipes[STAGE] = run_args.recipe_name
    names = set(recipes.values())
    if len(names) == 1:
        name = names.pop()
        if name is None:
            return RECIPE_DESCRIPTIONS[None]
        return f"`{name}` ({RECIPE_DESCRIPTIONS[name]})" if name in RECIPE_DESCRIPTIONS else f"`{name}`"
    per_stage = ", ".join(f"{stage}: `{recipe or 'defaults'}`" for stage, recipe in recipes.items())
    return f"different per stage ({per_stage})"


def _vlm_branch_description(model_config: dict, gate_spec: dict, resampled: bool) -> str:
    if model_config["vlm_branch_mode"] == "score":
        what = "probabilities" if gate_spec["vlm_branch_input"] == "probs" else "one-hot best class"
        return f"exact likelihood of every class's answer; the gate sees its {what}"
    decoding = (
        f"sampled (temperature {model_config.get('generate_temperature')}, top-p {model_config.get('generate_top_p')})"
        if model_config.get("generate_do_sample")
        else "greedy"
    )
    return (
        f"generated answer ({decoding}, up to {model_config['max_new_tokens']} tokens) parsed into a one-hot vector "
        f"for the gate" + (" (a fresh sample every epoch of gate training)" if resampled else "")
    )


def _update_description(record: dict) -> str:
    """What one optimizer update of a training stage was (its batch on its process count), from its marker."""
    batch = record.get("batch")
    return f"; {batch['update']}" if batch else ""


def _training_summary(run_dir, run_args, head_spec: dict, gate_spec: dict, vlm_description: str) -> dict:
    teacher = read_complete(run_dir, "teacher") or {}
    tuning_record = read_complete(run_dir, "instruction_tuning") or {}
    tuning = tuning_record.get("settings")
    gate_settings = (read_complete(run_dir, "gate") or {}).get("settings", {})
    model_config = head_spec["model_config"]
    return {
        "Recipe": recipe_description(run_dir, run_args),
        "VLM": f"{vlm_description} (frozen in stages 3-6)",
        "Instruction tuning": (
            f"LoRA, loss on {'the whole sequence' if tuning.get('loss_on') == 'all' else 'answer tokens'}"
            + (", 4-bit NF4 base (QLoRA)" if tuning.get("load_in_4bit") else "")
            + _update_description(tuning_record)
            if tuning
            else None
        ),
        "Teacher": (
            f"`{teacher.get('teacher')}` fine-tuned for {teacher.get('epochs')} epochs" + _update_description(teacher)
            if teacher
            else None
        ),
        "Head": f"MLP {model_config['head_hidden_sizes']} distilled with alpha={model_config['kd_alpha']}, "
        f"T={model_config['kd_temperature']}",
        "Gate": f"`{gate_spec['gate_type']}` on the VLM branch",
        "VLM branch": _vlm_branch_description(
            model_config, gate_spec, gate_settings.get("resample_vlm_answers", False)
        ),
        "Settings": card_settings(run_dir),
    }


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
    base_model = _base_model(run_args.run_dir, args, head_spec)
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
    vlm_description = _vlm_description(run_args.run_dir, head_spec)
    widget = write_widget(output, model, image_processor, list(examples))
    card = build_model_card(
        repo_id,
        head_spec["class_names"],
        results,
        base_model,
        dataset_name,
        _training_summary(run_args.run_dir, run_args, head_spec, gate_spec, vlm_description),
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
        examples = widget_images(args, data, head_spec["class_names"])
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
    "WidgetImage",
    "fingerprint",
    "push_to_hub",
    "run",
    "widget_images",
    "write_repo",
    "write_template_file",
    "write_widget",
]
