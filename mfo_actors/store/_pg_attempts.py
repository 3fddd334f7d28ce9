"""The Postgres ``attempts`` table: each event's delivery history, one row per attempt.

Attempts are written by the settles of ``_pg_events.py`` in their own transaction
(:func:`record_attempt`) and go with their event when it is pruned (:func:`forget_attempts`).
"""

from __future__ import annotations

from collections.abc import Sequence

from mfo_actors.store._codec import ATTEMPT_UPSERT, Send
from mfo_actors.store._pg_base import Conn, PostgresTables
from mfo_actors.store._tables import POSTGRES, SharedAttempts

__all__ = ["PostgresAttempts", "forget_attempts", "record_attempt"]

_ATTEMPT_UPSERT = POSTGRES.sql(ATTEMPT_UPSERT).encode()


def record_attempt(conn: Conn, send: Send, event_id: str, number: int, now: float,
                   outcome: str, error: str | None) -> None:
    """Record (or re-record) attempt *number* of *event_id*."""
    conn.execute(_ATTEMPT_UPSERT, send.params(event_id, number, now, outcome, error))


def forget_attempts(conn: Conn, event_ids: Sequence[str]) -> None:
    """Delete the histories of *event_ids* (pruned events)."""
    if event_ids:
        conn.execute("DELETE FROM attempts WHERE event_id = ANY(%s)", (list(event_ids),))


class PostgresAttempts(PostgresTables, SharedAttempts):
    """Reading the delivery history."""
