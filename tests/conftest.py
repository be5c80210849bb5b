"""Shared fixtures. Tests run on CPU with small models; nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny pipeline saved in diffusers' save_pretrained layout."""
    from w2w_core.model import save_components, tiny_components

    directory = tmp_path_factory.mktemp("tiny_random_model")
    save_components(tiny_components(seed=0), directory)
    return directory
