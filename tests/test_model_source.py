"""Where the model's weights came from (issue 24, item 7): a demo made with any --out records its checkpoint in
the manifest, so the pages that run the model load it with no environment variable; and the commands that pages
tell the user to run name the cache they opened, not a placeholder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.cache import load
from tests.helpers import open_page, page_texts

TEST_IMAGES = 60


@pytest.fixture(scope="module")
def demo_elsewhere(tmp_path_factory: pytest.TempPathFactory):
    """A demo-like cache with --out far from demo_out/: the demo's test split (60 images, the mark planted), its
    CNN trained briefly, and the demo's own explain step (the real job in a subprocess), with DEMO_MODEL_WEIGHTS
    unset."""
    from data import demo, fashion_mnist, shortcut
    from data.demo_model import WEIGHTS_ENV, save_weights, train

    if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        pytest.skip(f"Fashion-MNIST is not installed in {fashion_mnist.DEBIAN_DIR}")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(WEIGHTS_ENV, raising=False)
        paths = demo.DemoPaths(tmp_path_factory.mktemp("elsewhere") / "my demo")
        paths.out.mkdir()
        full = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "test")
        part = fashion_mnist.Split(full.images[:TEST_IMAGES], full.labels[:TEST_IMAGES], full.source)
        demo.write_test_split(paths, part, shortcut.choose_marked(full.images, full.labels, "test")[:TEST_IMAGES])
        training = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "train")
        result = train(training.images[:2000], training.labels[:2000], epochs=1, batch_size=64, log=None)
        save_weights(result.model, paths.model, {})
        demo.step_explain(paths, batch_size=32, workers=0, quiet=True)
    return paths


def test_the_manifest_records_the_demo_checkpoint_as_an_absolute_path(demo_elsewhere) -> None:
    model = load(demo_elsewhere.cache).manifest["model"]
    assert model["checkpoint"] == str(demo_elsewhere.model.resolve())
    assert model["spec"].endswith("data/demo_model.py:demo_cnn") and Path(model["spec"].rsplit(":", 1)[0]).is_absolute()


def test_the_image_page_computes_concept_maps_with_the_model_without_any_variable(demo_elsewhere, monkeypatch) -> None:
    from data.demo_model import WEIGHTS_ENV

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    cache = load(demo_elsewhere.cache)
    relevance = cache.channel_relevance(cache.ids)
    image_id = int(cache.ids[np.argmax(relevance.max(axis=1))])   # an image whose evidence a concept holds
    at = open_page(monkeypatch, demo_elsewhere.cache, "image", {"id": image_id})
    assert not at.exception, [e.value for e in at.exception]
    text = page_texts(at)
    assert "need the cache's model" not in text, text
    assert f"**#{image_id}**" in text
    drawn = str([e.proto for e in list(at.get("imgs")) + list(at.get("image"))])
    assert "concept #" in drawn, text     # a concept's map was computed and drawn (else only its caption is)


def test_the_trust_pages_shortcut_test_runs_the_model_without_any_variable(demo_elsewhere, monkeypatch) -> None:
    from data.demo_model import WEIGHTS_ENV

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    at = open_page(monkeypatch, demo_elsewhere.cache, "trust")
    assert not at.exception, [e.value for e in at.exception]
    next(b for b in at.button if b.label == "Run the test").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    text = page_texts(at)
    assert "cannot be loaded here" not in text, text
    assert "Accuracy before" in [m.label for m in at.metric], text


def test_the_concepts_page_names_the_cache_it_opened_in_the_command_to_run(demo_elsewhere, monkeypatch,
                                                                           tmp_path: Path) -> None:
    import shlex

    copy = tmp_path / "a copy"
    shutil.copytree(demo_elsewhere.cache, copy)
    shutil.rmtree(copy / "analysis" / "concepts")
    at = open_page(monkeypatch, copy, "concepts")
    assert not at.exception, [e.value for e in at.exception]
    text = page_texts(at)
    assert f"python -m analysis concepts --cache {shlex.quote(str(copy.resolve()))}" in text, text
    assert "CACHE_DIR" not in text and "--cache DIR" not in text
