"""Channel relevance in the cache (issue 15, analysis/pipeline/channel_relevance.py): the job stores, for every image, the
spatial sum of each CAM component I_k = w_k A_k for the predicted class, and for the true class; the cache reads
it back as float32 [len(ids), K]. Checked against Grad-CAM computed here with hooks on the real tiny CNN (no
engine code), through a real job (shards, then compaction), and on a cache written before it existed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cache import load
from analysis.pipeline.channel_relevance import channel_relevance_arrays, relevance_share
from analysis.pipeline.models import load_model
from analysis.pipeline.datasets import load_image, to_model_mode
from tests.helpers import TINY_MODEL_FILE, make_image_folder

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"


def gradcam_channel_relevance(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor,
                              classes: torch.Tensor) -> np.ndarray:
    """sum_xy w_k A_k with w_k the spatial mean of d logit / d A_k (Grad-CAM), by forward and backward hooks."""
    kept = {}
    handle = layer.register_forward_hook(lambda module, args, out: kept.update(a=out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    gradients, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), kept["a"])
    weights = gradients.mean(dim=(2, 3))
    return (weights * kept["a"].sum(dim=(2, 3))).detach().numpy()


@pytest.fixture(scope="module")
def job_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("channels")
    make_image_folder(root / "images", per_class=5, size=16)
    code = run_main_plain("explain", "--data", str(root / "images"), "--model", TINY, "--out", str(root / "cache"),
                          "--device", "cpu", "--workers", "0", "--batch-size", "4", "--shard-size", "4",
                          "--map-size", "8", "--descriptor-size", "2", "--quiet", "--no-cluster")
    assert code == 0
    return root / "cache"


def run_main_plain(*argv: str) -> int:
    from analysis.__main__ import main
    return main(list(argv))


def test_the_job_stores_each_channels_relevance_for_the_predicted_and_the_true_class(job_cache: Path) -> None:
    cache = load(job_cache)
    loaded = load_model(TINY)
    model = loaded.model.eval()
    table = cache.table
    images = torch.stack([loaded.transform(to_model_mode(load_image(cache.image_path(int(i))), loaded.in_channels))
                          for i in table["id"]])
    layer = model.get_submodule(cache.manifest["options"]["cam_layer"])
    ids = table["id"].to_numpy()
    pred = cache.channel_relevance(ids, which="pred")
    true = cache.channel_relevance(ids, which="true")
    assert pred.dtype == np.float32 and pred.shape == (len(ids), 8) and true.shape == pred.shape
    expected_pred = gradcam_channel_relevance(model, layer, images, torch.tensor(table["pred"].to_numpy()))
    expected_true = gradcam_channel_relevance(model, layer, images, torch.tensor(table["label"].to_numpy()))
    scale = np.abs(expected_pred).max()
    np.testing.assert_allclose(pred, expected_pred, rtol=2e-3, atol=2e-3 * scale)   # float16 storage
    np.testing.assert_allclose(true, expected_true, rtol=2e-3, atol=2e-3 * scale)
    wrong = ~table["correct"].to_numpy(bool)
    assert 0 < wrong.sum() < len(ids)            # random weights: some right, some wrong
    np.testing.assert_array_equal(true[~wrong], pred[~wrong])
    assert not np.allclose(true[wrong], pred[wrong])
    # the rows of any ids, in the order asked; the same after compaction (the job compacts at the end)
    np.testing.assert_array_equal(cache.channel_relevance([ids[3], ids[0]]), pred[[3, 0]])
    assert cache.channel_relevance().shape == pred.shape


def test_bad_which_and_a_cache_from_before(job_cache: Path, tmp_path: Path) -> None:
    cache = load(job_cache)
    with pytest.raises(ValueError, match="which must be 'pred' or 'true'"):
        cache.channel_relevance([0], which="label")
    import shutil
    old = tmp_path / "old"
    shutil.copytree(job_cache, old)
    for file in old.rglob("channel_relevance*.npy"):
        file.unlink()
    assert load(old).channel_relevance([0]) is None and load(old).channel_relevance(which="true") is None


def test_arrays_by_hand() -> None:
    pred = torch.tensor([[1.0, -2.0], [3.0, 1e6]])
    arrays = channel_relevance_arrays(pred, torch.tensor([[5.0, 6.0]]), torch.tensor([False, True]))
    assert arrays["channel_relevance"].dtype == np.float16
    np.testing.assert_array_equal(arrays["channel_relevance"], [[1, -2], [3, 65504]])   # clipped, never inf
    np.testing.assert_array_equal(arrays["channel_relevance_true"], [[1, -2], [5, 6]])
    none_wrong = channel_relevance_arrays(pred[:1], None, torch.tensor([False]))
    np.testing.assert_array_equal(none_wrong["channel_relevance_true"], [[1, -2]])
    np.testing.assert_allclose(relevance_share(np.array([[1.0, -2.0, 3.0], [-1.0, 0.0, 0.0]])),
                               [[0.25, 0.0, 0.75], [0.0, 0.0, 0.0]])
