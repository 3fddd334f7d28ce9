"""The Postgres ``sessions`` table: chat conversations, one active session per key, shared by
every node.

A session is opened for a key (the active one is continued unless idle past its ttl), counts
its turns and keeps the last messages as context, and is closed by its owner, by expiry, or
evicted (the idlest first) when too many are active. A unique index on the active key makes
two nodes opening one key at once agree on one session; a turn locks its session's row, so
two nodes' turns add up. Closed sessions are deleted once past ``store.retention``
(:meth:`PostgresSessions.prune_sessions`, in chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mfo_actors.ids import new_id
from mfo_actors.store._codec import SESSION_COLS, json_bytes, session_record
from mfo_actors.store._engine import NO_CHANGE, Delta, Op
from mfo_actors.store._pg_base import PostgresTables, Tx, locked
from mfo_actors.store._protocol import SessionOpen, SessionRecord
from mfo_actors.store._tables import (
    COUNT_SESSIONS,
    POSTGRES,
    PRUNE_CHUNK,
    PRUNE_SESSIONS,
    SharedSessions,
    prune_in_chunks,
    turn_update,
)

__all__ = ["PostgresSessions"]

_PRUNE_SESSIONS = POSTGRES.sql(PRUNE_SESSIONS).encode()


class PostgresSessions(PostgresTables, SharedSessions):
    """Chat sessions: the writes (the other calls and the reads are SharedSessions')."""

    def _tx_open_session(
        self, key: str, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any], tx: Tx, now: float,
    ) -> tuple[SessionOpen, Delta]:
        conn = tx.conn
        closed: list[SessionRecord] = []
        row = conn.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE key = %s AND "
                           f"status = 'active' FOR UPDATE", (key,)).fetchone()
        if row is not None:
            current = session_record(row)
            if current.last_activity + ttl > now:
                return SessionOpen(session=current, created=False), NO_CHANGE
            closed += self._close_sessions(conn, "session_id = %s", (current.session_id,),
                                           "expired", now)
        found = conn.execute(COUNT_SESSIONS).fetchone()
        active = int(found[0]) if found is not None else 0
        if active >= max_active:
            idlest = locked(conn, "SELECT seq FROM sessions WHERE status = 'active' "
                            "ORDER BY last_activity, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                            (active - max_active + 1,))
            closed += self._close_sessions(conn, "seq = ANY(%s)", (idlest,), "evicted", now)
        row = conn.execute(
            f"INSERT INTO sessions (session_id, key, thread_id, status, turns, created_at, "
            f"last_activity, context, metadata) VALUES (%s, %s, %s, 'active', 0, %s, %s, %s, %s) "
            f"ON CONFLICT (key) WHERE status = 'active' DO NOTHING RETURNING {SESSION_COLS}",
            (new_id(), key, thread_id, now, now, b"[]", json_bytes(metadata)),
        ).fetchone()
        if row is None:  # another node opened it meanwhile (committed): continue that one
            row = conn.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE key = %s AND "
                               f"status = 'active'", (key,)).fetchone()
            assert row is not None
            return SessionOpen(session=session_record(row), created=False,
                               closed=closed), NO_CHANGE
        return SessionOpen(session=session_record(row), created=True, closed=closed), NO_CHANGE

    def _tx_record_turn(
        self, session_id: str, thread_id: str, messages: Sequence[dict[str, Any]],
        limit: int, metadata: dict[str, Any] | None, tx: Tx, now: float,
    ) -> tuple[SessionRecord | None, Delta]:
        row = tx.conn.execute(  # locked: two nodes' turns of one session add up
            "SELECT context, metadata FROM sessions WHERE session_id = %s FOR UPDATE",
            (session_id,)).fetchone()
        if row is None:
            return None, NO_CHANGE
        context, merged = turn_update(row[0], row[1], messages, limit, metadata)
        updated = tx.conn.execute(
            f"UPDATE sessions SET turns = turns + 1, last_activity = GREATEST(last_activity, "
            f"%s), thread_id = %s, context = %s, metadata = %s WHERE session_id = %s "
            f"RETURNING {SESSION_COLS}",
            (now, thread_id, context, merged, session_id),
        ).fetchone()
        return (None if updated is None else session_record(updated)), NO_CHANGE

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key* (None if it had none)."""

        def tx(t: Tx, now: float) -> tuple[SessionRecord | None, Delta]:
            closed = self._close_sessions(t.conn, "key = %s", (key,), reason, now)
            return (closed[0] if closed else None), NO_CHANGE

        return await self._submit(Op(tx))

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close every active session idle for *ttl* seconds or more."""

        def tx(t: Tx, now: float) -> tuple[list[SessionRecord], Delta]:
            return self._close_sessions(t.conn, "last_activity <= %s", (now - ttl,),
                                        "expired", now), NO_CHANGE

        return await self._submit(Op(tx))

    async def prune_sessions(self, *, closed_older_than: float) -> int:
        """Delete sessions closed over *closed_older_than* seconds ago, in chunks."""

        def tx(t: Tx, now: float) -> tuple[int, Delta]:
            cutoff = now - closed_older_than
            gone = t.conn.execute(_PRUNE_SESSIONS, (cutoff, cutoff, PRUNE_CHUNK)).fetchall()
            return len(gone), NO_CHANGE

        return await prune_in_chunks(lambda: self._submit(Op(tx)), what="sessions")
