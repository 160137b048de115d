"""``--low-rule`` (issue 16), the one option `explain` and `compare-methods` share for the engine's rule in the
lowest convolutions: bad values are one line before any work, a good one reaches the engine (the maps change,
the manifest and the Trust results record it) and a resume with another rule is refused. Real jobs on real
files with the tiny CNN of tests/tiny_models.py (features.0 reads the image, features.2 is the conv below)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from analysis.cache import load
from analysis.commands.cli_types import low_rule, low_rule_text
from analysis.trust.compare import read_comparison
from analysis.fgcam import LowRule
from tests.helpers import TINY_MODEL_FILE, make_image_folder, run_main

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("low_rule")
    make_image_folder(root / "images", per_class=2, size=16)
    return root / "images"


def explain(images: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", "--data", str(images), "--model", TINY, "--out", str(out), "--device", "cpu", "--workers",
            "0", "--batch-size", "3", "--map-size", "8", "--descriptor-size", "2", "--quiet", "--no-cluster", *extra]


def test_the_option_text_round_trips():
    assert low_rule("gamma:_blocks.2") == LowRule("gamma", "_blocks.2")
    assert low_rule("epsilon:features.6:1") == LowRule("epsilon", "features.6", epsilon=1.0)
    assert low_rule("GAMMA:a.b:0") == LowRule("gamma", "a.b", gamma=0.0)
    assert low_rule("none") is None and low_rule_text(None) is None
    for text in ("gamma:features.2:0.5", "epsilon:x:0.25"):
        assert low_rule_text(low_rule(text)) == text
    for bad in ("gamma", "gamma:", "delta:x", "gamma:x:-1", "epsilon:x:0", "gamma:x:nan", "gamma:x:y", "a:b:c:d"):
        with pytest.raises(argparse.ArgumentTypeError):
            low_rule(bad)


@pytest.mark.parametrize("value, message", [
    ("gamma", "argument --low-rule: expected RULE:LAYER[:VALUE]"),
    ("delta:features.2", "unknown low-layer rule 'delta'"),
    ("gamma:features.2:-1", "the gamma rule needs a finite gamma >= 0"),
    ("epsilon:features.2:0", "the epsilon rule needs a finite epsilon > 0"),
    ("gamma:features.2:x", "is not a number"),
    ("gamma:nope", "unknown layer 'nope'"),
])
@pytest.mark.parametrize("command", ["explain", "compare-methods"])
def test_bad_values_are_one_line_before_any_work(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 command: str, value: str, message: str) -> None:
    out = tmp_path / "out"
    if command == "explain":
        argv = explain(images, out, "--low-rule", value)
    else:
        argv = ["compare-methods", "--data", str(images), "--model", TINY, "--device", "cpu", "--quiet",
                "--out", str(out), "--low-rule", value]
    code, stdout, stderr = run_main(capsys, *argv)
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_explain_uses_and_records_the_rule_and_refuses_to_resume_with_another(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain, gamma = tmp_path / "plain", tmp_path / "gamma"
    assert run_main(capsys, *explain(images, plain))[0] == 0
    code, _, stderr = run_main(capsys, *explain(images, gamma, "--low-rule", "gamma:features.2:0"))
    assert code == 0, stderr
    assert load(plain).manifest["options"]["low_rule"] is None
    assert load(gamma).manifest["options"]["low_rule"] == "gamma:features.2:0"
    ids = load(plain).ids
    a, b = load(plain).maps(ids), load(gamma).maps(ids)
    assert not np.allclose(a, b, atol=1e-3)   # gamma 0 (LRP-0) on features.2 is not z+: the maps differ
    code, _, stderr = run_main(capsys, *explain(images, gamma, "--low-rule", "epsilon:features.2"))
    assert code == 2 and stderr.count("\n") == 1
    assert "--low-rule 'gamma:features.2:0' -> 'epsilon:features.2:0.25'" in stderr, stderr


def test_compare_methods_records_the_rule(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "trust"
    code, _, stderr = run_main(capsys, "compare-methods", "--data", str(images), "--model", TINY, "--sample", "2",
                               "--steps", "2", "--randomise", "none", "--no-class-check", "--device", "cpu",
                               "--quiet", "--out", str(out), "--low-rule", "epsilon:features.2:1")
    assert code == 0, stderr
    assert read_comparison(out).meta["options"]["low_rule"] == "epsilon:features.2:1"
