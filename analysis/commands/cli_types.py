"""What every command line shares: argparse types (a bad value is one clear line before any work starts), the
parser whose usage errors are one line (OneLineParser, also `python -m data.demo`'s) and the help formatter."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

    from analysis.fgcam import LowRule

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


def check_new_file(out: "Path", option: str = "--out") -> None:
    """ValueError (one line) unless `out` can be created as a new file: outputs are never overwritten."""
    if out.exists():
        raise ValueError(f"{option} {out} exists: choose another name or remove it")
    if not out.parent.is_dir():
        raise ValueError(f"{option} {out}: the folder {out.parent} does not exist")


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


LOW_RULE_FORMAT = "RULE:LAYER[:VALUE] with RULE gamma or epsilon (e.g. gamma:_blocks.2:0.25), or none"


def low_rule(text: str) -> "LowRule | None":
    """``--low-rule``: ``gamma:LAYER[:GAMMA]`` or ``epsilon:LAYER[:EPSILON]`` -> ``analysis.fgcam.LowRule``
    (the value defaults to LowRule's, 0.25); ``none`` -> None (z+ everywhere). Whether LAYER is a module of
    the model is checked where the model is loaded (FGCAM's constructor)."""
    from analysis.fgcam import LowRule

    if text.strip().lower() == "none":
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise argparse.ArgumentTypeError(f"expected {LOW_RULE_FORMAT}, got {text!r}")
    rule, layer = parts[0].strip().lower(), parts[1].strip()
    values = {}
    if len(parts) == 3:
        try:
            values = {rule: float(parts[2])}
        except ValueError:
            raise argparse.ArgumentTypeError(f"the value in {text!r} is not a number ({LOW_RULE_FORMAT})") from None
    try:
        return LowRule(rule, layer, **{k: v for k, v in values.items() if k in ("gamma", "epsilon")})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} ({LOW_RULE_FORMAT})") from None


def low_rule_text(rule: "LowRule | None") -> str | None:
    """The ``--low-rule`` text of a LowRule (what manifests and results record); None for z+ everywhere."""
    if rule is None:
        return None
    return f"{rule.rule}:{rule.through}:{rule.gamma if rule.rule == 'gamma' else rule.epsilon:g}"


def skipped_lines(skipped: list[tuple[int, str]]) -> list[str]:
    """The report line naming the images a test could not read ((id, reason) pairs), or none."""
    if not skipped:
        return []
    return [f"skipped {len(skipped)} unreadable image(s), e.g. id {skipped[0][0]}: {skipped[0][1]}"]
