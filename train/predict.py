#!/usr/bin/env python
"""Batch prediction with an exported model: a folder, a file list or any `datasets` source -> parquet shards.

python train/predict.py --model runs/fi/model --inputs photos/ --output-dir predictions/
accelerate launch --num_processes 4 train/predict.py --model you/emovlm-kd-fi --inputs data.parquet --output-dir out/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.predict import main  # noqa: E402

if __name__ == "__main__":
    main()
