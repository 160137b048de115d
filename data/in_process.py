"""The product's command line run in the caller's process, for the demo, the benchmark and the tests: a child
`python -m analysis` would import torch, torchvision and scikit-learn again, 3-5 s a command."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable


def run_analysis(arguments: list[str]) -> int:
    """`python -m analysis ARGUMENTS` in this process, its output its own: the exit code."""
    from analysis.__main__ import main

    try:
        return main(arguments)
    except SystemExit as stop:   # argparse refuses an option this way; the exit status Python would give
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1


def captured(main: Callable[[list[str]], int], arguments: list[str]) -> tuple[int, str, str]:
    """main(ARGUMENTS) with what it prints kept -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(arguments)
    return code, out.getvalue(), err.getvalue()
