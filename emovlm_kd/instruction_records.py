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


__all__ = ["done_examples", "read_records", "rewrite_records"]
