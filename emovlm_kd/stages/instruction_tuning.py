"""Stage 1: LoRA instruction tuning of the VLM (observation, inference and classification tasks), merged for export.

LoRA (`peft`) on the language model's attention projections only (q, k, v, o; the vision tower, embeddings and LM
head stay as they are), the paper's hyper-parameters by default (r=8, alpha=8, dropout 0.05; lr 1e-4, 5 epochs,
constant schedule with 3% warm-up, max grad norm 0.3). The loss covers answer tokens only (`--loss-on all`: the
whole sequence but padding and image tokens, as the reference). The prompts and the image size cap are the shared
`VLMInputArguments` (the reference's by default): what stage 3 scores with must be what the VLM was tuned on.
Without instruction data (no `instruction_data.jsonl`, or `--classification-only`) the classification task trains
alone, and the log and summary say so.

Accelerate runs it on any setup (`accelerate launch`, multi-GPU, mixed precision: bf16 by default on GPUs that have
it, as in the paper); `--batch-size` is the global batch, right-padded. `--load-in-4bit` loads the base in 4-bit NF4
(QLoRA, as the paper does; CUDA and bitsandbytes only). Epoch checkpoints (`save_state`: the LoRA adapter as
safetensors, optimizer, scheduler, sampler and RNG states) go to `<run_dir>/checkpoints/instruction_tuning/`;
`--resume` continues from the latest one written for the same inputs, `--stop-after-epoch N` stops after one. At
the end the adapter is merged into the VLM (`merge_and_unload`; with `--load-in-4bit`, into a fresh bf16 copy of the
base) and the merged VLM and its processor are saved with `save_pretrained` to `<run_dir>/vlm/`, then its marker
`<run_dir>/vlm.COMPLETE.json`; the checkpoints are then removed.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from emovlm_kd.arguments import VLM_INPUT_FIELDS, VLMInputArguments, training_arguments
from emovlm_kd.cache import vlm_identity
from emovlm_kd.checkpoints import checkpoint_root, end_epoch, resume_if_asked
from emovlm_kd.instruction_records import done_examples
from emovlm_kd.instruction_tasks import LOSS_ON, TASKS, InstructionDataset, InstructionEncoder, build_examples
from emovlm_kd.run_dir import fault_point, file_digest, hash_json, read_json, stage_output, write_atomic
from emovlm_kd.sources import source_hash
from emovlm_kd.training import begin_stage, close_trackers, complete_stage, train_one_epoch

logger = logging.getLogger(__name__)

STAGE = "instruction_tuning"
# The language model's attention projections, never the vision tower's (`visual.blocks.*.attn.qkv/proj`).
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
TRAINING_LOG = "training_log.json"  # per-epoch losses, next to an epoch checkpoint
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class InstructionTuningArguments(
    VLMInputArguments,
    training_arguments(
        "InstructionTraining", learning_rate=1e-4, weight_decay=0.0, epochs=5, batch_size=1, optimizer="AdamW"
    ),
):
    vlm: str = field(
        default="Qwen/Qwen2-VL-7B-Instruct", metadata={"help": "Base VLM: Hub name, local folder, or 'tiny' (offline)"}
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
# Settings the tuned VLM depends on (not the checkpointing or the memory-saving switches).
FINGERPRINT_FIELDS = (
    "classification_only",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "weight_decay",
    "epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "max_grad_norm",
    "max_answer_tokens",
    "loss_on",
    "load_in_4bit",
    "full_size_images",
    "tf32",
    *VLM_INPUT_FIELDS,
)


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
    if args.vlm == "tiny":
        raise ValueError("--load-in-4bit loads a saved checkpoint; the built-in 'tiny' VLM is not one")
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
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(vlm, config)


def export_merged(peft_model, processor, output: Path, base_loader=None):
    """Merge the LoRA adapter into the VLM (`merge_and_unload`) and save it and its processor to `output`.

    `base_loader`: returns a fresh full-precision base VLM to merge into instead of the model's own base (for a
    4-bit base, where merging into quantised weights would round the update away).
    """
    if output.exists():
        shutil.rmtree(output)
    if base_loader is None:
        merged = peft_model.merge_and_unload()
    else:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter_dir:
            peft_model.save_pretrained(adapter_dir)
            merged = PeftModel.from_pretrained(base_loader(), adapter_dir).merge_and_unload()
    merged.eval().save_pretrained(output)
    processor.save_pretrained(output)
    return merged


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


def _write_training_log(accelerator, run_dir, epochs_done: int, log: dict):
    """Next to an epoch checkpoint (when one was written): the losses so far, for the summary of a resumed run."""
    path = checkpoint_root(run_dir, STAGE) / f"epoch_{epochs_done}"
    if accelerator.is_main_process and path.is_dir():
        write_atomic(path / TRAINING_LOG, json.dumps(log) + "\n")


def _read_training_log(run_dir, epochs_done: int) -> dict:
    path = checkpoint_root(run_dir, STAGE) / f"epoch_{epochs_done}" / TRAINING_LOG
    log = read_json(path, "training log") if epochs_done else None
    return log or {"epoch_losses": [None] * epochs_done, "global_step": None}


def warmup_schedule(optimizer, args: InstructionTuningArguments, updates_per_epoch: int):
    """`(scheduler, warm-up length)`: a constant learning rate after a linear warm-up over `warmup_ratio` of all
    optimizer updates. Prepared by an Accelerator with `split_batches=True`, the scheduler steps once per update
    whatever the number of processes, so the warm-up is the same number of updates on 1 or N processes."""
    from transformers import get_constant_schedule_with_warmup

    warmup_steps = math.ceil(args.warmup_ratio * updates_per_epoch * args.epochs)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps), warmup_steps


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
        run_args, args, STAGE, fingerprint, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    accelerator, data = stage_run.accelerator, stage_run.data
    explanations, note = _describe_instruction_data(run_args, args, data, data.class_names)
    (logger.info if explanations else logger.warning)(f"Instruction tuning: {note}")

    vlm, processor = load_base_vlm(args, run_args.seed, accelerator.local_process_index)
    model = add_lora(vlm, args)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    encoder = InstructionEncoder(
        processor,
        data.class_names,
        args.max_answer_tokens,
        max_image_side=0 if args.full_size_images else args.max_image_side,
        loss_on=args.loss_on,
        **args.prompt_settings(),
    )
    examples = build_examples(data.column("train", "label"), explanations)
    task_counts = {task: sum(example.task == task for example in examples) for task in TASKS}
    dataloader = torch.utils.data.DataLoader(
        InstructionDataset(examples, encoder, functools.partial(data.image, "train")),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=encoder.collate,
        num_workers=run_args.num_workers,
    )
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    scheduler, warmup_steps = warmup_schedule(optimizer, args, updates_per_epoch)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    _adapter_checkpoint_hooks(accelerator)

    epochs_done = resume_if_asked(accelerator, run_args.run_dir, args, STAGE, stage_run.fingerprint)
    log = _read_training_log(run_args.run_dir, epochs_done)
    epoch_losses, global_step = list(log["epoch_losses"]), log["global_step"] or epochs_done * updates_per_epoch
    parameters = {
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
    }
    logger.info(
        f"Training {parameters['trainable']:,} LoRA parameters of {parameters['total']:,} on {len(examples)} "
        f"examples {task_counts}: {updates_per_epoch} updates/epoch, {args.epochs} epochs, {warmup_steps} warm-up"
    )

    def log_update(loss, bar):
        nonlocal global_step
        global_step += 1
        accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=global_step)
        bar.set_postfix(loss=f"{loss.item():.4f}")

    started = time.time()
    for epoch in range(epochs_done, args.epochs):
        dataloader.set_epoch(epoch)
        epoch_losses.append(
            train_one_epoch(
                accelerator,
                model,
                dataloader,
                optimizer,
                lambda model, batch: model(**batch).loss,
                desc=f"Instruction tuning epoch {epoch + 1}/{args.epochs}",
                scheduler=scheduler,
                max_grad_norm=args.max_grad_norm,
                on_update=log_update,
            )
        )
        accelerator.log({"train/epoch_loss": epoch_losses[-1]}, step=global_step)
        logger.info(f"Instruction tuning epoch {epoch + 1}/{args.epochs}: mean loss {epoch_losses[-1]:.4f}")
        stop = end_epoch(accelerator, run_args.run_dir, args, STAGE, stage_run.fingerprint, epoch + 1, args.epochs)
        training_log = {"epoch_losses": epoch_losses, "global_step": global_step}
        _write_training_log(accelerator, run_args.run_dir, epoch + 1, training_log)
        fault_point(f"{STAGE}-epoch-{epoch + 1}")
        if stop:
            close_trackers(accelerator)
            stage_run.release()
            return {"stage": STAGE, "stopped": True, "epochs_done": epoch + 1, "epoch_losses": epoch_losses}

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
        "global_steps": global_step,
        "resumed_after_epochs": epochs_done,
        "train_seconds": round(time.time() - started, 1),
    }

    def save_merged(output: Path):
        base_loader = None
        if args.load_in_4bit:
            from emovlm_kd.vlm import load_vlm_and_processor

            base_loader = lambda: load_vlm_and_processor(args.vlm, dtype=torch.bfloat16)[0]  # noqa: E731
        export_merged(accelerator.unwrap_model(model), processor, output, base_loader)
        logger.info(f"Saved the instruction-tuned VLM (adapter merged) and its processor to {str(output)!r}")

    accelerator.wait_for_everyone()
    complete_stage(stage_run, save_merged, summary=summary)
    print(f"Instruction tuning ({note}): epoch losses {[round(x, 4) for x in epoch_losses if x is not None]}")
    return summary


__all__ = [
    "ARGUMENTS",
    "STAGE",
    "InstructionTuningArguments",
    "add_lora",
    "export_merged",
    "fingerprint",
    "run",
    "warmup_schedule",
]
