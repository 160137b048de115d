"""What every command line shares: argparse types (a bad value is one clear line before any work starts), the
parser whose usage errors are one line (OneLineParser, also `python -m data.demo`'s) and the help formatter."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T", int, float)


def _checked(cast: Callable[[str], T], accept: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected.replace(" ", "_")  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
percentage = _checked(float, lambda v: 0 < v <= 100, "a percentage in (0, 100]")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or the help text already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
