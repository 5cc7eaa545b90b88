"""One way to fail on the command line, for every ``lipdp`` subcommand and every recipe (docs/design.md §7).

A user's mistake (a bad flag, an unknown data set, an impossible budget, a missing file) prints exactly one line,
``PROG: error: WHAT (fix: HOW)``, on stderr and exits with status 2: never a traceback. Anything else is a bug and
keeps its traceback.

    def main(argv: list[str] | None = None) -> int:
        return run_main("python -m recipes.classify", build_parser, run_from_arguments, argv)
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, NoReturn, Sequence

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in what the user asked for: ``what`` went wrong and ``fix``, how to put it right."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what} Fix: {fix}")
        self.what, self.fix = what, fix


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong", not "lipdp is broken" (imported lazily: no torch at start-up)."""
    from accounting.backends import AccountingError, BackendUnavailable

    types: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                                        AccountingError, BackendUnavailable]
    if "lipdp.mechanism" in sys.modules:  # a spent budget stops training with its own message
        from lipdp.mechanism import PrivacyBudgetExceeded

        types.append(PrivacyBudgetExceeded)
    return tuple(types)


def one_line(error: BaseException | str, default_fix: str) -> str:
    """``WHAT (fix: HOW)`` on one line; a message that already says ``Fix: HOW`` keeps its own fix."""
    if isinstance(error, UserError):
        what, fix = error.what, error.fix
    else:
        text = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, KeyError) and text.startswith("'"):
            text = text.strip("'")
        parts = re.split(r"\s*\(?\b[Ff]ix:\s*", text, maxsplit=1)
        what, fix = (parts[0], parts[1].rstrip(")")) if len(parts) == 2 else (text, default_fix)
    what, fix = what.strip().rstrip(".;:"), fix.strip().rstrip(".")
    return f"{what} (fix: {fix})"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose parse errors are one line, ``PROG: error: WHAT (fix: HOW)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print the one-line error and exit with status 2 (argparse prints the usage too; we name --help)."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message, f'see {self.prog} --help')}\n")


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``error`` as the one-line user error of ``prog``; returns the exit status (2)."""
    logger.debug("user error in %s", prog, exc_info=error)
    print(f"{prog}: error: {one_line(error, f'check the arguments; see {prog} --help')}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_main(prog: str | Callable[[argparse.Namespace], str], build_parser: Callable[[], argparse.ArgumentParser],
             run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``build_parser()``, set up logging (``-v``/``--verbose`` if the parser has it), run, and
    turn a user error into one line and exit status 2. Returns the exit status (``run``'s, 0 if it returns None).
    ``prog`` names the command in error lines (a function of the parsed arguments for subcommands)."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        status = run(args)
    except _user_error_types() as error:
        return report_user_error(prog(args) if callable(prog) else prog, error)
    return 0 if status is None else int(status)
