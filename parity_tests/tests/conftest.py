"""Shared pytest set-up: seeds, device selection, the GPU marker."""

from __future__ import annotations

import os

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """Run ``gpu`` tests only when CUDA is present (or ``-m gpu`` asks and says why not)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def keras_backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")
