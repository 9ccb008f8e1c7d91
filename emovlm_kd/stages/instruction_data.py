"""Stage 0: emotion instruction data from a chat model with vision, through `huggingface_hub.InferenceClient`.

The model is served by any OpenAI-compatible API (`--base-url`: OpenAI, vLLM, TGI, ...) or by Hugging Face Inference
Providers (`--provider` with a Hub model id as `--model`, authenticated with an HF token); see `emovlm_kd.chat`.

For every training image the endpoint is shown the image and its true label and asked with the reference's template
(`prompt_template.txt` of the paper's code: the classes, the true label, one example) for (1) the key visual
elements (`observation`) and (2) the reasoning that leads to the emotion (`reasoning`), without naming the label.
Unlike the reference's free text, answers must be a JSON object with both fields as non-empty strings, and neither
may contain the label as a whole word (case-insensitive; `sad` does not count against `sadness`): an answer that
names the label would teach the VLM to write the label into its explanations, which the paper's prompt forbids.
Such answers, like malformed ones, are recorded as failures (with the reason and the raw answer) and asked again on
the next run.

Output `<run_dir>/instruction_data.jsonl`, one JSON record per line, appended (and flushed) as answers arrive:

    {"image": "train/awe/0001.jpg", "label": "awe", "status": "done", "observation": "...", "reasoning": "...",
     "model": "gpt-4o", "attempts": 1}
    {"image": "train/awe/0002.jpg", "label": "awe", "status": "failed", "reason": "...", "raw": "...", ...}

`image` is the row's key (`emovlm_kd.data.ImageData.key`): for an ImageFolder tree, the path relative to the
dataset folder; for a `datasets` source, `<split>[<row>]`. A re-run skips images whose latest record is `done` (for the
same label) and asks again for the others; at the end the file is rewritten with the latest record per image, so a
finished file holds exactly one record per image.
"""

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from configuration_emovlm_kd import label_pattern
from emovlm_kd.arguments import settings_dict
from emovlm_kd.chat import ChatClient, ChatRequestArguments, ChatRequestError, image_data_url
from emovlm_kd.instruction_records import read_records, reference_annotation_records, rewrite_records
from emovlm_kd.run_dir import (
    DataError,
    clear_complete,
    ensure_class_names,
    file_digest,
    hash_json,
    stage_output,
    write_complete,
)
from emovlm_kd.settings import CONTENT, NOTHING, RESULT, Affects, fingerprint_fields
from emovlm_kd.sources import has_source, load_source, source_hash
from emovlm_kd.training import preset_class_names

logger = logging.getLogger(__name__)

STAGE = "instruction_data"

# The reference's request (`generate_instruction.py`, `prompt_template.txt`): its system prompt, its template with
# the run's classes and the true label, and its one-shot example, asked for as JSON (the improvement: answers that
# parse reliably and are checked not to name the label).
SYSTEM_PROMPT = (
    "You are an expert in analyzing emotions expressed in images. You always answer with one JSON object and "
    "nothing else."
)

EXAMPLE_ANSWER = {
    "observation": (
        "The dark sky serves as a dramatic background, emphasizing people holding tools. Objects resembling "
        "agricultural tools appear threatening, creating tension. The synchronized movement of the crowd and strong "
        "silhouette effects contribute to a striking atmosphere. The high contrast highlights the shapes of the tools "
        "as primary visual elements."
    ),
    "reasoning": (
        "The crowd holding various tools suggests intense energy and the excitement of collective action. The "
        "silhouette contrasting with the dark sky evokes tension, potentially eliciting anxiety or fear. The "
        "threatening shapes of the tools and the collective behavior may hint at anger or hostility. The overall "
        "scene's organized yet uncertain atmosphere limits the possibility of comfort. There are no elements that "
        "evoke laughter or awe directly; the primary mood is one of focused energy and intensity."
    ),
}

INSTRUCTION_PROMPT = (
    "Write about the key elements of an image and the reasoning process behind inferring emotions based on the "
    "image and emotional information.\n\n"
    "The emotional information corresponds to the emotion category that best matches the image among the following "
    "{num_classes} categories:\n\n"
    "{classes}\n\n"
    "Base your response on the elements of the image that could lead to inferring this emotional information.\n\n"
    "Do not include the correct emotion category in your response. Instead, describe the key elements of the image "
    "and the reasoning process that could lead to the emotional inference.\n\n"
    "==Emotion Information==\n"
    "{label}\n"
    "==\n\n"
    'Please follow this format in your response: a JSON object whose string field "observation" holds 1. the key '
    'elements and whose string field "reasoning" holds 2. the reasoning, like this example for another image:\n'
    "{example}"
)


class MalformedAnswer(ValueError):
    """The endpoint answered, but not with what was asked (reason in the message)."""


def build_messages(image_url: str, label: str, class_names: list[str]) -> list[dict]:
    """The chat messages for one image (OpenAI vision format: a text part and an `image_url` part)."""
    prompt = INSTRUCTION_PROMPT.format(
        num_classes=len(class_names),
        classes=", ".join(class_names),
        label=label,
        example=json.dumps(EXAMPLE_ANSWER, ensure_ascii=False, indent=2),
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}],
        },
    ]


def _json_object(content: str):
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL | re.IGNORECASE)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start : end + 1])
            except json.JSONDecodeError:
                pass
    raise MalformedAnswer("the answer is not a JSON object")


def parse_answer(content: str, label: str) -> tuple[str, str]:
    """`(observation, reasoning)` from the endpoint's answer, or `MalformedAnswer` saying what is wrong."""
    answer = _json_object(content)
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"the answer is JSON {type(answer).__name__}, not an object")
    fields = []
    for name in ("observation", "reasoning"):
        value = answer.get(name)
        if not isinstance(value, str) or not value.strip():
            raise MalformedAnswer(f"field {name!r} is missing or not a non-empty string (got {value!r:.80})")
        fields.append(value.strip())
    pattern = label_pattern(label)
    for name, value in zip(("observation", "reasoning"), fields, strict=True):
        if pattern.search(value):
            raise MalformedAnswer(f"field {name!r} names the label {label!r}")
    return fields[0], fields[1]


OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass
class InstructionDataArguments(ChatRequestArguments):
    # A complete file depends on the endpoint's model and the images asked about; the request details do not
    # invalidate answers already recorded (a rerun asks again only for missing or failed ones).
    AFFECTS: ClassVar[dict[str, Affects]] = {
        "base_url": RESULT,
        "provider": RESULT,
        "model": RESULT,
        "api_key_env": NOTHING,
        "max_tokens": NOTHING,
        "temperature": NOTHING,
        "json_mode": NOTHING,
        "max_image_side": NOTHING,
        "limit": RESULT,
        "import_annotations": CONTENT,  # hashed by the file's digest
    }

    base_url: str | None = field(
        default=None,
        metadata={"help": f"OpenAI-compatible API base URL, e.g. a vLLM or TGI server (default: {OPENAI_BASE_URL})"},
    )
    provider: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face Inference Providers instead of a base URL: a provider (together, nebius, ..., or "
            "auto) serving --model, a Hub model id"
        },
    )
    model: str = field(default="gpt-4o", metadata={"help": "Chat model with vision (a Hub model id with --provider)"})
    api_key_env: str | None = field(
        default=None,
        metadata={
            "help": "Environment variable holding the API key (default: OPENAI_API_KEY with a base URL; with "
            "--provider, huggingface_hub's HF_TOKEN or cached login)"
        },
    )
    max_tokens: int = field(default=600, metadata={"help": "Answer length limit"})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature"})
    json_mode: bool = field(
        default=True,
        metadata={"help": "Send response_format={'type': 'json_object'} (--no-json-mode for servers that reject it)"},
    )
    max_image_side: int = field(default=1024, metadata={"help": "Larger images are sent downscaled (px)"})
    limit: int | None = field(default=None, metadata={"help": "Only the first N training images (trial runs)"})
    import_annotations: str | None = field(
        default=None,
        metadata={
            "help": "The reference's <data>_annotations_train.json instead of an endpoint: its GPT answers, split as "
            "the reference splits them, become this stage's records (unparseable or unmatched entries reported)"
        },
    )


ARGUMENTS = InstructionDataArguments


def enabled(args: InstructionDataArguments) -> bool:
    """The all-stages command runs stage 0 only when an endpoint is configured (`base_url` or `provider`)."""
    return args.base_url is not None or args.provider is not None or args.import_annotations is not None


def fingerprint(run_args, args: InstructionDataArguments) -> str:
    """Hash of the data, the endpoint's model and the prompt: what a complete instruction-data file depends on."""
    return hash_json(
        {
            "stage": STAGE,
            "data": source_hash(run_args),
            **{name: getattr(args, name) for name in fingerprint_fields(args)},
            "prompt": [SYSTEM_PROMPT, INSTRUCTION_PROMPT, EXAMPLE_ANSWER],
            "import_annotations": file_digest(args.import_annotations) if args.import_annotations else None,
        }
    )


def _ask(client: ChatClient, data, row: int, image: str, label: str, class_names, max_side) -> dict:
    """The record (done or failed) of row `row` of the training split, whose key is `image`. Fatal endpoint errors
    propagate."""
    record = {"image": image, "label": label}
    try:
        url = image_data_url(data.image_bytes("train", row), image, max_side=max_side)
    except (ValueError, OSError) as error:
        return {**record, "status": "failed", "reason": f"unreadable image: {error}", "attempts": 0}
    try:
        result = client.complete(build_messages(url, label, class_names))
    except ChatRequestError as error:
        if error.fatal:
            raise
        return {**record, "status": "failed", "reason": error.reason, "attempts": error.attempts}
    try:
        observation, reasoning = parse_answer(result.content, label)
    except MalformedAnswer as error:
        reason = f"malformed answer: {error}"
        if result.finish_reason == "length":
            reason += " (cut off at --max-tokens)"
        return {
            **record,
            "status": "failed",
            "reason": reason,
            "raw": result.content[:2000],
            "attempts": result.attempts,
        }
    return {
        **record,
        "status": "done",
        "observation": observation,
        "reasoning": reasoning,
        "model": client.model,
        "attempts": result.attempts,
    }


def run(run_args, args: InstructionDataArguments) -> dict:
    """Generate the instruction data; returns the summary (`done`, `failed`, `skipped`, ...). Resumable."""
    from accelerate import PartialState

    state = PartialState()  # under `accelerate launch`, the main process alone talks to the endpoint
    main = import_annotations if args.import_annotations else _run_main
    summary = main(run_args, args) if state.is_main_process else {}
    state.wait_for_everyone()
    return summary


def _run_main(run_args, args: InstructionDataArguments) -> dict:
    from tqdm.auto import tqdm

    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.base_url and args.provider:
        raise ValueError("Pass --base-url (a server of your own) or --provider (Inference Providers), not both")
    api_key = _api_key(args)
    if not has_source(run_args):
        raise DataError(f"Stage {STAGE!r} needs a dataset: pass --data-dir or --dataset")
    data = load_source(run_args, class_names=preset_class_names(run_args))
    class_names = ensure_class_names(run_args.run_dir, data.class_names)
    labels = data.column("train", "label")
    images = [(row, data.key("train", row), class_names[label]) for row, label in enumerate(labels)]
    if args.limit is not None:
        images = images[: args.limit]

    output = stage_output(run_args.run_dir, STAGE)
    output.parent.mkdir(parents=True, exist_ok=True)
    clear_complete(run_args.run_dir, STAGE)
    records = read_records(output)
    pending = [(row, image, label) for row, image, label in images if not _is_done(records.get(image), label)]
    skipped = len(images) - len(pending)
    logger.info(f"Instruction data: {len(images)} training images, {skipped} already done, {len(pending)} to ask")

    counts = {"done": 0, "failed": 0}
    retry = args.retry_policy()
    request_fields = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.json_mode:
        request_fields["response_format"] = {"type": "json_object"}
    base_url = None if args.provider else args.base_url or OPENAI_BASE_URL
    client = ChatClient(args.model, base_url, args.provider, api_key, args.timeout, retry, request_fields)
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        with (
            client.redact.on_log_handlers(),  # a server may echo the key; the HTTP libraries log URLs
            client,
            output.open("a", encoding="utf-8") as file,
            tqdm(total=len(pending), desc="Instruction data") as bar,
        ):
            futures = [
                pool.submit(_ask, client, data, row, image, label, class_names, args.max_image_side)
                for row, image, label in pending
            ]
            for future in as_completed(futures):
                record = future.result()  # a fatal endpoint error stops the run here
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                file.flush()
                records[record["image"]] = record
                counts[record["status"]] += 1
                if record["status"] == "failed":
                    logger.warning(f"Instruction data for {record['image']!r} failed: {record['reason']}")
                bar.update(1)
                bar.set_postfix(done=counts["done"], failed=counts["failed"])
    except ChatRequestError as error:
        raise RuntimeError(f"The chat endpoint {client.endpoint} refused the request: {error.reason}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        rewrite_records(output, records)  # one record per image, also after a crash or Ctrl-C

    summary = {
        "stage": STAGE,
        "output": str(output),
        "total": len(images),
        "done": counts["done"],
        "failed": counts["failed"],
        "skipped": skipped,
        "retries": client.retries,
        "complete": counts["failed"] == 0,
    }
    print(
        f"Instruction data: {counts['done']} done, {counts['failed']} failed, {skipped} skipped (already done) "
        f"of {len(images)} images; {client.retries} retries -> {output}"
    )
    if counts["failed"]:
        print(f"Run again to ask again for the {counts['failed']} failed image(s); done ones are skipped.")
    else:
        settings = settings_dict(run_args, args)
        write_complete(run_args.run_dir, STAGE, fingerprint(run_args, args), summary=summary, settings=settings)
    return summary


def import_annotations(run_args, args: InstructionDataArguments) -> dict:
    """Stage 0 from the reference's annotation file (so nobody pays for GPT-4 twice): every entry matched to the
    image `train/<label>/<img>` of an ImageFolder tree; the problems are logged and counted. The reference annotated
    every image of train/, also those held out for validation (`held_out`: kept, but stage 1 trains on train only)."""
    path = Path(args.import_annotations)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"--import-annotations {str(path)!r}: not a readable JSON file ({error})") from None
    if not isinstance(entries, list):
        raise DataError(f"--import-annotations {str(path)!r}: expected a JSON list of annotations")
    if not has_source(run_args):
        raise DataError(f"Stage {STAGE!r} needs the dataset the annotations were made for: pass --data-dir")
    data = load_source(run_args, class_names=preset_class_names(run_args))
    ensure_class_names(run_args.run_dir, data.class_names)
    splits = ["train", "val"] if data.val_from_train else ["train"]
    keys = [data.key(split, row) for split in splits for row in range(len(data.splits[split]))]
    held_out = {data.key("val", row) for row in range(len(data.splits["val"]))} if data.val_from_train else set()
    train_keys = {(Path(key).parts[1], Path(key).name): key for key in keys if len(Path(key).parts) >= 3}
    if not train_keys:
        raise DataError("--import-annotations matches images by train/<label>/<file>: it needs an ImageFolder tree")
    records, problems = reference_annotation_records(entries, train_keys, path.name)
    for problem in problems:
        logger.warning(f"--import-annotations: {problem}")
    output = stage_output(run_args.run_dir, STAGE)
    output.parent.mkdir(parents=True, exist_ok=True)
    clear_complete(run_args.run_dir, STAGE)
    rewrite_records(output, records)
    done = sum(record["status"] == "done" for record in records.values())
    summary = {
        "stage": STAGE,
        "output": str(output),
        "total": len(keys),
        "imported": done,
        "unparseable": len(records) - done,
        "held_out": sum(key in held_out for key in records),
        "problems": len(problems),
        "complete": True,
    }
    print(
        f"Imported {done} of {len(entries)} reference annotations for {len(keys)} training images; "
        f"{len(problems)} problem(s) logged -> {output}"
    )
    settings = settings_dict(run_args, args)
    write_complete(run_args.run_dir, STAGE, fingerprint(run_args, args), summary=summary, settings=settings)
    return summary


def _api_key(args: InstructionDataArguments) -> str | None:
    """The key of `--api-key-env`; with `--provider` and no `--api-key-env`, None (huggingface_hub's own token)."""
    if args.provider and args.api_key_env is None:
        return None
    name = args.api_key_env or "OPENAI_API_KEY"
    api_key = os.environ.get(name)
    if not api_key:
        raise ValueError(
            f"The API key environment variable {name!r} is not set (servers without authentication accept any "
            f"value, e.g. {name}=none)"
        )
    return api_key


def _is_done(record: dict | None, label: str) -> bool:
    if record is None or record.get("status") != "done":
        return False
    if record.get("label") != label:
        logger.warning(f"{record['image']!r} is now labelled {label!r}, not {record.get('label')!r}: asking again")
        return False
    return True


__all__ = ["ARGUMENTS", "STAGE", "InstructionDataArguments", "MalformedAnswer", "enabled", "fingerprint", "run"]
