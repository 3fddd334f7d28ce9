"""``mfo-actors sessions list|show KEY|close KEY --config FILE``: an instance's chat sessions.

A session maps a key chosen in a flow (``mfo.chat`` with ``session:``) to an MFO thread. These
commands read and change the store directly (they work while the daemon runs, as ``events``
does). ``close KEY`` ends a conversation: the key's next message starts a new thread.
Imports are made when a command runs, so ``mfo-actors --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mfo_actors.store import EventStore, SessionRecord

__all__ = ["configure"]

NO_SESSION_STORE = "no store at {where} (has the daemon or `chat --session` run with this config?)"
CONTEXT_WIDTH = 100  # characters of one context message shown by ``sessions show``


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``sessions list``, ``sessions show`` and ``sessions close`` to the CLI."""
    from mfo_actors.commands._common import LIST_DEFAULT_LIMIT, common_parser, positive_int

    parser.description = (
        "Inspect and close the chat sessions of an instance (mfo.chat with "
        "session:), which map a key to an MFO thread. Works while the daemon runs."
    )
    actions = parser.add_subparsers(dest="sessions_action", metavar="ACTION", required=True)
    common = common_parser()

    p = actions.add_parser("list", parents=[common], help="sessions, most recently active first")
    p.add_argument("--status", choices=("active", "closed"), help="only sessions in this state")
    p.add_argument("--limit", type=positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N sessions (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", parents=[common], help="one session and its recent messages")
    p.add_argument("key", metavar="KEY", help="the session key (as the flow's session:)")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("close", parents=[common],
                           help="close a session: its next message starts a new thread")
    p.add_argument("key", metavar="KEY", help="the session key")
    p.set_defaults(func=cmd_close)


def _run(args: argparse.Namespace, body: Any) -> Any:
    from mfo_actors.commands._common import with_store
    from mfo_actors.config import load_config

    return with_store(load_config(args.config, need_secrets=False), args.config, body,
                      missing=NO_SESSION_STORE)


def cmd_list(args: argparse.Namespace) -> int:
    """``sessions list``: a table (or JSON array) of sessions."""
    from mfo_actors.commands._common import fmt_time, print_json, table

    async def body(store: EventStore) -> list[SessionRecord]:
        return await store.list_sessions(status=args.status, limit=args.limit)

    sessions = _run(args, body)
    if args.json:
        print_json([session_summary(s) for s in sessions])
    elif not sessions:
        print("no sessions")
    else:
        print(table(["KEY", "THREAD", "STATUS", "TURNS", "CREATED", "LAST ACTIVITY"], [
            [s.key, s.thread_id, _status(s), str(s.turns), fmt_time(s.created_at),
             fmt_time(s.last_activity)] for s in sessions]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``sessions show KEY``: the key's active session (else its latest), with its context."""
    from mfo_actors.commands._common import fmt_time, print_json
    from mfo_actors.errors import UserError
    from mfo_actors.observability import redact

    async def body(store: EventStore) -> SessionRecord | None:
        return await store.get_session(args.key)

    found: SessionRecord | None = _run(args, body)
    if found is None:
        raise UserError(f"no session with key {args.key!r}")
    if args.json:
        print_json({**session_summary(found), "context": redact(found.context),
                    "metadata": redact(found.metadata)})
        return 0
    fields: list[tuple[str, Any]] = [
        ("key", found.key), ("id", found.session_id), ("thread", found.thread_id),
        ("status", _status(found)), ("turns", found.turns),
        ("created", fmt_time(found.created_at)), ("last activity", fmt_time(found.last_activity)),
    ]  # fmt: skip
    if found.closed_at is not None:
        fields.append(("closed", fmt_time(found.closed_at)))
    for name, value in found.metadata.items():
        fields.append((name.replace("_", " "), value))
    width = max(len(k) for k, _ in fields) + 1
    for name, value in fields:
        print(f"{name + ':':<{width}} {'-' if value in (None, '') else value}")
    if found.context:
        print()
        print("recent messages:")
        for message in found.context:
            text = " ".join(str(redact(message.get("content", ""))).split())
            if len(text) > CONTEXT_WIDTH:
                text = text[: CONTEXT_WIDTH - 3] + "..."
            print(f"  {message.get('role', '?')}: {text}")
    return 0


def cmd_close(args: argparse.Namespace) -> int:
    """``sessions close KEY``: close the key's active session (1 if it has none)."""
    from mfo_actors.commands._common import print_json
    from mfo_actors.errors import UserError

    async def body(store: EventStore) -> SessionRecord | None:
        return await store.close_session(args.key, reason="closed")

    closed: SessionRecord | None = _run(args, body)
    if closed is None:
        raise UserError(f"no active session with key {args.key!r}")
    if args.json:
        print_json(session_summary(closed))
    else:
        print(f"closed session {closed.key} (thread {closed.thread_id}, {closed.turns} turns)")
    return 0


def _status(session: SessionRecord) -> str:
    if session.status == "closed" and session.close_reason:
        return f"closed ({session.close_reason})"
    return session.status


def session_summary(session: SessionRecord) -> dict[str, Any]:
    """A session as JSON-able fields (times ISO 8601), without its context."""
    from mfo_actors.commands._common import iso

    return {
        "key": session.key, "id": session.session_id, "thread_id": session.thread_id,
        "status": session.status, "close_reason": session.close_reason, "turns": session.turns,
        "created_at": iso(session.created_at), "last_activity": iso(session.last_activity),
        "closed_at": iso(session.closed_at),
    }  # fmt: skip
