"""``mfo-actors run --config FILE``: run one instance in the foreground until SIGTERM."""

from __future__ import annotations

import argparse
import functools

import anyio

from mfo_actors.config import load_config
from mfo_actors.daemon import run_instance
from mfo_actors.observability import configure_logging

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run one instance in the foreground (systemd: Type=notify)",
        description="Run the instance configured in FILE until SIGTERM/SIGINT "
        "(a second signal stops at once). Logs go to stderr.",
    )
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the instance config file")
    parser.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    configure_logging(level=cfg.logging.level, fmt=cfg.logging.format, instance=cfg.instance)
    return anyio.run(functools.partial(run_instance, cfg), backend=cfg.async_backend)
