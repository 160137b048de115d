"""What every command line shares: argparse types (a bad value is one clear line before any work starts), the
parser whose usage errors are one line (OneLineParser, also `python -m data.demo`'s), the help formatter, and
the option groups several commands take (the model, --low-rule). Only commands import this module: the
library takes typed values (``analysis.pipeline.plan.ExplainOptions``), never argparse's."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
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


def low_rule(text: str) -> "LowRule | None":
    """``--low-rule``: the text -> ``analysis.fgcam.LowRule`` (``analysis.fgcam.parse_low_rule``), its
    problems as argparse's one-line errors."""
    from analysis.fgcam import parse_low_rule

    try:
        return parse_low_rule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that say which model to load and how to preprocess its images
    (``analysis.pipeline.models.load_model``'s arguments), shared by the commands that load one (`explain`,
    `check-model`, `compare-methods`, where --model is only needed with --data: `required=False`)."""
    model = parser.add_argument_group("model loading and preprocessing")
    model.add_argument("--model", required=required,
                       help="torchvision:NAME, package.module:callable or path/to/file.py:callable (the callable "
                            "returns an nn.Module or (nn.Module, transform))")
    model.add_argument("--weights", default=None,
                       help="torchvision weights enum name, e.g. DEFAULT or ResNet50_Weights.IMAGENET1K_V2 "
                            "(downloaded by torchvision; with --checkpoint only its preprocessing is used)")
    model.add_argument("--checkpoint", type=Path, default=None,
                       help="a state dict file (.pth), loaded with torch.load(weights_only=True)")
    model.add_argument("--num-classes", type=positive_int, default=None,
                       help="number of outputs for a torchvision model built without --weights")
    model.add_argument("--image-size", type=positive_int, default=None,
                       help="resize images to SIZE x SIZE when no transform comes with the model (then 224)")
    model.add_argument("--mean", type=float, nargs="+", default=None,
                       help="normalisation mean per channel (default: ImageNet's) when no transform comes "
                            "with the model")
    model.add_argument("--std", type=float, nargs="+", default=None,
                       help="normalisation std per channel (default: ImageNet's)")


def add_low_rule_argument(group: Any) -> None:
    """``--low-rule``, the engine's rule for the lowest convolutions (``analysis.fgcam.LowRule``), shared by the
    commands that explain (`explain`, `compare-methods`): one option, parsed by ``low_rule``."""
    from analysis.fgcam import LOW_RULE_FORMAT

    group.add_argument("--low-rule", type=low_rule, default=None, metavar="RULE:LAYER[:VALUE]",
                       help=f"another LRP rule for the convolutions up to LAYER's output, z+ above it: "
                            f"{LOW_RULE_FORMAT}; the value is gamma or epsilon (default 0.25). Default: none (z+ "
                            "everywhere, as the paper; README, 'Another rule for the lowest layers')")


def skipped_lines(skipped: list[tuple[int, str]]) -> list[str]:
    """The report line naming the images a test could not read ((id, reason) pairs), or none."""
    if not skipped:
        return []
    return [f"skipped {len(skipped)} unreadable image(s), e.g. id {skipped[0][0]}: {skipped[0][1]}"]
