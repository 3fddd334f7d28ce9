"""The SQLite ``events`` table: the durable mailbox between the listener and the forwarder.

An event is appended ``pending``, claimed (``claimed``, with a token and a lease) by the
forwarder, and settled with that token: ``delivered``, ``pending`` again with a later due
time (``reschedule``), or ``dead``. Ordered claims keep each lane's order (``Event.lane``: the
ordering key, else the source): only a lane's oldest unsettled event (its head) and the due
ones right behind it are claimed. The ``lanes`` table says which lanes to look at and from
where (``_tables.claim_lanes``, shared with Postgres); every append, settle and replay
touches its lane's row in the same transaction. Each settle records the attempt
(``_sqlite_attempts.py``) in the same transaction.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio.lowlevel

from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.observability import get_logger
from mfo_actors.store._codec import ATTEMPT_UPSERT, EVENT_COLS, Send, json_bytes, stored_event
from mfo_actors.store._engine import NO_CHANGE, SETTLE_LINGER, Delta, Op
from mfo_actors.store._protocol import AppendResult, Delivered, RunRequest, StoredEvent
from mfo_actors.store._sqlite_attempts import forget_attempts, record_attempt
from mfo_actors.store._sqlite_base import SQLiteTables, chunks, marks
from mfo_actors.store._sqlite_runs import insert_runs
from mfo_actors.store._tables import (
    PRUNE_CHUNK,
    PRUNE_EVENTS,
    LaneHead,
    SharedEvents,
    claim_lanes,
    in_seq_order,
    prune_in_chunks,
    stale_settle,
)

__all__ = ["SQLiteEvents", "insert_events"]

log = get_logger("mfo_actors.store.sqlite")

# A lane's oldest unsettled events above its cursor, in acceptance order (ordered claims).
_HEADS_SQL = """
SELECT seq, status, next_attempt_at, lease_until FROM events INDEXED BY events_lanes
WHERE lane = ? AND seq > ? AND status IN ('pending', 'claimed') ORDER BY seq LIMIT ?
"""
# Have claimers look at a lane from ready_at on (creating its row: lanes idle for a long time
# are pruned). Appends leave the cursor alone; a replay lowers it (_TOUCH_BELOW).
_TOUCH = (
    "INSERT INTO lanes (lane, cursor, ready_at) VALUES (?, 0, ?) ON CONFLICT (lane) "
    "DO UPDATE SET ready_at = MIN(ready_at, excluded.ready_at)"
)
_TOUCH_BELOW = (
    "INSERT INTO lanes (lane, cursor, ready_at) VALUES (?, ?, ?) ON CONFLICT (lane) "
    "DO UPDATE SET ready_at = MIN(ready_at, excluded.ready_at), "
    "cursor = MIN(cursor, excluded.cursor)"
)


_INSERT_EVENT = (
    "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
    "is_json, dedupe_key, size, status, next_attempt_at, ordering_key, lane) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
)


def _event_row(event: Event, size: int, now: float) -> tuple[Any, ...]:
    return (event.id, event.source, event.type, event.received_at, json_bytes(event.headers),
            event.body, event.content_type, int(event.is_json), event.dedupe_key, size, now,
            event.ordering_key, event.lane)


def insert_events(conn: sqlite3.Connection, ops: list[Op[Any]], now: float) -> None:
    """Appends marked ``row`` (no dedupe key, no runs), in one ``executemany`` (the writer
    calls it for each run of them in a batch)."""
    rows: list[tuple[Event, int]] = [op.row for op in ops]  # type: ignore[misc]
    conn.executemany(_INSERT_EVENT, [_event_row(event, size, now) for event, size in rows])
    conn.executemany(_TOUCH, [(lane, now) for lane in {event.lane for event, _ in rows}])
    for op, (event, size) in zip(ops, rows, strict=True):
        op.result = AppendResult(event.id)
        op.delta = Delta(pending=1, bytes=size, wake_events=True)


def _ready_lanes(conn: sqlite3.Connection, now: float, n: int) -> list[tuple[str, int]]:
    return conn.execute("SELECT lane, cursor FROM lanes WHERE ready_at <= ? "
                        "ORDER BY ready_at, lane LIMIT ?", (now, n)).fetchall()


def _lane_heads(conn: sqlite3.Connection, run: int, ready: Sequence[tuple[str, int]]
                ) -> dict[str, list[LaneHead]]:
    return {lane: conn.execute(_HEADS_SQL, (lane, cursor, run)).fetchall()
            for lane, cursor in ready}


def _update_lanes(conn: sqlite3.Connection, lanes: list[str], cursors: list[int | None],
                  looks: list[float]) -> None:
    conn.executemany("UPDATE lanes SET cursor = COALESCE(?, cursor), ready_at = ? "
                     "WHERE lane = ?", zip(cursors, looks, lanes, strict=True))


class SQLiteEvents(SQLiteTables, SharedEvents):
    """Appending, claiming, settling, replaying and pruning events."""

    async def append(self, event: Event, *, runs: Sequence[RunRequest] = ()) -> AppendResult:
        """Store *event* (and *runs*) in the next group commit; return once it is on disk."""
        size = len(event.body)
        self._reserve(size)
        # Without a dedupe key or runs, nothing can make the insert differ from a plain one:
        # the writer may insert it together with its neighbours (``row``).
        op = Op(partial(self._tx_append, event, tuple(runs), size), reserved=size,
                row=None if runs or event.dedupe_key is not None else (event, size))
        return await self._submit(op)

    def _tx_append(
        self, event: Event, runs: Sequence[RunRequest], size: int,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[AppendResult, Delta]:
        if event.dedupe_key is not None:
            row = conn.execute(
                "SELECT id FROM events WHERE source = ? AND dedupe_key = ? AND received_at >= ? "
                "ORDER BY seq LIMIT 1",
                (event.source, event.dedupe_key, event.received_at - self._dedupe_window),
            ).fetchone()
            if row is not None:
                return AppendResult(row[0], duplicate=True), NO_CHANGE
        conn.execute(_INSERT_EVENT, _event_row(event, size, now))
        conn.execute(_TOUCH, (event.lane, now))
        created = insert_runs(conn, runs, now) if runs else []
        return AppendResult(event.id), Delta(
            pending=1, bytes=size, wake_events=True, wake_runs=bool(created)
        )

    def _claim_op(self, limit: int, lease: float, ordered: bool, per_source: int
                  ) -> Op[list[StoredEvent]]:
        return Op(partial(self._tx_claim, limit, lease, ordered, per_source), claim=True)

    def _tx_claim(
        self, limit: int, lease: float, ordered: bool, per_source: int,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[list[StoredEvent], Delta]:
        expired = conn.execute(
            "UPDATE events SET status = 'pending', claim_token = NULL, lease_until = NULL, "
            "next_attempt_at = ? WHERE status = 'claimed' AND lease_until <= ?",
            (now, now),
        ).rowcount
        if expired:
            log.warning("store.leases_expired", count=expired)
        if ordered:
            seqs = claim_lanes(partial(_ready_lanes, conn, now),
                               partial(_lane_heads, conn, per_source),
                               partial(_update_lanes, conn),
                               limit=limit, lease=lease, now=now)
        else:
            seqs = [r[0] for r in conn.execute(
                "SELECT seq FROM events WHERE status = 'pending' AND next_attempt_at <= ? "
                "ORDER BY seq LIMIT ?", (now, limit))]
        if not seqs:
            return [], NO_CHANGE
        token = new_id()
        rows = conn.execute(
            f"UPDATE events SET status = 'claimed', claim_token = ?, claimed_by = ?, "
            f"lease_until = ? WHERE seq IN ({marks(len(seqs))}) RETURNING seq, {EVENT_COLS}",
            (token, self._node, now + lease, *seqs),
        ).fetchall()
        return in_seq_order(rows, stored_event), NO_CHANGE

    def _settle(
        self, conn: sqlite3.Connection, event_id: str, token: str, outcome: str, set_sql: str,
        params: tuple[Any, ...], now: float, send: Send | None, error: str | None, *,
        next_look: float,
    ) -> int | None:
        """Update a claimed event by id and token (``SET`` *set_sql*), record the attempt
        (*send*, as *outcome*) and have claimers look at its lane from *next_look*; the
        event's size, or None when the token is stale."""
        row = conn.execute(
            f"UPDATE events SET {set_sql}, claim_token = NULL, lease_until = NULL "
            f"WHERE id = ? AND status = 'claimed' AND claim_token = ? "
            f"RETURNING size, attempts, lane",
            (*params, event_id, token),
        ).fetchone()
        if row is None:
            stale_settle(event_id, outcome)
            return None
        conn.execute(_TOUCH, (row[2], next_look))
        if send is not None:
            record_attempt(conn, send, event_id, row[1], now, outcome, error)
        return int(row[0])

    async def mark_delivered_many(self, deliveries: Sequence[Delivered]) -> None:
        """Settle claimed events as delivered, in one op (see the protocol)."""
        if not deliveries:
            await anyio.lowlevel.checkpoint()
            return
        await self._submit(Op(partial(self._tx_delivered, tuple(deliveries)),
                              linger=SETTLE_LINGER))

    def _tx_delivered(self, deliveries: tuple[Delivered, ...], conn: sqlite3.Connection,
                      now: float) -> tuple[None, Delta]:
        """Each delivery as :meth:`_settle` would do it, set-wise: one ``UPDATE ... FROM
        (VALUES ...)`` per chunk (by id, through its index; only where the token still
        holds), then the lanes touched and the attempts recorded with ``executemany``."""
        by_id = {d.event_id: d for d in deliveries}
        done: list[tuple[str, int, int, str]] = []
        for chunk in chunks(list(by_id)):
            params: list[Any] = [now]
            for event_id in chunk:
                params += (event_id, by_id[event_id].claim_token)
            done += conn.execute(
                "UPDATE events SET status = 'delivered', delivered_at = ?, "
                "attempts = attempts + 1, last_error = NULL, claim_token = NULL, "
                f"lease_until = NULL FROM (VALUES {','.join(['(?, ?)'] * len(chunk))}) AS s "
                "WHERE events.id = s.column1 AND events.claim_token = s.column2 "
                "AND events.status = 'claimed' RETURNING events.id, size, attempts, lane",
                params).fetchall()
        for event_id in by_id.keys() - {row[0] for row in done}:
            stale_settle(event_id, "delivered")
        if not done:
            return None, NO_CHANGE
        conn.executemany(_TOUCH, [(lane, now) for lane in {row[3] for row in done}])
        attempts: list[tuple[Any, ...]] = []
        for event_id, _, number, _ in done:
            d = by_id[event_id]
            send = Send(d.sent_at, d.status, d.latency)
            attempts.append(send.params(event_id, number, now, "delivered", None))
        conn.executemany(ATTEMPT_UPSERT, attempts)
        return None, Delta(pending=-len(done), bytes=-sum(row[1] for row in done),
                           delivered=len(done), wake_events=True)

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as pending, due at *next_attempt_at* (see the protocol)."""
        await self._submit(Op(partial(
            self._tx_reschedule, event_id, claim_token, next_attempt_at, error,
            Send(sent_at, status, latency) if count_attempt else None)))

    def _tx_reschedule(
        self, event_id: str, token: str, next_at: float, error: str, send: Send | None,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[None, Delta]:
        size = self._settle(
            conn, event_id, token, "retry",
            "status = 'pending', next_attempt_at = ?, last_error = ?, attempts = attempts + ?",
            (next_at, error, int(send is not None)), now, send, error,
            next_look=max(next_at, now))
        return None, Delta(wake_events=size is not None and next_at <= now)

    async def dead_letter(
        self, event_id: str, claim_token: str, *, reason: str, sent_at: float | None = None,
        status: int | None = None, latency: float | None = None,
    ) -> None:
        """Settle a claimed event as dead with *reason*; counts an attempt."""
        await self._submit(Op(partial(
            self._tx_dead, event_id, claim_token, reason, Send(sent_at, status, latency))))

    def _tx_dead(
        self, event_id: str, token: str, reason: str, send: Send, conn: sqlite3.Connection,
        now: float,
    ) -> tuple[None, Delta]:
        size = self._settle(conn, event_id, token, "dead",
                            "status = 'dead', last_error = ?, attempts = attempts + 1",
                            (reason,), now, send, reason, next_look=now)
        if size is None:
            return None, NO_CHANGE
        # Wakes the forwarder: the next event of this lane may now be claimable.
        return None, Delta(pending=-1, bytes=-size, dead=1, wake_events=True)

    async def oldest_pending_at(self) -> float | None:
        """``received_at`` of the oldest pending or claimed event (two index probes)."""

        def read(conn: sqlite3.Connection) -> float | None:
            found = [conn.execute(
                "SELECT received_at FROM events WHERE status = ? ORDER BY seq LIMIT 1",
                (status,)).fetchone() for status in ("pending", "claimed")]
            times = [r[0] for r in found if r is not None]
            return min(times) if times else None

        return await self._read(read)

    async def recover_claims(self) -> int:
        """Make this node's claimed events pending and due now (start-up after a crash).

        One file has one node, but claims written before node ids existed (no owner) are
        taken back too."""
        return await self._submit(Op(self._tx_recover_claims))

    def _tx_recover_claims(self, conn: sqlite3.Connection, now: float) -> tuple[int, Delta]:
        lanes = conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = ?, claim_token = NULL, "
            "lease_until = NULL, claimed_by = NULL "
            "WHERE status = 'claimed' AND (claimed_by = ? OR claimed_by IS NULL) RETURNING lane",
            (now, self._node),
        ).fetchall()
        n = len(lanes)
        conn.executemany(_TOUCH, [(lane, now) for lane in {r[0] for r in lanes}])
        if n:
            log.info("store.claims_recovered", count=n)
        return n, Delta(wake_events=n > 0)

    async def replay(self, event_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Move dead events back to pending, due now, with a fresh retry budget; return how
        many moved.

        Attempts go on counting (``attempt_base`` marks where the new budget starts). Ids
        that are unknown or not dead are skipped. ``last_error`` is kept until delivered.
        """
        ids = list(event_ids)
        if not ids and not all_dead:
            await anyio.lowlevel.checkpoint()
            return 0
        return await self._submit(Op(partial(self._tx_replay, ids, all_dead)))

    def _tx_replay(
        self, ids: list[str], all_dead: bool, conn: sqlite3.Connection, now: float
    ) -> tuple[int, Delta]:
        sql = ("UPDATE events SET status = 'pending', attempt_base = attempts, "
               "next_attempt_at = ?, claim_token = NULL, lease_until = NULL "
               "WHERE status = 'dead'")
        back = " RETURNING size, lane, seq"
        rows: list[tuple[int, str, int]] = []
        if all_dead:
            rows += conn.execute(sql + back, (now,)).fetchall()
        for chunk in chunks(ids):
            rows += conn.execute(
                sql + f" AND id IN ({marks(len(chunk))})" + back, (now, *chunk)).fetchall()
        # A replayed event sits below its lane's cursor: claimers must read from it again.
        below: dict[str, int] = {}
        for _, lane, seq in rows:
            below[lane] = min(below.get(lane, seq), seq)
        conn.executemany(_TOUCH_BELOW, [(lane, seq - 1, now) for lane, seq in below.items()])
        sizes = [r[0] for r in rows]
        n = len(sizes)
        if n:
            log.info("store.replayed", count=n)
        return n, Delta(pending=n, bytes=sum(sizes), dead=-n, wake_events=n > 0)

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered over *delivered_older_than* seconds ago.

        Events with a dedupe key received within the dedupe window are kept, so provider
        retries are still recognised. Deletes in chunks, so appends go on meanwhile.
        """
        return await prune_in_chunks(
            lambda: self._submit(Op(partial(self._tx_prune, delivered_older_than))))

    def _tx_prune(self, age: float, conn: sqlite3.Connection, now: float) -> tuple[int, Delta]:
        ids = [r[0] for r in conn.execute(
            PRUNE_EVENTS, (now - age, now - self._dedupe_window, PRUNE_CHUNK))]
        forget_attempts(conn, ids)
        # Lanes with nothing unsettled since the last claim looked (one per past user id, with
        # user-id keys): an append or a replay creates the row again.
        conn.execute("DELETE FROM lanes WHERE lane IN (SELECT lane FROM lanes "
                     "WHERE ready_at = ? LIMIT ?)", (math.inf, PRUNE_CHUNK))
        return len(ids), Delta(delivered=-len(ids))
