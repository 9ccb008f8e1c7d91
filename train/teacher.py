#!/usr/bin/env python
"""Stage 2: fine-tune the timm teacher (paper: vit_base_patch16_384, Adam 3e-5, batch 10, 10 epochs).

accelerate launch train/teacher.py --data-dir data/FI --run-dir runs/fi
python train/teacher.py --data-dir data/FI --run-dir runs/fi --teacher tiny --epochs 2   # offline trial
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("teacher")
