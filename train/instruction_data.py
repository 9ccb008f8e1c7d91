#!/usr/bin/env python
"""Stage 0: instruction data (key visual elements + emotional reasoning per training image) from an
OpenAI-compatible vision chat endpoint. Resumable: run it again to skip done images and retry failed ones.

    OPENAI_API_KEY=... python train/instruction_data.py --data-dir data/FI --run-dir runs/fi
    python train/instruction_data.py --data-dir data/FI --run-dir runs/fi \
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2-VL-72B-Instruct --api-key-env VLLM_KEY

The main process alone talks to the endpoint, so `accelerate launch` works but gains nothing here.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from emovlm_kd.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main("instruction_data")
