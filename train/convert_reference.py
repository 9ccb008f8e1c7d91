#!/usr/bin/env python
"""Convert a model trained with the paper's reference code into an exported model folder (as stage 6 writes one).

python train/convert_reference.py --base-vlm Qwen/Qwen2-VL-7B-Instruct --adapter out/vlm/qwen7b_FI \
    --distill out/distill/distill_FI.pth --gate out/gate/gate_FI.pth --dataset-preset fi --output converted/fi
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.convert_reference import main  # noqa: E402

if __name__ == "__main__":
    main()
