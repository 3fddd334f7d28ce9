"""``mfo-actors run --config FILE``: run one instance in the foreground until SIGTERM."""

from __future__ import annotations

import argparse
import functools
import importlib.util
from typing import Any

import anyio

from mfo_actors.config import InstanceConfig, flows_dir_problem, load_config
from mfo_actors.daemon import graph_text, run_instance
from mfo_actors.observability import configure_logging, get_logger

__all__ = ["EXIT_CONFIG", "configure"]

log = get_logger("mfo_actors.commands.run")

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: the instance cannot start as configured


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the instance configured in FILE until SIGTERM/SIGINT "
        "(a second signal stops at once). Logs go to stderr."
    )
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the instance config file")
    parser.add_argument("--print-graph", action="store_true",
                        help="print the instance's actors and message channels as a Mermaid "
                        "flowchart (message types, bounds) and exit without running")
    # A daemon that cannot start because of the user's config, ports, state dir or store
    # exits 78 (EX_CONFIG): the unit's RestartPreventExitStatus=78 keeps systemd from
    # retrying what would fail the same way.
    parser.set_defaults(func=cmd_run, user_error_exit=EXIT_CONFIG)


def cmd_run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    cfg = load_config(args.config, warnings=warnings)
    if args.print_graph:
        print(graph_text(cfg), end="")
        return 0
    configure_logging(level=cfg.logging.level, fmt=cfg.logging.format, instance=cfg.instance)
    missing_flows = flows_dir_problem(cfg)
    if missing_flows:
        warnings.append(f"{cfg.source_file}: {missing_flows}")
    for warning in warnings:
        log.warning("config.warning", problem=warning)
    return anyio.run(functools.partial(run_instance, cfg), backend=cfg.async_backend,
                     backend_options=backend_options(cfg))


def backend_options(cfg: InstanceConfig) -> dict[str, Any]:
    """anyio backend options: uvloop under asyncio when installed and not turned off."""
    if cfg.async_backend != "asyncio" or not cfg.uvloop:
        return {}
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}
