"""Settings of the training stages: the shared run arguments, recipe files, and parsing them with HfArgumentParser.

A stage's settings are two dataclasses: [`RunArguments`] (shared by every stage) and the stage's own (the `ARGUMENTS`
dataclass of `emovlm_kd.stages.<stage>`; training stages extend [`CheckpointArguments`]). Scripts parse them with
`transformers.HfArgumentParser`, as Hugging Face's example scripts do: `--learning-rate` and `--learning_rate` both
work, booleans take `--flag` / `--no-flag`.

A recipe (a YAML or JSON file, or the name of one shipped in `emovlm_kd/recipes/`) sets them for a whole run:

    run:                  # RunArguments, for every stage
      seed: 42
    all:                  # stage settings, for every stage that has them
      vlm: Qwen/Qwen2-VL-2B-Instruct
    stages: [teacher, distill, gate, evaluate, export]   # which stages `run_all` runs
    distill:              # one section per stage
      epochs: 10

Precedence: the dataclass defaults, then the recipe, then the command line. The recipe's name is recorded in
`RunArguments.recipe_name` (and so in every stage's COMPLETE.json and the exported model card). Shipped recipes:
`quickstart` (the offline tiny models) and `paper` (every behaviour of the reference implementation at once).

What the VLM is shown (its prompts and the image size cap) is one setting for every stage that uses it
([`VLMInputArguments`], defaults from `EmoVLMKDConfig`): stage 1 trains on it and stage 3 scores with it.
"""

import dataclasses
import json
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from configuration_emovlm_kd import VLM_BRANCH_MODES, EmoVLMKDConfig
from emovlm_kd.settings import CARD, CONTENT, MODEL_CONFIG, NOTHING, RESULT, VLM_FEATURES, Affects, fields_with
from image_processing_emovlm_kd import DEFAULT_MAX_IMAGE_SIDE

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_SECTIONS = ("run", "all", "stages")


@dataclass(frozen=True)
class DatasetPreset:
    """A dataset of the paper as the reference implementation reads it: its classes in the order its prompt lists
    them, and whether it has a `val/` folder (FI, Flickr, Instagram) or holds out a stratified 10 % of train."""

    class_names: tuple[str, ...]
    val_folder: bool


MIKELS_EMOTIONS = ("amusement", "excitement", "sadness", "fear", "contentment", "anger", "disgust", "awe")
# The reference's class lists (`data_utils.get_final_task_message`) and splits (`data_utils.load_img_dataset`). It has
# no prompt of its own for Abstract and ArtPhoto: those presets use the eight Mikels categories as FI lists them.
DATASET_PRESETS = {
    "fi": DatasetPreset(MIKELS_EMOTIONS, val_folder=True),
    "emoset": DatasetPreset(MIKELS_EMOTIONS, val_folder=False),
    "emotion6": DatasetPreset(("anger", "disgust", "fear", "joy", "sadness", "surprise"), val_folder=False),
    "flickr": DatasetPreset(("positive", "negative"), val_folder=True),
    "instagram": DatasetPreset(("positive", "negative"), val_folder=True),
    "abstract": DatasetPreset(MIKELS_EMOTIONS, val_folder=False),
    "artphoto": DatasetPreset(MIKELS_EMOTIONS, val_folder=False),
}
PRESET_VAL_FRACTION = 0.1
PRESET_SPLIT_SEED = 42  # the reference's `random_state` of that holdout


@dataclass
class RunArguments:
    """Where a run and its data are, seeding, logging: shared by every stage."""

    # The data settings reach every stage's fingerprint through `sources.source_hash`, the seed directly.
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "run_dir": NOTHING,  # runs are identified by content, never by where they lie
        "data_dir": CONTENT,
        "dataset": CONTENT,
        "dataset_config": RESULT,
        "dataset_revision": RESULT,
        "image_column": RESULT,
        "label_column": RESULT,
        "train_split": RESULT,
        "val_split": RESULT,
        "test_split": RESULT,
        "val_fraction": RESULT,
        "seed": RESULT,
        "report_to": NOTHING,
        "num_workers": NOTHING,
        "mixed_precision": NOTHING,  # numerics of the same computation; not fingerprinted
        "dataset_preset": RESULT,  # classes and their order (labels.json) and the split
        "recipe_name": CARD,
        "allow_local_paths": CONTENT,  # which path-only rows are read (in `source_hash` when true)
        "verify_content": CONTENT,  # how files are identified (in `source_hash`)
    }

    run_dir: str | None = field(
        default=None, metadata={"help": "The run directory (every stage reads and writes there). Required."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "ImageFolder dataset: train/[val/][test/]<class>/<image>"}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Any `datasets` source instead of --data-dir: a Hub dataset id, a save_to_disk folder, parquet or "
            "arrow files (a file, glob or folder), or an ImageFolder tree"
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset"})
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a Hub dataset"}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of a --dataset (default: its one `Image` column)"}
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Label column of a --dataset (default: its one `ClassLabel`; strings: sorted classes)"},
    )
    train_split: str = field(default="train", metadata={"help": "Training split of a --dataset"})
    val_split: str | None = field(
        default=None,
        metadata={"help": "Validation split of a --dataset (default: validation or val; else held out of train)"},
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Test split of a --dataset (default: test, if any)"}
    )
    val_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train held out (stratified) as val when there is no val/ folder or val split"},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the val split, initialisation and shuffling"})
    report_to: str = field(
        default="tensorboard", metadata={"help": "Accelerate tracker(s), comma-separated, or 'none'"}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Defaults to the `accelerate config` / launch setting"}
    )
    dataset_preset: Literal[tuple(DATASET_PRESETS)] | None = field(
        default=None,
        metadata={
            "help": "A dataset of the paper: fixes its classes and their order (also in the prompt) as the "
            "reference has them, and its split (val/ for fi, flickr, instagram; else 10 %% of train held out, "
            "stratified by class, seed 42, and any val/ folder or validation split ignored). A folder with other "
            "classes is an error"
        },
    )
    recipe_name: str | None = field(
        default=None, metadata={"help": "Name of the recipe the run follows (set by --config; in the model card)"}
    )
    allow_local_paths: bool = field(
        default=False,
        metadata={
            "help": "Let rows of a --dataset that hold only a file path (no image bytes) read files outside the "
            "dataset's own folder (and the Hugging Face caches); by default such rows are reported and left out"
        },
    )
    verify_content: bool = field(
        default=False,
        metadata={
            "help": "Identify the data files by a hash of their bytes rather than by size and modification time "
            "(reads every file; catches a same-size, same-time swap)"
        },
    )

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run-dir is required: the run directory every stage reads and writes")
        if self.data_dir and self.dataset:
            raise ValueError(f"Pass --data-dir or --dataset, not both (got {self.data_dir!r} and {self.dataset!r})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.dataset_preset and self.val_fraction != PRESET_VAL_FRACTION:
            raise ValueError(
                f"--dataset-preset {self.dataset_preset} holds out {PRESET_VAL_FRACTION:.0%} of train as the "
                f"reference does; drop --val-fraction {self.val_fraction} or the preset"
            )

    @property
    def preset(self) -> DatasetPreset | None:
        return DATASET_PRESETS[self.dataset_preset] if self.dataset_preset else None


@dataclass
class VLMInputArguments:
    """What the VLM is shown: the chat prompts (`EmoVLMKDConfig` fields, the reference's by default) and the image
    size cap. One setting for every stage that has it: stage 1 trains the VLM on these prompts and images, stage 3
    scores (and caches features) with them, and the exported config and image processor keep them."""

    AFFECTS: ClassVar[dict[str, Affects]] = {
        "system_message": VLM_FEATURES | MODEL_CONFIG,
        "observation_prompt": RESULT | MODEL_CONFIG,  # stage 1 and `explain`, not the scored features
        "inference_prompt": RESULT | MODEL_CONFIG,
        "classification_prompt": VLM_FEATURES | MODEL_CONFIG,
        "classification_example_labels": VLM_FEATURES | MODEL_CONFIG,
        "answer_format": VLM_FEATURES | MODEL_CONFIG,
        "max_image_side": VLM_FEATURES | CARD,  # the exported image processor's, not the config's
    }

    system_message: str = field(
        default=EmoVLMKDConfig.system_message, metadata={"help": "System turn of every chat ('': none)"}
    )
    observation_prompt: str = field(
        default=EmoVLMKDConfig.observation_prompt, metadata={"help": "Observation task's user turn (stage 1)"}
    )
    inference_prompt: str = field(
        default=EmoVLMKDConfig.inference_prompt, metadata={"help": "Inference task's user turn (stage 1)"}
    )
    classification_prompt: str = field(
        default=EmoVLMKDConfig.classification_prompt,
        metadata={"help": "Classification turn: <num_labels>, <label_list>, <example_label_1|2> are filled in"},
    )
    classification_example_labels: list[str] | None = field(
        default=None, metadata={"help": "The two classes of the prompt's example answers (default: the reference's)"}
    )
    answer_format: str = field(
        default=EmoVLMKDConfig.answer_format, metadata={"help": "The scored answer; <label> is replaced by a class"}
    )
    max_image_side: int = field(
        default=DEFAULT_MAX_IMAGE_SIDE,
        metadata={
            "help": "Images are shrunk (LANCZOS) to this longest side for the VLM, as the reference does; 0: none"
        },
    )

    def prompt_settings(self) -> dict:
        """The prompt fields as `EmoVLMKDConfig` keyword arguments."""
        return {name: getattr(self, name) for name in PROMPT_FIELDS}

    def vlm_input_settings(self) -> dict:
        """Every field: what a VLM trained or scored with these settings was shown."""
        return {name: getattr(self, name) for name in VLM_INPUT_FIELDS}


# Every field of VLMInputArguments (what a VLM trained or scored with them was shown), and the config's among them.
VLM_INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(VLMInputArguments))
PROMPT_FIELDS = fields_with(VLMInputArguments, MODEL_CONFIG)


@dataclass
class VLMBranchArguments:
    """How the VLM branch answers (`EmoVLMKDConfig` fields): exactly scored answers (this package's default), or
    generation parsed into a one-hot answer, greedy or sampled as the reference does."""

    AFFECTS: ClassVar[dict[str, Affects]] = {
        "vlm_branch_mode": VLM_FEATURES | MODEL_CONFIG | CARD,
        "max_new_tokens": VLM_FEATURES | MODEL_CONFIG | CARD,
        "generate_do_sample": VLM_FEATURES | MODEL_CONFIG | CARD,
        "generate_temperature": VLM_FEATURES | MODEL_CONFIG | CARD,
        "generate_top_p": VLM_FEATURES | MODEL_CONFIG | CARD,
        "generate_top_k": VLM_FEATURES | MODEL_CONFIG | CARD,
        "head_input_deepstack": VLM_FEATURES | MODEL_CONFIG | CARD,  # what the cache keeps per image
    }

    vlm_branch_mode: Literal[VLM_BRANCH_MODES] = field(
        default=EmoVLMKDConfig.vlm_branch_mode, metadata={"help": "Exact answer scoring, or the paper's generation"}
    )
    max_new_tokens: int = field(
        default=EmoVLMKDConfig.max_new_tokens, metadata={"help": "Generation budget of the 'generate' mode"}
    )
    generate_do_sample: bool = field(
        default=EmoVLMKDConfig.generate_do_sample,
        metadata={"help": "'generate' mode: sample (the reference's, seeded by --seed) instead of greedy decoding"},
    )
    generate_temperature: float = field(
        default=EmoVLMKDConfig.generate_temperature, metadata={"help": "Sampling temperature (the reference's)"}
    )
    generate_top_p: float = field(
        default=EmoVLMKDConfig.generate_top_p, metadata={"help": "Nucleus sampling mass (the reference's)"}
    )
    generate_top_k: int | None = field(
        default=EmoVLMKDConfig.generate_top_k,
        metadata={
            "help": "Top-k of sampling: default the VLM's generation config's (Qwen2-VL: 1, which makes the "
            "reference's sampling greedy); 0 turns it off (true sampling)"
        },
    )
    head_input_deepstack: bool = field(
        default=EmoVLMKDConfig.head_input_deepstack,
        metadata={
            "help": "Qwen3-VL only: the head's input is the pooled image embeddings concatenated with the pooled "
            "deepstack levels (default: the pooled image embeddings alone, as the paper)"
        },
    )


@dataclass
class CheckpointArguments:
    """Epoch checkpoints of a training stage (`accelerator.save_state`), for resuming an interrupted run."""

    AFFECTS: ClassVar[dict[str, Affects]] = {
        "resume": NOTHING,
        "stop_after_epoch": NOTHING,
        "checkpoint_every": NOTHING,
        "keep_checkpoints": NOTHING,
    }

    resume: bool = field(
        default=False, metadata={"help": "Continue from the latest epoch checkpoint of this stage, if it matches"}
    )
    stop_after_epoch: int | None = field(
        default=None, metadata={"help": "Stop after this many epochs (checkpointed; resume later)"}
    )
    checkpoint_every: int = field(default=1, metadata={"help": "Save a checkpoint every N epochs"})
    keep_checkpoints: int = field(default=1, metadata={"help": "Epoch checkpoints to keep (latest first)"})


def training_arguments_class(
    name: str, learning_rate: float, weight_decay: float, epochs: int, batch_size: int, optimizer: str = "Adam"
) -> type:
    """A dataclass of the settings every training stage has, with that stage's defaults (the paper's): a base class
    of the stage's arguments, on top of [`CheckpointArguments`]."""
    shared = [
        ("learning_rate", float, field(default=learning_rate, metadata={"help": f"{optimizer} learning rate"})),
        ("weight_decay", float, field(default=weight_decay, metadata={"help": f"{optimizer} weight decay"})),
        ("epochs", int, field(default=epochs, metadata={"help": "Passes over the training data"})),
        (
            "batch_size",
            int,
            field(
                default=batch_size,
                metadata={"help": "Batch size: per process in stages 1-2, global in 3-4 (docs/multi-gpu.md)"},
            ),
        ),
    ]
    affects = {name: RESULT for name, _, _ in shared}
    return dataclasses.make_dataclass(name, shared, bases=(CheckpointArguments,), namespace={"AFFECTS": affects})


training_arguments = training_arguments_class  # the former name, kept for code written against it


REDACTED = "<redacted>"


def url_credentials(url: str | None) -> list[str]:
    """The user name and password written into a URL (`https://user:password@host/...`), if any."""
    if not url or "@" not in url:
        return []
    parts = urllib.parse.urlsplit(url)
    return [urllib.parse.unquote(part) for part in (parts.username, parts.password) if part]


def without_url_credentials(url: str) -> str:
    """`url` with the credentials of its `user:password@` part replaced by `<redacted>`."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.netloc.rsplit('@', 1)[1]}"))


def recordable(instance) -> dict:
    """An argument dataclass as a dict to write or log: the fields its class lists in `SECRETS` (credentials) and
    the credentials of URLs are redacted."""
    values = dataclasses.asdict(instance)
    for name in getattr(type(instance), "SECRETS", ()):
        if values.get(name) is not None:
            values[name] = REDACTED
    for name, value in values.items():
        if isinstance(value, str) and url_credentials(value):
            values[name] = without_url_credentials(value)
    return values


def settings_dict(*arguments) -> dict:
    """The fields of argument dataclasses as one flat dict (for trackers and COMPLETE.json), secrets redacted."""
    merged = {}
    for instance in arguments:
        merged.update(recordable(instance))
    return merged


def stage_parser(module):
    """`HfArgumentParser` of a stage module: its `RunArguments` and `ARGUMENTS`, plus `--config`."""
    from transformers import HfArgumentParser

    description = (module.__doc__ or "").split("\n\n")[0]
    parser = HfArgumentParser((RunArguments, module.ARGUMENTS), description=description)
    parser.add_argument(
        "--config", default=None, help="Recipe (YAML/JSON file or shipped name): its run, all and stage sections"
    )
    return parser


def parse_stage_args(module, argv=None):
    """`(RunArguments, stage arguments)` from a stage's command line (`--config` recipe values as defaults)."""
    parser = stage_parser(module)
    config = parser.parse_known_args(argv)[0].config
    if config:
        recipe = load_recipe(config)
        parser.set_defaults(**stage_values(recipe, module.STAGE, module.ARGUMENTS), **recipe.get("run", {}))
    run_args, stage_args = parser.parse_args_into_dataclasses(argv)[:2]
    return run_args, stage_args


def load_recipe(name_or_path: str) -> dict:
    """A recipe file's contents (YAML or JSON), checked for unknown sections; `name_or_path` may be the name of a
    recipe shipped in `emovlm_kd/recipes/` (`quickstart`, ...)."""
    import yaml

    from emovlm_kd.run_dir import STAGES

    path = Path(name_or_path)
    shipped = not path.is_file() and (RECIPES_DIR / f"{name_or_path}.yaml").is_file()
    if shipped:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"Recipe {name_or_path!r} is neither a file nor a shipped recipe ({available})")
    text = path.read_text()
    recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    recipe = recipe or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {str(path)!r} must be a mapping of sections, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(RECIPE_SECTIONS) - set(STAGES))
    if unknown:
        raise ValueError(
            f"Recipe {str(path)!r} has unknown section(s) {unknown}; known: {[*RECIPE_SECTIONS, *STAGES]}"
        )
    recipe["run"] = coerce_values(RunArguments, recipe.get("run") or {}, f"{path.name}: run")
    # a written run_config.yaml keeps the name of the recipe it resolved
    recipe["run"].setdefault("recipe_name", name_or_path if shipped else path.stem)
    return recipe


def stage_values(recipe: dict, stage: str, arguments_class, overrides: dict | None = None) -> dict:
    """A stage's settings from a recipe: its `all` section (fields the stage has), its own section, `overrides`."""
    names = field_names(arguments_class)
    values = {key: value for key, value in (recipe.get("all") or {}).items() if key.replace("-", "_") in names}
    values.update(recipe.get(stage) or {})
    values.update(overrides or {})
    return coerce_values(arguments_class, values, stage)


def overrides_of(arguments_class):
    """A dataclass with the fields of `arguments_class`, all optional with default None: parsed from a command line
    whose options must override a recipe only when given (None means not given)."""
    hints = typing.get_type_hints(arguments_class)
    fields = []
    for original in dataclasses.fields(arguments_class):
        default = original.default if original.default is not dataclasses.MISSING else original.default_factory()
        help_text = f"{original.metadata.get('help', '')} (default: {default})"
        fields.append((original.name, hints[original.name] | None, field(default=None, metadata={"help": help_text})))
    return dataclasses.make_dataclass(f"{arguments_class.__name__}Overrides", fields)


def field_names(arguments_class) -> set[str]:
    return {f.name for f in dataclasses.fields(arguments_class) if f.init}


def coerce_values(arguments_class, values: dict, where: str) -> dict:
    """Recipe values converted to the dataclass's field types; an unknown field or a bad value is a clear error."""
    hints = typing.get_type_hints(arguments_class)
    names = field_names(arguments_class)
    coerced = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"{where}: unknown setting {key!r}; settings here: {sorted(names)}")
        try:
            coerced[name] = _coerce(hints[name], value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: setting {key!r}: {error}") from None
    return coerced


def _coerce(kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        return _coerce(next(arg for arg in args if arg is not type(None)), value)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not one of {list(args)}")
        return value
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(args[0], item) for item in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1"):
            return True
        if str(value).lower() in ("false", "no", "0"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{value!r} is not a string")
        return str(value)
    return value


__all__ = [
    "CheckpointArguments",
    "DATASET_PRESETS",
    "DatasetPreset",
    "PRESET_SPLIT_SEED",
    "PROMPT_FIELDS",
    "RECIPES_DIR",
    "REDACTED",
    "RunArguments",
    "VLMBranchArguments",
    "VLMInputArguments",
    "VLM_INPUT_FIELDS",
    "coerce_values",
    "field_names",
    "load_recipe",
    "overrides_of",
    "recordable",
    "parse_stage_args",
    "settings_dict",
    "stage_parser",
    "stage_values",
    "training_arguments",
    "training_arguments_class",
    "url_credentials",
    "without_url_credentials",
]
