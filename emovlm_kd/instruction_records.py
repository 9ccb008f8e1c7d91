"""The instruction-data file of stage 0 (`<run_dir>/instruction_data.jsonl`), which stage 1 trains on.

One JSON record per line, appended as answers arrive; the latest record of an image wins:

    {"image": "train/awe/0001.jpg", "label": "awe", "status": "done", "observation": "...", "reasoning": "...",
     "model": "gpt-4o", "attempts": 1}
    {"image": "train/awe/0002.jpg", "label": "awe", "status": "failed", "reason": "...", "raw": "...", ...}

`image` is the key of the image's row (`emovlm_kd.data.ImageData.key`): its path relative to the dataset folder
for an ImageFolder tree, `<split>[<row>]` for a `datasets` source.
"""

import json
import logging
import os
import re
from pathlib import Path

from emovlm_kd.run_dir import write_atomic

logger = logging.getLogger(__name__)


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
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records.values()))


def done_examples(path: str | os.PathLike) -> dict[str, dict]:
    """The usable records (`status == "done"`) of an instruction-data file, by row key."""
    return {image: record for image, record in read_records(path).items() if record.get("status") == "done"}


# The reference's split of a GPT answer into its two parts (train_vlm.py:46-54, `prepare_datasets`): "1. Key elements"
# up to "2. Reasoning", and what follows; bold markers allowed, case-insensitive.
REFERENCE_KEY_ELEMENTS = re.compile(
    r"1\.\s\*?\*?Key elements\*?\*?\s+(.*?)(?=\n2\.\s\*?\*?Reasoning\*?\*?)", re.DOTALL | re.IGNORECASE
)
REFERENCE_REASONING = re.compile(r"2\.\s\*?\*?Reasoning\*?\*?\s+(.*)", re.DOTALL | re.IGNORECASE)
REFERENCE_ANNOTATION_FIELDS = ("gpt_response", "img", "img_path", "label")


def split_reference_answer(text: str) -> tuple[str, str] | None:
    """`(observation, reasoning)` of a reference GPT answer, split as the reference splits it; None when either part
    is missing (the reference then trained on the text "None")."""
    key_elements, reasoning = REFERENCE_KEY_ELEMENTS.search(text), REFERENCE_REASONING.search(text)
    if key_elements is None or reasoning is None:
        return None
    return key_elements.group(1).strip(), reasoning.group(1).strip()


def reference_annotation_records(entries: list, train_keys: dict[tuple[str, str], str], source: str):
    """Stage-0 records from the reference's `<data>_annotations_train.json` entries (`gpt_response`, `img`,
    `img_path`, `label`; generate_instruction.py). `train_keys` maps `(class folder, file name)` to the row key of
    this run's training image. Returns `(records by key, problems)`: one line per entry that is malformed, matches
    no training image, or whose answer does not split."""
    records, problems = {}, []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in REFERENCE_ANNOTATION_FIELDS):
            problems.append(f"entry {number}: not an annotation with the fields {list(REFERENCE_ANNOTATION_FIELDS)}")
            continue
        key = train_keys.get((entry["label"], entry["img"]))
        if key is None:
            where = f"{entry['label']}/{entry['img']}"
            problems.append(f"entry {number} ({entry['img_path']!r}): this run has no training image {where}")
            continue
        parts = split_reference_answer(entry["gpt_response"])
        record = {"image": key, "label": entry["label"], "model": f"reference annotations ({source})", "attempts": 0}
        if parts is None:
            problems.append(f"entry {number} ({entry['img_path']!r}): 'Key elements' / 'Reasoning' not found")
            records[key] = {**record, "status": "failed", "reason": "unparseable", "raw": entry["gpt_response"][:2000]}
        else:
            records[key] = {**record, "status": "done", "observation": parts[0], "reasoning": parts[1]}
    return records, problems


__all__ = [
    "done_examples",
    "read_records",
    "reference_annotation_records",
    "rewrite_records",
    "split_reference_answer",
]
