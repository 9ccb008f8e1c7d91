#!/usr/bin/env python
"""Stage 5: accuracy and macro-F1 (overall, per class) of teacher, VLM branch, head and fused model.

python train/evaluate.py --data-dir data/FI --run-dir runs/fi
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("evaluate")
