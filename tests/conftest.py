"""Fixtures shared by several test files."""

import os

# The tests never reach a model hub (the product goes online unless the user sets HF_HUB_OFFLINE);
# set before anything imports huggingface_hub, which reads it once. Subprocesses and Ray workers inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3

TINY_ARCH = TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16)
"""A tiny random SD3 pipeline (32x32 pixels): fast enough for end-to-end runs on 2 CPU cores."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a saved tiny SD3 pipeline with random weights (no downloads)."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_sd3(TINY_ARCH, root / "work").save_pretrained(str(root / "model"))
    return root / "model"
