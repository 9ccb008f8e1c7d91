#!/usr/bin/env python
"""All training stages in order for one dataset, skipping those already complete.

accelerate launch train/run_all.py --data-dir data/FI --run-dir runs/fi --push-to-hub me/emovlm-kd-fi
python train/run_all.py --data-dir data/bass --run-dir runs/bass --vlm tiny --teacher tiny   # offline trial
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.stages.run_all import main  # noqa: E402

if __name__ == "__main__":
    main()
