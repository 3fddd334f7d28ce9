"""The SQLite ``attempts`` table: each event's delivery history, one row per attempt.

Attempts are written by the settles of ``_sqlite_events.py`` in their own transaction
(:func:`record_attempt`) and go with their event when it is pruned (:func:`forget_attempts`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from mfo_actors.store._codec import ATTEMPT_UPSERT, Send
from mfo_actors.store._sqlite_base import SQLiteTables, chunks, marks
from mfo_actors.store._tables import SharedAttempts

__all__ = ["SQLiteAttempts", "forget_attempts", "record_attempt"]


def record_attempt(conn: sqlite3.Connection, send: Send, event_id: str, number: int,
                   now: float, outcome: str, error: str | None) -> None:
    """Record (or re-record) attempt *number* of *event_id*."""
    conn.execute(ATTEMPT_UPSERT, send.params(event_id, number, now, outcome, error))


def forget_attempts(conn: sqlite3.Connection, event_ids: Sequence[str]) -> None:
    """Delete the histories of *event_ids* (pruned events)."""
    for chunk in chunks(event_ids):
        conn.execute(f"DELETE FROM attempts WHERE event_id IN ({marks(len(chunk))})", chunk)


class SQLiteAttempts(SQLiteTables, SharedAttempts):
    """Reading the delivery history."""
