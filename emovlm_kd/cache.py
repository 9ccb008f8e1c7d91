"""Per-image features for stages 3-5, computed once and cached on disk.

Everything upstream of the head and the gate is frozen, so per image and split we cache
  * from one pass of the VLM: the pooled LM-ready image embeddings (the head's input) and the log-likelihood of
    every class answer (the VLM branch; plus the generated one-hot answer in `generate` mode), and
  * from the teacher: its logits (eval transform).
Files are `<run_dir>/cache/{vlm,teacher}-<split>-<key>.safetensors`; the key hashes everything the features depend
on (which VLM / teacher and the run's stage fingerprint of it, prompts, answers and image cap, generation settings,
the split's files), so a changed model, teacher or dataset gets new files and an unchanged one reuses them across
epochs, stages and re-runs. Sampled answers (`generate` mode with `generate_do_sample`) are drawn from one generator
per image, seeded by the run's seed, the sample's number and the image's index: the same answers for any feature batch
size and any number of processes (neither is in the key). Sample 0 is the one every stage uses; the gate can draw a
fresh sample per epoch (`FeatureCache.get(..., sample=epoch)`), as the reference does.
"""

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file, save_file

from emovlm_kd.arguments import VLMBranchArguments, VLMInputArguments
from emovlm_kd.processes import progress
from emovlm_kd.run_dir import fault_point, hash_json, read_complete, stage_output, temporary_path
from emovlm_kd.seeding import derived_seed
from emovlm_kd.settings import MODEL_CONFIG, VLM_FEATURES, fields_with

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
# Model config fields the VLM features depend on (declared `VLM_FEATURES | MODEL_CONFIG`; the rest of the config only
# concerns the head and the gate, the observation and inference prompts only stage 1 and `explain`). The image cap,
# the dtype and the VLM itself are the spec's own entries.
VLM_FEATURE_FIELDS = fields_with(VLMInputArguments, VLM_FEATURES | MODEL_CONFIG) + fields_with(
    VLMBranchArguments, VLM_FEATURES | MODEL_CONFIG
)


def model_identity(model: str) -> dict:
    """What identifies a model's weights cheaply and wherever they lie: a folder's file names, sizes and sampled
    contents, or a Hub name."""
    if os.path.isdir(model):
        files = sorted(p for p in Path(model).iterdir() if p.is_file())
        return {"files": [[p.name, p.stat().st_size, _sampled_digest(p)] for p in files]}
    return {"name": model}


def vlm_identity(run_dir, vlm: str, instruction_tuned: bool = False) -> dict:
    """What identifies a VLM's weights: the run's stage-1 fingerprint, else `model_identity`."""
    if instruction_tuned:
        return {"instruction_tuned": read_complete(run_dir, "instruction_tuning")["fingerprint"]}
    return model_identity(vlm)


def _sampled_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's first and last MiB: content identity at a fixed cost, also for multi-GB weights."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        digest.update(file.read(chunk))
        file.seek(max(0, path.stat().st_size - chunk))
        digest.update(file.read(chunk))
    return digest.hexdigest()[:16]


def samples_answers(spec: dict) -> bool:
    """Whether the VLM features of a head spec hold sampled (random) generated answers."""
    config = spec["model_config"]
    return config.get("vlm_branch_mode") == "generate" and bool(config.get("generate_do_sample"))


def vlm_feature_key(spec: dict, split_hash: str, sample: int = 0) -> str:
    return hash_json(
        {
            "vlm": spec["vlm_identity"],
            "dtype": spec.get("vlm_dtype"),
            "classes": spec["class_names"],
            "config": {k: spec["model_config"].get(k) for k in VLM_FEATURE_FIELDS},
            "max_image_side": spec.get("max_image_side"),
            "sample": [spec.get("generation_seed"), sample] if samples_answers(spec) else None,
            "split": split_hash,
        }
    )


def teacher_feature_key(teacher_fingerprint: str, split_hash: str) -> str:
    return hash_json({"teacher": teacher_fingerprint, "split": split_hash})


def cache_file(run_dir, kind: str, split: str, key: str) -> Path:
    return Path(run_dir) / CACHE_DIR / f"{kind}-{split}-{key}.safetensors"


def read_cache(path: Path, num_examples: int) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    try:
        tensors = load_file(path)
    except Exception as error:  # a partial write from a killed run: recompute
        logger.warning(f"Ignoring unreadable feature cache {str(path)!r}: {error}")
        return None
    if any(t.shape[0] != num_examples for t in tensors.values()):
        logger.warning(f"Ignoring feature cache {str(path)!r}: wrong number of examples")
        return None
    return tensors


def write_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict):
    """Written to a unique temporary name and renamed into place: an interrupted write leaves no cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tensors = {name: value.contiguous() for name, value in tensors.items()}
    try:
        save_file(tensors, tmp, metadata={"info": json.dumps(metadata, default=str)})
        fault_point("cache-write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Images(torch.utils.data.Dataset):
    def __init__(self, image_of, indices):
        self.image_of, self.indices = image_of, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        return index, self.image_of(index)


class _VLMAndTeacherInputs:
    """Decode once, build the inputs of each model that needs them (VLM prompt + patches, teacher pixels)."""

    def __init__(self, image_processor=None, teacher_transform=None):
        self.image_processor, self.teacher_transform = image_processor, teacher_transform

    def __call__(self, items):
        indices, images = zip(*items)
        batch = {"index": torch.tensor(indices)}
        if self.image_processor is not None:
            batch["vlm_inputs"] = self.image_processor(list(images), return_tensors="pt")
        if self.teacher_transform is not None:
            batch["teacher_pixels"] = torch.stack([self.teacher_transform(image) for image in images])
        return batch


@torch.no_grad()
def vlm_features(model, inputs, generator=None) -> dict[str, torch.Tensor]:
    """One vision pass: pooled image embeddings and the class-answer log-likelihoods (+ generated one-hot, sampled
    from `generator`, or from one generator per image, when the config samples)."""
    image_embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
    branch = (inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    features = {
        "image_embeds": model.pool_image_embeds(image_embeds).float(),
        "vlm_log_likelihoods": model.score_answers(*branch, image_embeds).float(),
    }
    if model.config.vlm_branch_mode == "generate":
        features["vlm_generated"] = model.generate_answers(*branch, image_embeds, generator=generator)[0].float()
    return features


@torch.no_grad()
def extract_features(
    accelerator,
    image_of,
    num_images: int,
    model=None,
    image_processor=None,
    teacher=None,
    teacher_transform=None,
    batch_size: int = 8,
    num_workers: int = 0,
    desc: str = "Features",
    seed_keys: tuple[int, ...] = (0,),
) -> dict[str, torch.Tensor]:
    """Features of the images `image_of(0)`, ..., `image_of(num_images - 1)` (decoded RGB images, e.g. a split of
    the run's data), in order; the work is split across processes and gathered on all. The sampled answer of image
    `i` comes from a generator seeded by `seed_keys` and `i`, whatever the batch and the process it falls in."""
    # Accelerate shards the batches (process k takes every N-th one) and pads the last round with images from the
    # start; `gather_for_metrics` puts the rounds back in order and drops that padding.
    loader = prepare_data_loader(
        torch.utils.data.DataLoader(
            _Images(image_of, list(range(num_images))),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_VLMAndTeacherInputs(
                image_processor if model is not None else None, teacher_transform if teacher else None
            ),
        ),
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=False,
    )
    outputs: dict[str, list[torch.Tensor]] = {}
    for batch in progress(accelerator, loader, desc=desc, leave=False):
        computed = {"index": batch["index"].to(accelerator.device)}
        if model is not None:
            inputs = batch["vlm_inputs"].to(accelerator.device)
            generators = [
                torch.Generator(accelerator.device).manual_seed(derived_seed(*seed_keys, int(index)))
                for index in batch["index"]
            ]
            computed.update(vlm_features(model, inputs, generators))
        if teacher is not None:
            computed["teacher_logits"] = teacher(batch["teacher_pixels"].to(accelerator.device)).float()
        for name, value in accelerator.gather_for_metrics(computed).items():
            outputs.setdefault(name, []).append(value.cpu())
    features = {name: torch.cat(values) for name, values in outputs.items()}
    if not torch.equal(features.pop("index"), torch.arange(num_images)):
        raise RuntimeError("Feature extraction lost or duplicated images across processes")
    return features


class FeatureCache:
    """The run's per-image features: `get(spec, splits, ...)` reads them from the cache, computing (one VLM pass and
    one teacher pass per image, across processes) and caching what is missing.

    Models are loaded only when something is missing, and kept for later calls: a fresh sample every epoch of gate
    training loads the VLM once. `batch_size` is the images per forward of the extraction (any value gives the same
    features, sampled answers included).
    """

    def __init__(self, accelerator, run_dir, data, batch_size: int = 8, num_workers: int = 0):
        self.accelerator, self.run_dir, self.data = accelerator, run_dir, data
        self.batch_size, self.num_workers = batch_size, num_workers
        self.models: dict[str, tuple] = {}  # "vlm": (model, image processor), "teacher": (model, transform)

    def get(
        self, spec: dict, splits: list[str], teacher_fingerprint: str | None = None, sample: int = 0
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`{split: {image_embeds, vlm_log_likelihoods, [vlm_generated], [teacher_logits], labels}}`.

        `spec` describes the VLM features (stage 3's head spec); `teacher_fingerprint` is the run's stage-2
        fingerprint, when teacher logits are wanted; `sample` numbers the draw of sampled answers (0: the one every
        stage uses)."""
        features, missing = {}, {}
        for split in splits:
            features[split] = {"labels": torch.tensor(self.data.splits[split]["label"])}
            for kind, path in self._files(spec, split, teacher_fingerprint, sample).items():
                cached = read_cache(path, len(self.data.splits[split]))
                if cached is None:
                    missing.setdefault(split, {})[kind] = path
                else:
                    features[split].update(cached)
        if not missing:
            logger.info(f"Using cached features for {splits}")
            return features
        self._load_models({kind for todo in missing.values() for kind in todo}, spec)
        for split, todo in missing.items():
            features[split].update(self._compute(spec, split, todo, sample))
        return features

    def _files(self, spec: dict, split: str, teacher_fingerprint: str | None, sample: int) -> dict[str, Path]:
        split_hash = self.data.content_hash(split)
        files = {"vlm": cache_file(self.run_dir, "vlm", split, vlm_feature_key(spec, split_hash, sample))}
        if teacher_fingerprint is not None:
            key = teacher_feature_key(teacher_fingerprint, split_hash)
            files["teacher"] = cache_file(self.run_dir, "teacher", split, key)
        return files

    def _load_models(self, kinds: set[str], spec: dict):
        accelerator = self.accelerator
        if "vlm" in kinds and "vlm" not in self.models:
            from emovlm_kd.artifacts import spec_vlm
            from emovlm_kd.vlm import build_emovlm_kd

            with accelerator.main_process_first():
                model, image_processor, _ = build_emovlm_kd(
                    spec_vlm(self.run_dir, spec),
                    spec["class_names"],
                    dtype=spec.get("vlm_dtype", "auto"),
                    max_image_side=spec.get("max_image_side"),
                    **spec["model_config"],
                )
            self.models["vlm"] = (model.to(accelerator.device).eval(), image_processor)
        if "teacher" in kinds and "teacher" not in self.models:
            from emovlm_kd.teachers import load_teacher, teacher_transforms

            teacher = load_teacher(stage_output(self.run_dir, "teacher")).to(accelerator.device)
            self.models["teacher"] = (teacher, teacher_transforms(teacher)[1])

    def _compute(self, spec: dict, split: str, todo: dict[str, Path], sample: int) -> dict[str, torch.Tensor]:
        """The `todo` kinds of features of a split, computed on every process and written by the main one."""
        model, image_processor = self.models.get("vlm", (None, None))
        teacher, teacher_transform = self.models.get("teacher", (None, None))
        computed = extract_features(
            self.accelerator,
            functools.partial(self.data.image, split),
            len(self.data.splits[split]),
            model=model if "vlm" in todo else None,
            image_processor=image_processor,
            teacher=teacher if "teacher" in todo else None,
            teacher_transform=teacher_transform,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            desc=f"Caching {'+'.join(sorted(todo))} features of {split}",
            seed_keys=(spec.get("generation_seed") or 0, sample),
        )
        if self.accelerator.is_main_process:
            for kind, path in todo.items():
                names = ["teacher_logits"] if kind == "teacher" else [n for n in computed if n != "teacher_logits"]
                write_cache(path, {n: computed[n] for n in names}, {"split": split, "kind": kind, "spec": spec})
        self.accelerator.wait_for_everyone()
        return computed


__all__ = [
    "FeatureCache",
    "extract_features",
    "model_identity",
    "samples_answers",
    "vlm_feature_key",
    "vlm_features",
    "vlm_identity",
]
