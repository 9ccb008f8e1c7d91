"""Stage 1: LoRA instruction tuning of the VLM (observation, inference and classification tasks), merged for export.

LoRA (`peft`) on the language model's attention projections only (q, k, v, o; the vision tower, embeddings and LM
head stay as they are), the paper's hyper-parameters by default (r=8, alpha=8, dropout 0.05; lr 1e-4, 5 epochs,
constant schedule with 3% warm-up, max grad norm 0.3). The loss covers answer tokens only (`--loss-on all`: the
whole sequence but padding and image tokens, as the reference). The prompts and the image size cap are the shared
`VLMInputArguments` (the reference's by default): what stage 3 scores with must be what the VLM was tuned on.
Without instruction data (no `instruction_data.jsonl`, or `--classification-only`) the classification task trains
alone, and the log and summary say so.

Accelerate runs it on any setup (`accelerate launch`, multi-GPU, mixed precision: bf16 by default on GPUs that have it,
as in the paper); `--batch-size` is per process, right-padded (the transformers Trainer convention: an update is
`batch_size x gradient_accumulation_steps x processes` examples; see `emovlm_kd.batch_semantics`). `--load-in-4bit`
loads the base in 4-bit NF4 (QLoRA, as the paper does; CUDA and bitsandbytes only). Epoch checkpoints (`save_state`:
the LoRA adapter as safetensors, optimizer, scheduler, sampler and RNG states) go to
`<run_dir>/checkpoints/instruction_tuning/`; `--resume` continues from the latest one written for the same inputs,
`--stop-after-epoch N` stops after one. At the end the adapter is merged into the VLM (`merge_and_unload`; with
`--load-in-4bit`, into a fresh bf16 copy of the base) and the merged VLM and its processor are saved with
`save_pretrained` to `<run_dir>/vlm/`, then its marker `<run_dir>/vlm.COMPLETE.json`; the checkpoints are then removed.
"""

import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from accelerate.logging import get_logger

from emovlm_kd.arguments import VLMInputArguments, training_arguments_class
from emovlm_kd.batch_semantics import PER_PROCESS
from emovlm_kd.cache import vlm_identity
from emovlm_kd.epoch_loop import train_epochs
from emovlm_kd.instruction_records import done_examples
from emovlm_kd.instruction_tasks import LOSS_ON, TASKS, InstructionDataset, InstructionEncoder, build_examples
from emovlm_kd.processes import print_once
from emovlm_kd.run_dir import file_digest, hash_json, stage_output
from emovlm_kd.settings import CARD, CONTENT, NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import source_hash
from emovlm_kd.stage_lifecycle import begin_stage, complete_stage
from vlm_adapters_emovlm_kd import get_adapter

logger = get_logger(__name__)

STAGE = "instruction_tuning"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class InstructionTuningArguments(
    VLMInputArguments,
    training_arguments_class(
        "InstructionTraining", learning_rate=1e-4, weight_decay=0.0, epochs=5, batch_size=1, optimizer="AdamW"
    ),
):
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "vlm": CONTENT,  # by the weights' identity (`cache.vlm_identity`)
        "instruction_data": CONTENT,  # by the file's digest
        "classification_only": RESULT | CARD,
        "lora_r": RESULT | CARD,
        "lora_alpha": RESULT | CARD,
        "lora_dropout": RESULT,
        "gradient_accumulation_steps": RESULT,
        "warmup_ratio": RESULT,
        "max_grad_norm": RESULT,
        "max_answer_tokens": RESULT,
        "loss_on": RESULT | CARD,
        "load_in_4bit": RESULT | CARD,
        "gradient_checkpointing": NOTHING,
        "full_size_images": RESULT | CARD,
        "tf32": RESULT,  # TF32 matmuls change the numbers on GPU
    }

    vlm: str = field(
        default="Qwen/Qwen2-VL-7B-Instruct",
        metadata={"help": "Base VLM: Hub name, local folder, or 'tiny' / 'tiny-qwen3-vl' (offline)"},
    )
    instruction_data: str | None = field(
        default=None,
        metadata={"help": "Instruction data (JSONL of stage 0); default: <run_dir>/instruction_data.jsonl"},
    )
    classification_only: bool = field(default=False, metadata={"help": "Ignore instruction data"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer update"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warm-up share, then constant"})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping norm"})
    max_answer_tokens: int = field(default=512, metadata={"help": "Longer explanations are cut"})
    loss_on: Literal[LOSS_ON] = field(
        default="answer",
        metadata={"help": "Tokens in the loss: the answer's, or all but padding and image tokens (the reference's)"},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base (CUDA + bitsandbytes)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Less memory, more compute"})
    full_size_images: bool = field(
        default=False,
        metadata={
            "help": "Train on uncapped images (the VLM processor's own pixel limit), as the reference's stage 1 does, "
            "while stages 3-6 keep --max-image-side (default: this stage sees what scoring sees)"
        },
    )
    tf32: bool = field(
        default=False,
        metadata={"help": "TF32 matmuls and convolutions on NVIDIA GPUs (the reference's `tf32=True`); no-op on CPU"},
    )


ARGUMENTS = InstructionTuningArguments
# Settings the tuned VLM depends on (the base VLM and the instruction data by content).
FINGERPRINT_FIELDS = fingerprint_fields(InstructionTuningArguments)


def fingerprint(run_args, args: InstructionTuningArguments) -> str:
    """Hash of the data, the instruction data file and every setting the tuned VLM depends on."""
    path = instruction_data_path(run_args, args)
    instruction_digest = file_digest(path) if path.exists() and not args.classification_only else None
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            "instruction_data": instruction_digest,
            "seed": run_args.seed,
            "vlm": vlm_identity(run_args.run_dir, args.vlm),
            **{name: getattr(args, name) for name in FINGERPRINT_FIELDS},
        }
    )


def instruction_data_path(run_args, args: InstructionTuningArguments) -> Path:
    return Path(args.instruction_data or stage_output(run_args.run_dir, "instruction_data"))


def load_explanations(path: Path, data, class_names: list[str]):
    """Done instruction records by row of the training split (matched by the row's key), and how many records were
    unusable (label changed)."""
    records = done_examples(path)
    explanations, stale = {}, 0
    for row, label in enumerate(data.column("train", "label")):
        record = records.get(data.key("train", row))
        if record is None:
            continue
        if record.get("label") != class_names[label]:
            stale += 1
            continue
        explanations[row] = record
    return explanations, stale


def _describe_instruction_data(run_args, args, data, class_names) -> tuple[dict, str]:
    """The usable explanations by training row, and a sentence saying what the run trains on."""
    path = instruction_data_path(run_args, args)
    if args.classification_only:
        return {}, "classification only (--classification-only)"
    if not path.exists():
        return {}, f"classification only: no instruction data at {str(path)!r} (run stage 0 to add it)"
    explanations, stale = load_explanations(path, data, class_names)
    if stale:
        logger.warning(f"Ignored {stale} instruction record(s) whose label differs from the dataset's")
    if not explanations:
        return {}, f"classification only: {str(path)!r} has no usable record for these images"
    return explanations, f"instruction data for {len(explanations)} of {len(data.splits['train'])} training images"


def _mixed_precision(requested: str | None) -> str | None:
    if requested is not None or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return requested  # None lets Accelerate read its launch / config setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def _check_4bit(args):
    if not args.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise ValueError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); drop it to train on CPU")
    from emovlm_kd.vlm import is_tiny_vlm

    if is_tiny_vlm(args.vlm):
        raise ValueError(f"--load-in-4bit loads a saved checkpoint; the built-in {args.vlm!r} VLM is not one")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None


def load_base_vlm(args, seed: int, device_index: int = 0):
    """The base VLM and its processor (4-bit NF4 on GPU with `--load-in-4bit`)."""
    from emovlm_kd.vlm import load_vlm_and_processor

    if not args.load_in_4bit:
        return load_vlm_and_processor(args.vlm, seed=seed)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return load_vlm_and_processor(
        args.vlm, dtype=torch.bfloat16, quantization_config=quantization, device_map={"": device_index}
    )


def add_lora(vlm, args):
    """Wrap the VLM in a `PeftModel` with LoRA on the language model's q/k/v/o projections."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        vlm = prepare_model_for_kbit_training(vlm, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=get_adapter(vlm.config).lora_target_modules,  # the language model's q/k/v/o projections
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(vlm, config)


def export_merged(peft_model, processor, output: Path, base_loader=None, state_dict=None):
    """Merge the LoRA adapter into the VLM (`merge_and_unload`) and save it and its processor to `output`.

    `base_loader`: returns a fresh full-precision base VLM to merge into instead of the model's own base (for a
    4-bit base, where merging into quantised weights would round the update away, and for a sharded one).
    `state_dict`: the model's whole state when its own weights are sharded (FSDP, DeepSpeed ZeRO-3).
    """
    if output.exists():
        shutil.rmtree(output)
    if base_loader is None:
        merged = peft_model.merge_and_unload()
    else:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter_dir:
            peft_model.save_pretrained(adapter_dir, state_dict=state_dict)
            merged = PeftModel.from_pretrained(base_loader(), adapter_dir).merge_and_unload()
    merged.eval().save_pretrained(output)
    processor.save_pretrained(output)
    return merged


def gathered_state(accelerator, model) -> dict | None:
    """The model's whole state dict when Accelerate shards its weights (FSDP, DeepSpeed ZeRO-3), else None. A
    collective: every process calls it."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    return accelerator.get_state_dict(model) if sharded else None


def _adapter_checkpoint_hooks(accelerator):
    """Checkpoints hold the LoRA adapter (safetensors), not a copy of the frozen base."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if isinstance(model, PeftModel):
                model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
                if index < len(weights):
                    weights.pop(index)

    def load_hook(models, input_dir):
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if isinstance(model, PeftModel):
                state = load_file(os.path.join(input_dir, ADAPTER_WEIGHTS))
                result = set_peft_model_state_dict(model, state)
                if result.unexpected_keys:
                    raise ValueError(f"{input_dir!r} has unexpected adapter weights: {result.unexpected_keys[:5]}")
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def warmup_schedule(optimizer, args: InstructionTuningArguments, updates_per_epoch: int, num_processes: int = 1):
    """`(scheduler, warm-up length)`: a constant learning rate after a linear warm-up over `warmup_ratio` of all
    optimizer updates (`updates_per_epoch`: those of this launch). Prepared by an Accelerator with per-process
    batches, the scheduler steps `num_processes` times per update, hence a warm-up of that many times the updates
    (Accelerate's convention): the warm-up is `warmup_ratio` of the updates actually made, on 1 or N processes."""
    from transformers import get_constant_schedule_with_warmup

    warmup_steps = math.ceil(args.warmup_ratio * updates_per_epoch * args.epochs)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps * num_processes), warmup_steps


def _training_data(run_args, args, data, encoder, explanations):
    """The examples of the three tasks (counted per task) and their shuffled DataLoader of `batch_size` per process."""
    examples = build_examples(data.column("train", "label"), explanations)
    task_counts = {task: sum(example.task == task for example in examples) for task in TASKS}
    loader = torch.utils.data.DataLoader(
        InstructionDataset(examples, encoder, functools.partial(data.image, "train")),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=encoder.collate,
        num_workers=run_args.num_workers,
    )
    return examples, task_counts, loader


def _prepare_training(stage_run, args, model, loader):
    """AdamW on the LoRA weights and the warm-up schedule, prepared with the model and loader (in one call, as
    DeepSpeed wants); adapter checkpoints. Returns (model, optimizer, loader, scheduler, warm-up updates)."""
    accelerator = stage_run.accelerator
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    batches_per_process = math.ceil(len(loader) / accelerator.num_processes)  # as the prepared loader deals them
    updates_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    scheduler, warmup_steps = warmup_schedule(optimizer, args, updates_per_epoch, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    _adapter_checkpoint_hooks(accelerator)
    return model, optimizer, loader, scheduler, warmup_steps


def _save_merged(accelerator, args, model, processor):
    """`save_outputs` of the stage: the adapter merged into the VLM (into a fresh bf16 base under `--load-in-4bit`
    or when the weights are sharded, with the adapter gathered from every process first)."""
    state_dict = gathered_state(accelerator, model)  # on every process, before the main one saves

    def save(output: Path):
        base_loader = None
        if args.load_in_4bit or state_dict is not None:
            from emovlm_kd.vlm import load_vlm_and_processor

            base_loader = lambda: load_vlm_and_processor(args.vlm, dtype=torch.bfloat16)[0]  # noqa: E731
        export_merged(accelerator.unwrap_model(model), processor, output, base_loader, state_dict)
        logger.info(f"Saved the instruction-tuned VLM (adapter merged) and its processor to {str(output)!r}")

    return save


def _allow_tf32(tf32: bool):
    """What `TrainingArguments(tf32=True)` of the reference sets (train_vlm.py:100), on NVIDIA GPUs only."""
    if tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def run(run_args, args: InstructionTuningArguments) -> dict:
    """Instruction-tune the VLM; returns the summary (tasks, example counts, per-epoch losses, output)."""
    _check_4bit(args)
    _allow_tf32(args.tf32)
    run_args = dataclasses.replace(run_args, mixed_precision=_mixed_precision(run_args.mixed_precision))
    stage_run = begin_stage(
        run_args,
        args,
        STAGE,
        fingerprint,
        batch_semantics=PER_PROCESS,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    accelerator, data = stage_run.accelerator, stage_run.data
    explanations, note = _describe_instruction_data(run_args, args, data, data.class_names)
    (logger.info if explanations else logger.warning)(f"Instruction tuning: {note}")

    vlm, processor = load_base_vlm(args, run_args.seed, accelerator.local_process_index)
    model = add_lora(vlm, args)
    encoder = InstructionEncoder(
        processor,
        data.class_names,
        args.max_answer_tokens,
        max_image_side=0 if args.full_size_images else args.max_image_side,
        loss_on=args.loss_on,
        **args.prompt_settings(),
    )
    examples, task_counts, loader = _training_data(run_args, args, data, encoder, explanations)
    parameters = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
    model, optimizer, loader, scheduler, warmup_steps = _prepare_training(stage_run, args, model, loader)
    logger.info(
        f"Training {parameters['trainable']:,} LoRA parameters of {parameters['total']:,} on {len(examples)} "
        f"examples {task_counts}: {math.ceil(len(loader) / args.gradient_accumulation_steps)} updates/epoch, "
        f"{args.epochs} epochs, {warmup_steps} warm-up; {stage_run.batch.describe()}"
    )

    def log_update(loss, bar, updates: int):
        accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=updates)
        bar.set_postfix(loss=f"{loss.item():.4f}")

    started = time.time()
    _, stopped = train_epochs(
        stage_run,
        model,
        loader,
        optimizer,
        lambda model, batch: model(**batch).loss,
        scheduler=scheduler,
        max_grad_norm=args.max_grad_norm,
        on_update=log_update,
    )
    if stopped:
        return stopped
    epoch_losses = [metrics.get("train_loss") for metrics in stage_run.history]
    summary = {
        "stage": STAGE,
        "output": str(stage_output(run_args.run_dir, STAGE)),
        "vlm": args.vlm,
        "tasks": [task for task in TASKS if task_counts[task]],
        "instruction_data": note,
        "examples": task_counts,
        "parameters": parameters,
        "epochs": args.epochs,
        "epoch_losses": epoch_losses,
        "global_steps": stage_run.updates,
        "update": stage_run.batch.describe(),
        "resumed_after_epochs": stage_run.resumed_after_epochs,
        "train_seconds": round(time.time() - started, 1),
    }
    accelerator.wait_for_everyone()
    complete_stage(stage_run, _save_merged(accelerator, args, model, processor), summary=summary)
    print_once(f"Instruction tuning ({note}): epoch losses {[round(x, 4) for x in epoch_losses if x is not None]}")
    return summary


__all__ = [
    "ARGUMENTS",
    "STAGE",
    "InstructionTuningArguments",
    "add_lora",
    "export_merged",
    "fingerprint",
    "gathered_state",
    "run",
    "warmup_schedule",
]
