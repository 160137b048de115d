"""The explain job from Python (issue 23): `explain_dataset(ExplainOptions(...))` runs the whole job without an
argv, with the command line's defaults, and writes the same cache as `python -m analysis explain`. Real jobs
on real image files with the tiny CNN of tests/tiny_models.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.__main__ import build_parser
from analysis.cache import load
from analysis.commands.explain import options_from
from analysis.pipeline.job import explain_dataset
from analysis.pipeline.plan import ExplainOptions, SetupError
from tests.helpers import TINY_MODEL_FILE, make_image_folder, run_main

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"
SMALL = {"device": "cpu", "workers": 0, "batch_size": 3, "map_size": 8, "descriptor_size": 2, "quiet": True}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("options")
    make_image_folder(root / "images", per_class=3, size=16)
    return root / "images"


def test_the_options_hold_the_command_lines_defaults(tmp_path: Path) -> None:
    """Every field of ExplainOptions is an `explain` option, and a bare command line gives the dataclass's
    defaults (so the job does the same from Python and from the shell)."""
    argv = ["explain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--model", TINY]
    args = build_parser().parse_args(argv)
    assert options_from(args) == ExplainOptions(data=tmp_path / "d", out=tmp_path / "o", model=TINY)
    defaults = ExplainOptions(data=Path(), out=Path(), model="")
    assert (defaults.base, defaults.target_layer, defaults.map_size, defaults.descriptor_size,
            defaults.batch_size, defaults.faithfulness) == ("gradcam", "input", 64, 16, 32, 0)


def test_the_job_runs_from_python_and_writes_what_the_command_writes(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "from_python"
    manifest = explain_dataset(ExplainOptions(data=images, out=out, model=TINY, **SMALL))
    n_images = len(list(images.rglob("*.png")))
    assert manifest["finished"] and manifest["counts"]["explained"] == n_images == 9
    cache = load(out)
    assert cache.complete and len(cache) == n_images
    assert not (out / "analysis").exists()     # the library runs the job only; the command chains the rest

    shell = tmp_path / "from_shell"
    code, _, err = run_main(capsys, "explain", "--data", str(images), "--out", str(shell), "--model", TINY,
                            "--device", "cpu", "--workers", "0", "--batch-size", "3", "--map-size", "8",
                            "--descriptor-size", "2", "--quiet", "--no-cluster")
    assert code == 0, err
    other = load(shell)
    assert other.manifest["options"] == cache.manifest["options"]
    np.testing.assert_array_equal(other.table["pred"], cache.table["pred"])
    np.testing.assert_allclose(other.maps(other.ids), cache.maps(cache.ids), rtol=0, atol=0)


def test_a_bad_option_is_a_setup_error_before_anything_is_written(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(SetupError, match="--masks .*: no such file or directory"):
        explain_dataset(ExplainOptions(data=images, out=out, model=TINY, masks=tmp_path / "nope", **SMALL))
    assert not out.exists()
    with pytest.raises(SetupError, match="--model"):
        explain_dataset(ExplainOptions(data=str(images), out=str(out), model="nope:nothing", **SMALL))
    assert not out.exists()


def test_a_command_line_imports_its_own_command_only() -> None:
    """Each name of the command table is its module's COMMAND; `python -m analysis cluster ...` imports the
    cluster command and not the others (nor torchvision, which the explain command's transforms need: 2 s of
    each command's start-up); `python -m analysis --help` still lists every command."""
    import importlib
    import subprocess
    import sys

    from analysis.__main__ import COMMANDS

    assert {name: importlib.import_module(module).COMMAND for name, module in COMMANDS.items()} == \
        {name: name for name in COMMANDS}
    probe = ("import sys\nfrom analysis.__main__ import main\ntry:\n    main(['cluster', '--help'])\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('analysis.commands.')"
             " or m == 'torchvision'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    imported = eval(done.stdout.strip().splitlines()[-1])
    assert "analysis.commands.cluster" in imported, done.stdout
    assert not {"analysis.commands.explain", "analysis.commands.report", "torchvision"} & set(imported), imported
    listing = subprocess.run([sys.executable, "-m", "analysis", "--help"], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1]).stdout
    assert all(name in listing for name in COMMANDS), listing


def test_a_reader_that_closes_the_pipe_gets_no_traceback(small_cache: Path) -> None:
    """`python -m analysis findings ... | head`: when the reader has gone before the command prints, the command
    stops quietly with 141 (128 + SIGPIPE, as a shell reports a tool its pipe closed on), not with a traceback."""
    import subprocess
    import sys

    command = subprocess.Popen([sys.executable, "-m", "analysis", "findings", "--cache", str(small_cache)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    command.stdout.close()                  # before the interpreter has even started: every write fails
    err = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141 and err == "", err
