"""The ``mfo-actors`` command line: argument parsing and the one-line error contract.

Each subcommand lives in ``mfo_actors/commands/<name>.py`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` to a callable
``(args) -> int``. A command module that is not there (yet) is skipped, so the CLI works while
the project grows. Every :class:`~mfo_actors.errors.UserError` (a config error included) is
printed as one line on stderr, ``mfo-actors: <message>``, with exit code 1: never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mfo_actors import __version__
from mfo_actors.errors import UserError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

PROG = "mfo-actors"

# Order is the order of ``mfo-actors --help``.
COMMAND_MODULES = ("run", "check", "reload", "demo", "mock_server", "events", "flows", "runs",
                   "sessions", "chat")

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _load_registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]],
                                        None]]:
    registrars = []
    for name in COMMAND_MODULES:
        module_name = f"mfo_actors.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists but one of its imports is missing
                raise
            continue
        register = getattr(module, "register", None)
        if callable(register):
            registrars.append(register)
    return registrars


def build_parser() -> argparse.ArgumentParser:
    """The full parser: top-level options and every command module that exists."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A durable webhook-to-MFO gateway and taskflow runner, built as actors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _load_registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code.

    Returns:
      The command's exit code; 1 for a user error (one line on stderr), 130 on Ctrl-C,
      2 for a usage error (argparse's convention).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except UserError as exc:
        return _report_user_error(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        # A user error raised inside a task group arrives wrapped; show it like any other.
        user_errors, rest = group.split(UserError)
        if rest is None and user_errors is not None:
            return _report_user_error(_first_leaf(user_errors))
        raise


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _report_user_error(exc: BaseException) -> int:
    message = " ".join(str(exc).splitlines())  # one line, whatever the message holds
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_USER_ERROR
