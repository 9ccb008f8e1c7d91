#!/usr/bin/env python
"""Stage 6: assemble the final model repo (<run_dir>/model/) with a model card; upload it with --push-to-hub.

python train/export.py --data-dir data/FI --run-dir runs/fi --push-to-hub me/emovlm-kd-fi
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("export")
