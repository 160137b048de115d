"""Command line: `python -m analysis <command> [options]`.

Each command lives in its own module exposing COMMAND (name), HELP (one line), add_arguments(parser) and
run(args) -> exit code. To add one, append its module to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from analysis.commands.cli_types import DefaultsHelpFormatter, OneLineParser

COMMANDS: list[str] = ["analysis.commands.explain", "analysis.commands.check_model",
                       "analysis.commands.compare_methods", "analysis.commands.region_removal",
                       "analysis.commands.region_insertion", "analysis.commands.export", "analysis.commands.cluster",
                       "analysis.commands.concepts", "analysis.commands.findings", "analysis.commands.report",
                       "analysis.commands.label_errors"]


def _import_command(module_name: str) -> tuple[ModuleType | None, str | None]:
    """The command module, or None and why it cannot be imported (one broken command must not take the
    others down: `explain` keeps working while another command's dependencies are missing)."""
    try:
        return importlib.import_module(module_name), None
    except Exception as error:  # ImportError, or any error raised while importing the module
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m analysis",
                           description="Dataset-level FG-CAM explanations: offline jobs for the dashboard.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True
    for module_name in COMMANDS:
        module, problem = _import_command(module_name)
        if module is None:
            name = module_name.rsplit(".", 1)[-1].replace("_", "-")
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
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
