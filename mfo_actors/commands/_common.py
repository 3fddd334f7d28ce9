"""Helpers shared by the store-reading CLI commands (``events``, ``runs``, ``flows``).

The common ``--config``/``--json`` parent parser, the ``--limit`` type, opening an instance's
store for one command (without the daemon's lock, logs kept off stdout), and the table, time
and JSON rendering every command prints with.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from mfo_actors.config import InstanceConfig
from mfo_actors.errors import UserError
from mfo_actors.observability import redact, redact_processor
from mfo_actors.store import EventStore, StoreError, open_store, sqlite_path

__all__ = [
    "ERROR_WIDTH",
    "LIST_DEFAULT_LIMIT",
    "common_parser",
    "fmt_time",
    "iso",
    "positive_int",
    "print_json",
    "quiet_logs",
    "short",
    "table",
    "with_store",
]

LIST_DEFAULT_LIMIT = 50
ERROR_WIDTH = 60  # characters of an error shown in a table cell
NO_STORE = "no store at {where} (has the daemon run with this config?)"


def common_parser(*, json_output: bool = True) -> argparse.ArgumentParser:
    """The parent parser of every action: ``--config FILE`` (and ``--json``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="instance config file")
    if json_output:
        common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return common


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def with_store(cfg: InstanceConfig, config_file: str,
               body: Callable[[EventStore], Awaitable[Any]], *, must_exist: bool = True,
               log_level: int = logging.WARNING, missing: str = NO_STORE,
               node: str | None = None) -> Any:
    """Open *cfg*'s store (without the daemon's lock) and run *body* on asyncio.

    Store errors become one-line :class:`UserError`\\ s; *missing* (formatted with
    ``where``) is the message when there is no store yet. *node*: the node id on what this
    process claims (default the daemon's: ``store.node_id``).
    """

    async def main() -> Any:
        try:
            async with open_store(cfg, must_exist=must_exist, node=node) as store:
                return await body(store)
        except StoreError as exc:
            where = (sqlite_path(cfg) if cfg.store.backend == "sqlite"
                     else f"schema {cfg.store.schema!r}")
            if "no event store" in str(exc):
                raise UserError(f"{config_file}: {missing.format(where=where)}") from None
            raise UserError(f"{config_file}: {exc}") from None

    with quiet_logs(log_level):
        return anyio.run(main, backend="asyncio")


@contextmanager
def quiet_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Logs of *level* and above to stderr while the command runs: stdout is its output.

    Whatever structlog configuration was there before is put back afterwards.
    """
    was_configured, previous = structlog.is_configured(), structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, redact_processor,
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def fmt_time(ts: float | None) -> str:
    """``2024-05-01 12:00:00Z``; empty for None."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def iso(ts: float | None) -> str | None:
    """ISO 8601 (UTC) for JSON output."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def short(text: str | None) -> str:
    """One line of at most ERROR_WIDTH characters, secrets redacted."""
    out = str(redact(text or "")).replace("\n", " ")
    return out if len(out) <= ERROR_WIDTH else out[: ERROR_WIDTH - 3] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *rows])


def print_json(value: Any) -> None:
    """Indented JSON on stdout (values JSON does not know are printed as strings)."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))
