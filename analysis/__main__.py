"""Command line: `python -m analysis <command> [options]`.

Each command lives in its own module exposing COMMAND (name), HELP (one line), add_arguments(parser) and
run(args) -> exit code. To add one, add its name and module to COMMANDS. A command line that names a command
imports that command's module only: the others' imports (torchvision's transforms, the engine) would cost each
command 2 s of start-up.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Sequence

from analysis.commands.cli_types import DefaultsHelpFormatter, OneLineParser

COMMANDS: dict[str, str] = {  # the command's name (its module's COMMAND) -> its module
    "explain": "analysis.commands.explain", "check-model": "analysis.commands.check_model",
    "compare-methods": "analysis.commands.compare_methods", "shortcut-test": "analysis.commands.region_removal",
    "insertion-test": "analysis.commands.region_insertion", "export": "analysis.commands.export",
    "cluster": "analysis.commands.cluster", "concepts": "analysis.commands.concepts",
    "findings": "analysis.commands.findings", "report": "analysis.commands.report",
    "label-errors": "analysis.commands.label_errors"}


def _import_command(module_name: str) -> tuple[ModuleType | None, str | None]:
    """The command module, or None and why it cannot be imported (one broken command must not take the
    others down: `explain` keeps working while another command's dependencies are missing)."""
    try:
        return importlib.import_module(module_name), None
    except Exception as error:  # ImportError, or any error raised while importing the module
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first}"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command named `only` alone (its module the only one imported)."""
    parser = OneLineParser(prog="python -m analysis",
                           description="Dataset-level FG-CAM explanations: offline jobs for the dashboard.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module, problem = _import_command(module_name)
        if module is None:
            sub = commands.add_parser(name, help=f"(unavailable: {problem})", add_help=False)
            sub.add_argument("rest", nargs=argparse.REMAINDER)
            sub.set_defaults(handler=lambda args, n=name, p=problem: _unavailable(n, p))
            continue
        sub = commands.add_parser(module.COMMAND, help=module.HELP, description=module.HELP,
                                  formatter_class=DefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def _unavailable(name: str, problem: str | None) -> int:
    print(f"error: the {name} command cannot be loaded ({problem})", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader of the output went away (`python -m analysis findings ... | head`): the rest goes nowhere,
        # as with any Unix tool, without a traceback (the Python documentation's note on SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)   # 128 + SIGPIPE: what a shell reports for a tool whose pipe closed
