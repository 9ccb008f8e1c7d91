#!/usr/bin/env python
"""Stage 3: distil the teacher into a head on the frozen VLM's image embeddings (features cached once).

accelerate launch train/distill.py --data-dir data/FI --run-dir runs/fi
python train/distill.py --data-dir data/FI --run-dir runs/fi --vlm tiny --epochs 50 --learning-rate 1e-2  # offline
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("distill")
