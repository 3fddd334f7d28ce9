"""The SQLite ``sessions`` table: chat conversations, one active session per key.

A session is opened for a key (the active one is continued unless idle past its ttl), counts
its turns and keeps the last messages as context, and is closed by its owner, by expiry, or
evicted (the idlest first) when too many are active. Closed sessions are deleted once past
``store.retention`` (:meth:`SQLiteSessions.prune_sessions`, in chunks).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from mfo_actors.ids import new_id
from mfo_actors.store._codec import SESSION_COLS, json_bytes, session_record
from mfo_actors.store._engine import NO_CHANGE, Delta, Op
from mfo_actors.store._protocol import SessionOpen, SessionRecord
from mfo_actors.store._sqlite_base import SQLiteTables
from mfo_actors.store._tables import (
    COUNT_SESSIONS,
    PRUNE_CHUNK,
    PRUNE_SESSIONS,
    SharedSessions,
    prune_in_chunks,
    turn_update,
)

__all__ = ["SQLiteSessions"]


class SQLiteSessions(SQLiteTables, SharedSessions):
    """Chat sessions: the writes (the other calls and the reads are SharedSessions')."""

    def _tx_open_session(
        self, key: str, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any], conn: sqlite3.Connection, now: float,
    ) -> tuple[SessionOpen, Delta]:
        row = conn.execute(
            f"SELECT {SESSION_COLS} FROM sessions WHERE key = ? AND status = 'active'", (key,)
        ).fetchone()
        closed: list[SessionRecord] = []
        if row is not None:
            current = session_record(row)
            if current.last_activity + ttl > now:
                return SessionOpen(session=current, created=False), NO_CHANGE
            closed += self._close_sessions(conn, "session_id = ?", (current.session_id,),
                                           "expired", now)
        (active,) = conn.execute(COUNT_SESSIONS).fetchone()
        if active >= max_active:
            closed += self._close_sessions(
                conn, "seq IN (SELECT seq FROM sessions WHERE status = 'active' "
                "ORDER BY last_activity, seq LIMIT ?)", (active - max_active + 1,),
                "evicted", now)
        row = conn.execute(
            f"INSERT INTO sessions (session_id, key, thread_id, status, turns, created_at, "
            f"last_activity, context, metadata) VALUES (?, ?, ?, 'active', 0, ?, ?, ?, ?) "
            f"RETURNING {SESSION_COLS}",
            (new_id(), key, thread_id, now, now, b"[]", json_bytes(metadata)),
        ).fetchone()
        return SessionOpen(session=session_record(row), created=True, closed=closed), NO_CHANGE

    def _tx_record_turn(
        self, session_id: str, thread_id: str, messages: Sequence[dict[str, Any]],
        limit: int, metadata: dict[str, Any] | None, conn: sqlite3.Connection, now: float,
    ) -> tuple[SessionRecord | None, Delta]:
        row = conn.execute("SELECT context, metadata FROM sessions WHERE session_id = ?",
                           (session_id,)).fetchone()
        if row is None:
            return None, NO_CHANGE
        context, merged = turn_update(row[0], row[1], messages, limit, metadata)
        updated = conn.execute(
            f"UPDATE sessions SET turns = turns + 1, last_activity = MAX(last_activity, ?), "
            f"thread_id = ?, context = ?, metadata = ? WHERE session_id = ? "
            f"RETURNING {SESSION_COLS}",
            (now, thread_id, context, merged, session_id),
        ).fetchone()
        return session_record(updated), NO_CHANGE

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key* (None if it had none)."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[SessionRecord | None, Delta]:
            closed = self._close_sessions(conn, "key = ?", (key,), reason, now)
            return (closed[0] if closed else None), NO_CHANGE

        return await self._submit(Op(tx))

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close every active session idle for *ttl* seconds or more."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[list[SessionRecord], Delta]:
            return self._close_sessions(conn, "last_activity <= ?", (now - ttl,), "expired",
                                        now), NO_CHANGE

        return await self._submit(Op(tx))

    async def prune_sessions(self, *, closed_older_than: float) -> int:
        """Delete sessions closed over *closed_older_than* seconds ago, in chunks."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[int, Delta]:
            cutoff = now - closed_older_than
            gone = conn.execute(PRUNE_SESSIONS, (cutoff, cutoff, PRUNE_CHUNK)).fetchall()
            return len(gone), NO_CHANGE

        return await prune_in_chunks(lambda: self._submit(Op(tx)), what="sessions")
