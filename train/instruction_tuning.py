#!/usr/bin/env python
"""Stage 1: LoRA instruction tuning of the VLM (observation, inference, classification), merged for export.

    accelerate launch train/instruction_tuning.py --data-dir data/FI --run-dir runs/fi            # paper defaults
    accelerate launch train/instruction_tuning.py --data-dir data/FI --run-dir runs/fi --load-in-4bit   # QLoRA
    python train/instruction_tuning.py --data-dir data/toy --run-dir runs/toy --vlm tiny             # offline, CPU

Reads <run_dir>/instruction_data.jsonl (stage 0) when present, else trains the classification task alone.
Writes <run_dir>/vlm/ (merged VLM + processor + COMPLETE.json); `--resume` continues from the last epoch checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("instruction_tuning")
