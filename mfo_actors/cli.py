"""The ``mfo-actors`` command line: argument parsing and the one-line error contract.

Each subcommand lives in ``mfo_actors/commands/<module>.py`` and exposes
``configure(parser) -> None``, which adds its arguments (and description) to the parser this
module made for it and sets ``func`` to a callable ``(args) -> int``. Only the module of the
command being run is imported: ``--version``, ``--help`` and a usage error import no command
and no daemon code, so they answer about as fast as Python starts (benchmarks/cli_startup.py).

Every :class:`~mfo_actors.errors.UserError` (a config error included) is printed as one line
on stderr, ``mfo-actors: <message>``, with exit code 1 (``run``: 78, EX_CONFIG, so that
systemd does not restart a daemon that cannot start as configured): never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mfo_actors import __version__
from mfo_actors.errors import UserError

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

PROG = "mfo-actors"

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class Command(NamedTuple):
    """A subcommand: the module that configures it, and its line in ``--help``."""

    module: str
    help: str


# Order is the order of ``mfo-actors --help``.
COMMANDS: dict[str, Command] = {
    "run": Command("mfo_actors.commands.run",
                   "run one instance in the foreground (systemd: Type=notify)"),
    "check": Command("mfo_actors.commands.check",
                     "validate config files and flows without starting anything"),
    "reload": Command("mfo_actors.commands.reload",
                      "validate FILE, then make the running daemon reload it (like SIGHUP)"),
    "demo": Command("mfo_actors.commands.demo",
                    "watch a real instance receive, store and deliver webhooks (self-contained)"),
    "mock-server": Command("mfo_actors.commands.mock_server",
                           "run the reference MFO (SLOP) server, with fault injection"),
    "events": Command("mfo_actors.commands.events",
                      "list, show and replay stored webhook events"),
    "flows": Command("mfo_actors.commands.flows", "list, draw and run taskflows"),
    "runs": Command("mfo_actors.commands.runs", "list and show flow runs"),
    "sessions": Command("mfo_actors.commands.sessions", "list, show and close chat sessions"),
    "chat": Command("mfo_actors.commands.chat",
                    "send a chat message to the MFO server and stream the answer"),
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in *argv*: the first word that is not an option.

    The top-level options (``--version``, ``--help``) take no value, so that word is the
    command whenever there is one.
    """
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] = (), *, commands: Sequence[str] | None = None,
                 ) -> argparse.ArgumentParser:
    """The parser, with the full arguments of the command(s) that *argv* names.

    Every other command gets a placeholder parser (its name and help line only), so
    ``--help`` lists them all and an unknown name is a usage error, without importing them.

    Args:
      argv: The arguments about to be parsed (decides which command is configured).
      commands: Configure these commands fully instead (tests, documentation).
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A durable webhook-to-MFO gateway and taskflow runner, built as actors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(commands) if commands is not None else {_command_in(argv)}
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if name in wanted:
            module = importlib.import_module(command.module)
            module.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code.

    Returns:
      The command's exit code; 1 for a user error (one line on stderr; ``run``: 78), 130 on
      Ctrl-C, 2 for a usage error (argparse's convention).
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    # A command may exit with its own code for a user error (run: 78, EX_CONFIG).
    code: int = getattr(args, "user_error_exit", EXIT_USER_ERROR)
    try:
        return int(func(args))
    except UserError as exc:
        return _report_user_error(exc, code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        # A user error raised inside a task group arrives wrapped; show it like any other.
        user_errors, rest = group.split(UserError)
        if rest is None and user_errors is not None:
            return _report_user_error(_first_leaf(user_errors), code)
        raise


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _report_user_error(exc: BaseException, code: int) -> int:
    message = " ".join(str(exc).splitlines())  # one line, whatever the message holds
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
