#!/usr/bin/env python
"""Stage 4: train the gate that fuses the head's and the VLM branch's predictions (on cached features).

accelerate launch train/gate.py --data-dir data/FI --run-dir runs/fi --gate-type concat_linear
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("gate")
