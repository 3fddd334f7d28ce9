"""``mfo-actors events list|show|dead|replay --config FILE``: look at and replay stored events.

Works while the daemon runs on the same ``state_dir``: it opens the store file directly
(SQLite's WAL lets two processes share it) and does not take the daemon's lock. Secrets never
print: header values and payload fields that hold credentials (signatures, Authorization,
tokens, passwords) and every registered secret value are shown as ``[REDACTED]``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from mfo_actors.commands._common import (
    LIST_DEFAULT_LIMIT,
    common_parser,
    fmt_time,
    iso,
    positive_int,
    print_json,
    short,
    table,
    with_store,
)
from mfo_actors.config import load_config
from mfo_actors.errors import UserError
from mfo_actors.observability import REDACTED, redact
from mfo_actors.store import DeliveryAttempt, EventStore, StoredEvent

__all__ = ["configure"]

STATUSES = ("pending", "claimed", "delivered", "dead")
# Header names whose values are credentials, besides what observability.redact knows.
_SECRET_HEADER = re.compile(r"signature|authorization|token|secret|cookie|api-?key|password",
                            re.IGNORECASE)


def configure(parser: argparse.ArgumentParser) -> None:
    """The ``events`` actions: list, show, dead, replay."""
    parser.description = (
        "Inspect the event store of an instance (works while the daemon runs)."
    )
    actions = parser.add_subparsers(dest="events_action", metavar="ACTION", required=True)

    common = common_parser()

    p = actions.add_parser("list", parents=[common], help="list events, newest first")
    p.add_argument("--status", choices=STATUSES, help="only events in this state")
    p.add_argument("--source", help="only events of this source")
    p.add_argument("--limit", type=positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N events (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", parents=[common], help="one event: headers and payload")
    p.add_argument("id", metavar="ID", help="event id")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("dead", parents=[common], help="list dead-lettered events")
    p.add_argument("--source", help="only events of this source")
    p.add_argument("--limit", type=positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N events (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_dead, status="dead")

    p = actions.add_parser("replay", parents=[common],
                           help="move dead events back to pending (delivered again soon)")
    p.add_argument("ids", nargs="*", metavar="ID", help="dead event ids")
    p.add_argument("--all-dead", action="store_true", help="replay every dead event")
    p.set_defaults(func=cmd_replay)


# -- commands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``events list``: a table (or JSON array) of events, newest first."""

    async def body(store: EventStore) -> list[StoredEvent]:
        return await store.list_events(status=args.status, source=args.source, limit=args.limit)

    events = _with_store(args, body)
    if args.json:
        print_json([_summary(e) for e in events])
    elif not events:
        print("no events")
    else:
        print(table(
            ["ID", "STATUS", "SOURCE", "TYPE", "RECEIVED", "ATTEMPTS", "NEXT/DONE", "ERROR"],
            [_row(e) for e in events],
        ))
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    """``events dead``: ``events list --status dead``."""
    return cmd_list(args)


def cmd_show(args: argparse.Namespace) -> int:
    """``events show ID``: every field, the attempt history, headers and payload, secrets
    redacted."""

    async def body(store: EventStore) -> tuple[StoredEvent | None, list[DeliveryAttempt]]:
        return await store.get_event(args.id), await store.list_attempts(args.id)

    stored, attempts = _with_store(args, body)
    if stored is None:
        raise UserError(f"no event with id {args.id}")
    detail = _detail(stored)
    detail["history"] = [_attempt(a) for a in attempts]
    if args.json:
        print_json(detail)
        return 0
    fields = [(k, v) for k, v in detail.items() if k not in ("headers", "payload", "history")]
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {_cell(value, key)}")
    print("history:" if attempts else "history: no attempt yet")
    if attempts:
        print(_indent(table(
            ["#", "AT", "RESULT", "STATUS", "LATENCY", "ERROR"],
            [[str(a.number), _precise_time(a.at), a.outcome,
              "-" if a.status is None else str(a.status),
              "-" if a.latency is None else f"{a.latency * 1000:.1f} ms", short(a.error)]
             for a in attempts])))
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
        print_json({"replayed": moved, "skipped_not_dead": skipped})
        return 0
    for item in skipped:
        print(f"skipped, not dead: {item}")
    print(f"replayed {moved} event{'s' if moved != 1 else ''}")
    return 0


# -- plumbing ------------------------------------------------------------------------------


def _with_store(args: argparse.Namespace, body: Callable[[EventStore], Awaitable[Any]]) -> Any:
    """Load the config, open its store (without the daemon's lock), run *body*."""
    return with_store(load_config(args.config, need_secrets=False), args.config, body,
                      missing="no event store at {where} (has the daemon run with this config?)")


def _redact_headers(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        out[name] = REDACTED if _SECRET_HEADER.search(name) else str(redact(value, name))
    return out


def _shown_key(key: str | None, headers: dict[str, str]) -> str | None:
    """The ordering key as shown: redacted whole when it is a credential header's value
    (``ordering_key: header:X-Api-Key``), else as ``redact`` leaves it."""
    if key is None:
        return None
    if any(value == key and _SECRET_HEADER.search(name) for name, value in headers.items()):
        return REDACTED
    return str(redact(key))


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
        "received_at": iso(e.received_at), "attempts": stored.attempts,
        "next_attempt_at": iso(stored.next_attempt_at) if stored.status == "pending" else None,
        "delivered_at": iso(stored.delivered_at),
        "last_error": redact(stored.last_error) if stored.last_error else None,
    }


def _detail(stored: StoredEvent) -> dict[str, Any]:
    e = stored.event
    out = _summary(stored)
    out.update(content_type=e.content_type, dedupe_key=e.dedupe_key,
               ordering_key=_shown_key(e.ordering_key, e.headers),
               size=len(e.body),
               headers=_redact_headers(e.headers), payload=_payload(stored))
    return out


def _attempt(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "number": attempt.number, "at": iso(attempt.at), "outcome": attempt.outcome,
        "status": attempt.status,
        "latency_ms": None if attempt.latency is None else round(attempt.latency * 1000, 1),
        "error": redact(attempt.error) if attempt.error else None,
    }


def _precise_time(ts: float) -> str:
    """``2024-05-01 12:00:00.123Z``: attempts can be milliseconds apart."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _row(stored: StoredEvent) -> list[str]:
    e = stored.event
    if stored.status == "pending":
        when = fmt_time(stored.next_attempt_at)
    elif stored.status == "delivered":
        when = fmt_time(stored.delivered_at)
    else:
        when = ""
    return [e.id, stored.status, e.source, e.type, fmt_time(e.received_at), str(stored.attempts),
            when, short(stored.last_error)]


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") and isinstance(value, str):
        return value.replace("+00:00", "Z")
    return str(value)
