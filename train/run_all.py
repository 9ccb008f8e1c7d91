#!/usr/bin/env python
"""All training stages in order for one dataset, skipping those already complete.

accelerate launch train/run_all.py --data-dir data/FI --run-dir runs/fi --set export.push_to_hub=me/emovlm-kd-fi
python train/run_all.py --config quickstart --data-dir data/bass --run-dir runs/bass   # offline trial, tiny models
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.stages.run_all import main  # noqa: E402

if __name__ == "__main__":
    main()
