"""``mfo-actors events list|show|dead|replay --config FILE``: look at and replay stored events.

Works while the daemon runs on the same ``state_dir``: it opens the store file directly
(SQLite's WAL lets two processes share it) and does not take the daemon's lock. Secrets never
print: header values and payload fields that hold credentials (signatures, Authorization,
tokens, passwords) and every registered secret value are shown as ``[REDACTED]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from mfo_actors.config import load_config
from mfo_actors.errors import UserError
from mfo_actors.observability import REDACTED, redact, redact_processor
from mfo_actors.store import EventStore, StoredEvent, StoreError, open_store, sqlite_path

__all__ = ["register"]

LIST_DEFAULT_LIMIT = 50
STATUSES = ("pending", "claimed", "delivered", "dead")
ERROR_WIDTH = 60  # characters of last_error shown in a table cell
# Header names whose values are credentials, besides what observability.redact knows.
_SECRET_HEADER = re.compile(r"signature|authorization|token|secret|cookie|api-?key|password",
                            re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``events`` and its actions to the CLI."""
    parser = subparsers.add_parser(
        "events",
        help="list, show and replay stored webhook events",
        description="Inspect the event store of an instance (works while the daemon runs).",
    )
    actions = parser.add_subparsers(dest="events_action", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="instance config file")
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")

    p = actions.add_parser("list", parents=[common], help="list events, newest first")
    p.add_argument("--status", choices=STATUSES, help="only events in this state")
    p.add_argument("--source", help="only events of this source")
    p.add_argument("--limit", type=_positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N events (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", parents=[common], help="one event: headers and payload")
    p.add_argument("id", metavar="ID", help="event id")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("dead", parents=[common], help="list dead-lettered events")
    p.add_argument("--source", help="only events of this source")
    p.add_argument("--limit", type=_positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N events (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_dead, status="dead")

    p = actions.add_parser("replay", parents=[common],
                           help="move dead events back to pending (delivered again soon)")
    p.add_argument("ids", nargs="*", metavar="ID", help="dead event ids")
    p.add_argument("--all-dead", action="store_true", help="replay every dead event")
    p.set_defaults(func=cmd_replay)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


# -- commands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``events list``: a table (or JSON array) of events, newest first."""

    async def body(store: EventStore) -> list[StoredEvent]:
        return await store.list_events(status=args.status, source=args.source, limit=args.limit)

    events = _with_store(args, body)
    if args.json:
        _print_json([_summary(e) for e in events])
    elif not events:
        print("no events")
    else:
        print(_table(
            ["ID", "STATUS", "SOURCE", "TYPE", "RECEIVED", "ATTEMPTS", "NEXT/DONE", "ERROR"],
            [_row(e) for e in events],
        ))
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    """``events dead``: ``events list --status dead``."""
    return cmd_list(args)


def cmd_show(args: argparse.Namespace) -> int:
    """``events show ID``: every field, headers and payload, secrets redacted."""

    async def body(store: EventStore) -> StoredEvent | None:
        return await store.get_event(args.id)

    stored = _with_store(args, body)
    if stored is None:
        raise UserError(f"no event with id {args.id}")
    detail = _detail(stored)
    if args.json:
        _print_json(detail)
        return 0
    fields = [(k, v) for k, v in detail.items() if k not in ("headers", "payload")]
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {_cell(value, key)}")
    print("headers:")
    for name, value in detail["headers"].items():
        print(f"  {name}: {value}")
    print("payload:")
    payload = detail["payload"]
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2,
                                                               ensure_ascii=False)
    for line in text.splitlines() or [""]:
        print(f"  {line}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``events replay ID... | --all-dead``: dead events go back to pending, due now."""
    ids: list[str] = list(dict.fromkeys(args.ids))
    if not ids and not args.all_dead:
        raise UserError("events replay: give one or more event ids, or --all-dead")

    async def body(store: EventStore) -> tuple[int, list[str]]:
        not_dead = []
        unknown = []
        for event_id in ids:
            stored = await store.get_event(event_id)
            if stored is None:
                unknown.append(event_id)
            elif stored.status != "dead":
                not_dead.append(f"{event_id} ({stored.status})")
        if unknown:
            raise UserError(f"no event with id {', '.join(unknown)}")
        return await store.replay(ids, all_dead=args.all_dead), not_dead

    moved, skipped = _with_store(args, body)
    if args.json:
        _print_json({"replayed": moved, "skipped_not_dead": skipped})
        return 0
    for item in skipped:
        print(f"skipped, not dead: {item}")
    print(f"replayed {moved} event{'s' if moved != 1 else ''}")
    return 0


# -- plumbing ------------------------------------------------------------------------------


def _with_store(args: argparse.Namespace, body: Callable[[EventStore], Awaitable[Any]]) -> Any:
    """Load the config, open its store (without the daemon's lock), run *body*."""
    cfg = load_config(args.config)

    async def main() -> Any:
        try:
            async with open_store(cfg, must_exist=True) as store:
                return await body(store)
        except StoreError as exc:
            where = sqlite_path(cfg) if cfg.store.backend == "sqlite" else cfg.store.url
            if "no event store" in str(exc):
                raise UserError(f"{args.config}: no event store at {where} "
                                "(has the daemon run with this config?)") from None
            raise UserError(f"{args.config}: {exc}") from None

    with _quiet_logs():
        return anyio.run(main, backend="asyncio")


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Warnings and errors to stderr while the command runs: stdout is the command's output."""
    was_configured, previous = structlog.is_configured(), structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, redact_processor,
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
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


def _time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _redact_headers(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        out[name] = REDACTED if _SECRET_HEADER.search(name) else str(redact(value, name))
    return out


def _payload(stored: StoredEvent) -> Any:
    event = stored.event
    if event.is_json:
        try:
            return redact(json.loads(event.body))
        except ValueError:
            pass
    return redact(event.body)  # text (bytes decoded with replacement), secrets redacted


def _summary(stored: StoredEvent) -> dict[str, Any]:
    e = stored.event
    return {
        "id": e.id, "source": e.source, "type": e.type, "status": stored.status,
        "received_at": _iso(e.received_at), "attempts": stored.attempts,
        "next_attempt_at": _iso(stored.next_attempt_at) if stored.status == "pending" else None,
        "delivered_at": _iso(stored.delivered_at),
        "last_error": redact(stored.last_error) if stored.last_error else None,
    }


def _detail(stored: StoredEvent) -> dict[str, Any]:
    e = stored.event
    out = _summary(stored)
    out.update(content_type=e.content_type, dedupe_key=e.dedupe_key, size=len(e.body),
               headers=_redact_headers(e.headers), payload=_payload(stored))
    return out


def _row(stored: StoredEvent) -> list[str]:
    e = stored.event
    if stored.status == "pending":
        when = _time(stored.next_attempt_at)
    elif stored.status == "delivered":
        when = _time(stored.delivered_at)
    else:
        when = ""
    error = str(redact(stored.last_error or "")).replace("\n", " ")
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 3] + "..."
    return [e.id, stored.status, e.source, e.type, _time(e.received_at), str(stored.attempts),
            when, error]


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") and isinstance(value, str):
        return value.replace("+00:00", "Z")
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))
