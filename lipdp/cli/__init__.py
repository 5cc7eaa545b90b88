"""The ``lipdp`` command line: one parser, one module per subcommand, one error wrapper (``lipdp.cli.errors``).

    lipdp train --dataset digits --epsilon 3 --epochs 20
    lipdp budget --noise-multiplier 1.1 --sample-rate 0.0042667 --steps 3516 --delta 1e-5
    lipdp bounds --dataset fashion-mnist
    lipdp demo
    lipdp audit --canaries 1000 --steps 50

Each subcommand module defines ``HELP`` (one line for ``lipdp --help``), ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args) -> int``, and imports torch only inside ``run``: ``lipdp --help`` and ``lipdp budget`` start without
it. The recipes (``python -m recipes.NAME``) and benchmarks have their own entry points built on the same wrapper.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lipdp.cli.errors import ArgumentParser, run_main

#: Subcommand name -> module under ``lipdp.cli`` (the order of ``lipdp --help``).
SUBCOMMANDS = {"train": "train", "tune": "tune", "budget": "budget", "bounds": "bounds", "demo": "demo", "audit": "audit"}
PROG = "lipdp"


def build_parser() -> ArgumentParser:
    """The ``lipdp`` parser with every subcommand; each parsed namespace carries its module's ``run`` as ``func``."""
    parser = ArgumentParser(
        prog=PROG, description="Differentially private training of Lipschitz networks, without per-sample gradient "
        "clipping: noise calibrated to certified per-sample gradient bounds.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"lipdp.cli.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                 epilog=getattr(module, "EPILOG", None),
                                 formatter_class=getattr(module, "FORMATTER", argparse.HelpFormatter))
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lipdp ...``: returns the exit status (0 success, 2 user error, a subcommand's own status otherwise)."""
    return run_main(lambda args: f"{PROG} {args.command}", build_parser, lambda args: args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
