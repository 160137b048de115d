"""Shared fixtures. `small_cache`: a real cache built once per session by the real job (see tests/helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

# The test machine has 2 cores shared by several processes: torch's default of one OpenMP thread per core
# makes tiny convolutions 5-10x slower under contention. One thread per process, inherited by subprocesses.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest

from tests.helpers import make_small_cache


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a complete cache: 3 classes x 8 images (one mislabelled per class), masks, tiny trained CNN,
    map size 16, descriptor size 4. Images in <parent>/images, masks in <parent>/masks."""
    return make_small_cache(tmp_path_factory.mktemp("small_cache"))
