"""Stage 0: emotion instruction data from an OpenAI-compatible chat endpoint with vision.

For every training image the endpoint is shown the image and its true label and asked, in the paper's one-shot
style, for (1) the key visual elements (`observation`) and (2) the reasoning that leads to the emotion
(`reasoning`), without naming the label. Answers must be a JSON object with both fields as non-empty strings, and
neither may contain the label as a whole word (case-insensitive; `sad` does not count against `sadness`): an answer
that names the label would teach the VLM to write the label into its explanations, which the paper avoids. Such
answers, like malformed ones, are recorded as failures (with the reason and the raw answer) and asked again on the
next run.

Output `<run_dir>/instruction_data.jsonl`, one JSON record per line, appended (and flushed) as answers arrive:

    {"image": "train/awe/0001.jpg", "label": "awe", "status": "done", "observation": "...", "reasoning": "...",
     "model": "gpt-4o", "attempts": 1}
    {"image": "train/awe/0002.jpg", "label": "awe", "status": "failed", "reason": "...", "raw": "...", ...}

`image` is the path relative to the dataset folder. A re-run skips images whose latest record is `done` (for the
same label) and asks again for the others; at the end the file is rewritten with the latest record per image, so a
finished file holds exactly one record per image.
"""

import argparse
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from emovlm_kd.data import clear_complete, ensure_class_names, load_imagefolder, stage_output, write_complete
from emovlm_kd.data import fingerprint as hash_of
from emovlm_kd.openai_chat import ChatRequestError, OpenAIChatClient, RetryPolicy, image_data_url
from emovlm_kd.stages import dataset_fingerprint

logger = logging.getLogger(__name__)

STAGE = "instruction_data"

SYSTEM_PROMPT = (
    "You are an expert in visual emotion analysis. You always answer with one JSON object and nothing else."
)

# One-shot: the example shows the register and length wanted, for an image of a different scene.
EXAMPLE_ANSWER = {
    "observation": (
        "A crowd of silhouetted figures raises long tools against a dark, stormy sky. Strong backlight turns the "
        "people into black shapes, the tools' sharp outlines stand out, and the figures move in step across the frame."
    ),
    "reasoning": (
        "The raised tools read as weapons and the looming sky adds menace; the synchronised crowd suggests a shared, "
        "charged purpose, and the hard contrast leaves no room for calm, so the scene builds tension and a sense of "
        "threat in the viewer."
    ),
}

INSTRUCTION_PROMPT = (
    'This image is labelled with the emotion "{label}". The possible emotions are: {classes}.\n'
    "Explain what in the image evokes this emotion, in two parts:\n"
    "1. observation: the key visual elements of the image (objects, people, expressions, colours, lighting, "
    "composition, atmosphere) that shape the emotion it evokes.\n"
    "2. reasoning: the reasoning that leads from those elements to the emotion the image evokes.\n"
    'Never write the word "{label}" or name the emotion: describe and reason so that a reader could infer it.\n'
    'Answer with a JSON object with the string fields "observation" and "reasoning", like this example for '
    "another image:\n{example}"
)


class MalformedAnswer(ValueError):
    """The endpoint answered, but not with what was asked (reason in the message)."""


# ---------------------------------------------------------------------------------------------- prompt and answer
def build_messages(image_url: str, label: str, class_names: list[str]) -> list[dict]:
    """The chat messages for one image (OpenAI vision format: a text part and an `image_url` part)."""
    prompt = INSTRUCTION_PROMPT.format(
        label=label, classes=", ".join(class_names), example=json.dumps(EXAMPLE_ANSWER, ensure_ascii=False)
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}],
        },
    ]


def label_pattern(label: str) -> re.Pattern:
    """The label as a whole word, case-insensitive; `_`, `-` and spaces inside a label match one another."""
    words = [re.escape(word) for word in re.split(r"[\s_\-]+", label.strip()) if word]
    return re.compile(r"(?<!\w)" + r"[\s_\-]+".join(words) + r"(?!\w)", re.IGNORECASE)


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


# ---------------------------------------------------------------------------------------------- the JSONL file
def read_records(path: str | os.PathLike) -> dict[str, dict]:
    """The latest record per image (`image` key) of an instruction-data JSONL file; `{}` when it does not exist.

    A line that is not a JSON record (e.g. cut short by a crash mid-write) is logged and ignored: its image counts
    as not done.
    """
    path = Path(path)
    records = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[record["image"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                logger.warning(f"{str(path)!r} line {number} is not an instruction record ({error}); ignored")
    return records


def rewrite_records(path: Path, records: dict[str, dict]):
    """Atomically replace the file with one record per image."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as file:
        for record in records.values():
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def done_examples(path: str | os.PathLike) -> dict[str, dict]:
    """The usable records (`status == "done"`) of an instruction-data file, by image path relative to the data root."""
    return {image: record for image, record in read_records(path).items() if record.get("status") == "done"}


# ---------------------------------------------------------------------------------------------- the stage
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Stage 0: ask an OpenAI-compatible vision chat endpoint for the key visual elements and the "
        "emotional reasoning of every training image (JSONL, resumable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, help="ImageFolder dataset: train/[val/]test/<class>/*")
    parser.add_argument("--run-dir", required=True, help="Run directory; writes instruction_data.jsonl there")
    parser.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible API base URL")
    parser.add_argument("--model", default="gpt-4o", help="Chat model with vision")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight at most")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per request attempt")
    parser.add_argument("--max-retries", type=int, default=5, help="Retries on timeouts, 429 and 5xx")
    parser.add_argument("--backoff-base", type=float, default=1.0, help="First retry waits about this many seconds")
    parser.add_argument("--backoff-max", type=float, default=60.0, help="Longest backoff between retries (s)")
    parser.add_argument("--max-tokens", type=int, default=600, help="Answer length limit")
    parser.add_argument("--temperature", type=float, default=0.2, help="Sampling temperature")
    parser.add_argument(
        "--no-json-mode", dest="json_mode", action="store_false",
        help="Do not send response_format={'type': 'json_object'} (for servers that reject it)",
    )  # fmt: skip
    parser.add_argument("--max-image-side", type=int, default=1024, help="Larger images are sent downscaled (px)")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N training images (trial runs)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Held-out share of train when no val/")
    parser.add_argument("--seed", type=int, default=42, help="Seed of that held-out split (as in every stage)")
    return parser


def fingerprint(args) -> str:
    """Hash of the data, the endpoint's model and the prompt: what a complete instruction-data file depends on."""
    return hash_of(
        {"stage": STAGE, "data": dataset_fingerprint(args), "model": args.model, "base_url": args.base_url,
         "limit": args.limit, "prompt": [SYSTEM_PROMPT, INSTRUCTION_PROMPT, EXAMPLE_ANSWER]}
    )  # fmt: skip


def _ask(client: OpenAIChatClient, data_root: str, image: str, label: str, class_names, max_side) -> dict:
    """One image's record (done or failed). Fatal endpoint errors propagate."""
    record = {"image": image, "label": label}
    try:
        url = image_data_url(Path(data_root) / image, max_side=max_side)
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


def run(args: argparse.Namespace) -> dict:
    """Generate the instruction data; returns the summary (`done`, `failed`, `skipped`, ...). Resumable."""
    from accelerate import PartialState

    state = PartialState()  # under `accelerate launch`, the main process alone talks to the endpoint
    summary = _run_main(args) if state.is_main_process else {}
    state.wait_for_everyone()
    return summary


def _run_main(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ValueError(
            f"The API key environment variable {args.api_key_env!r} is not set (servers without authentication "
            f"accept any value, e.g. {args.api_key_env}=none)"
        )
    data = load_imagefolder(args.data_dir, val_fraction=args.val_fraction, seed=args.seed)
    class_names = ensure_class_names(args.run_dir, data.class_names)
    train = data.splits["train"]
    images = [
        (Path(os.path.relpath(path, data.root)).as_posix(), class_names[label])
        for path, label in zip(train["image_path"], train["label"], strict=True)
    ]
    if args.limit is not None:
        images = images[: args.limit]

    output = stage_output(args.run_dir, STAGE)
    output.parent.mkdir(parents=True, exist_ok=True)
    clear_complete(args.run_dir, STAGE)
    records = read_records(output)
    pending = [(image, label) for image, label in images if not _is_done(records.get(image), label)]
    skipped = len(images) - len(pending)
    logger.info(f"Instruction data: {len(images)} training images, {skipped} already done, {len(pending)} to ask")

    counts = {"done": 0, "failed": 0}
    retry = RetryPolicy(max_retries=args.max_retries, backoff_base=args.backoff_base, backoff_max=args.backoff_max)
    request_fields = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.json_mode:
        request_fields["response_format"] = {"type": "json_object"}
    client = OpenAIChatClient(args.base_url, api_key, args.model, args.timeout, retry, request_fields)
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        with (
            client,
            output.open("a", encoding="utf-8") as file,
            tqdm(total=len(pending), desc="Instruction data") as bar,
        ):
            futures = [
                pool.submit(_ask, client, data.root, image, label, class_names, args.max_image_side)
                for image, label in pending
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
        raise RuntimeError(f"The chat endpoint {client.url} refused the request: {error.reason}") from None
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
        write_complete(args.run_dir, STAGE, fingerprint(args), summary=summary)
    return summary


def _is_done(record: dict | None, label: str) -> bool:
    if record is None or record.get("status") != "done":
        return False
    if record.get("label") != label:
        logger.warning(f"{record['image']!r} is now labelled {label!r}, not {record.get('label')!r}: asking again")
        return False
    return True


def main(argv=None) -> dict:
    """The `train/` script: parse, run, print the summary."""
    from emovlm_kd.stages import cli_main

    return cli_main(sys.modules[__name__], argv)


__all__ = [
    "MalformedAnswer",
    "build_messages",
    "build_parser",
    "done_examples",
    "fingerprint",
    "label_pattern",
    "main",
    "parse_answer",
    "read_records",
    "run",
]
