"""Shared fixtures. Every test runs offline: Hub access is disabled and non-loopback sockets are refused."""

import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="emovlm-kd-hf-home-")
os.environ.update(
    {
        "HF_HOME": _HF_HOME,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TOKENIZERS_PARALLELISM": "false",
        # Subprocesses (examples, `accelerate launch` with 2 processes) share 2 cores: one thread each avoids
        # oversubscription, which made tiny steps ~100x slower. The test process itself uses 2 (set below).
        "OMP_NUM_THREADS": "1",
    }
)

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:  # never resolve names here: a DNS query is network traffic too
            allowed = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = False
        if not allowed:
            raise OSError(f"Tests must not touch the network (tried to connect to {address!r})")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """(model, image_processor, vlm_processor) for 3 classes; treat as read-only."""
    from emovlm_kd.tiny import build_tiny_model

    return build_tiny_model(["negative", "neutral", "positive"])


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny model saved as a Hub model folder (model; processor: image processor and tokenizer), as exported."""
    from processing_emovlm_kd import EmoVLMKDProcessor

    model, image_processor, _ = tiny
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    EmoVLMKDProcessor(image_processor, model.tokenizer).save_pretrained(folder)
    return folder
