"""The Postgres ``events`` table: the durable mailbox between listeners and forwarders of all
nodes.

An event is appended ``pending``, claimed (``claimed``, with a token, a lease and this node's
id) by a forwarder, and settled with that token: ``delivered``, ``pending`` again with a later
due time (``reschedule``), or ``dead``. The ``lanes`` table keeps each lane's order across
nodes (``Event.lane``: the ordering key, else the source): an ordered claim locks ready lanes
(``FOR UPDATE SKIP LOCKED``), reads each one's head events from its cursor and claims the due
ones (``_tables.claim_lanes``); appends, settles and replays say when to look at a lane again
(:meth:`Tx.touch`). Each settle records the attempt (``_pg_attempts.py``) in the
same transaction; dedupe keys live in ``dedupe``, so two nodes agree on the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio.lowlevel

from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.observability import get_logger
from mfo_actors.store._codec import EVENT_COLS, Send, json_bytes, stored_event
from mfo_actors.store._engine import NO_CHANGE, SETTLE_LINGER, Delta, Op
from mfo_actors.store._pg_attempts import forget_attempts, record_attempt
from mfo_actors.store._pg_base import Conn, PostgresTables, Tx, locked
from mfo_actors.store._pg_runs import insert_runs
from mfo_actors.store._protocol import AppendResult, Delivered, RunRequest, StoredEvent
from mfo_actors.store._tables import (
    POSTGRES,
    PRUNE_CHUNK,
    PRUNE_EVENTS,
    LaneHead,
    SharedEvents,
    claim_lanes,
    in_seq_order,
    prune_in_chunks,
    stale_settle,
)

__all__ = ["PostgresEvents"]

log = get_logger("mfo_actors.store.postgres")

_CLAIMED_MEMORY = 100_000  # event id -> lane of this node's claims, for settles' lock order
_PRUNE_EVENTS = POSTGRES.sql(PRUNE_EVENTS).encode()


class PostgresEvents(PostgresTables, SharedEvents):
    """Appending, claiming, settling, replaying and pruning events."""

    _claimed: dict[str, str]  # event id -> lane, for events this node claimed

    async def append(self, event: Event, *, runs: Sequence[RunRequest] = ()) -> AppendResult:
        """Store *event* (and *runs*) in the next group commit; return once it is on disk."""
        size = len(event.body)
        self._reserve(size)
        op = Op(partial(self._tx_append, event, tuple(runs), size), reserved=size,
                lanes=(event.lane,))
        return await self._submit(op)

    def _tx_append(
        self, event: Event, runs: Sequence[RunRequest], size: int, tx: Tx, now: float
    ) -> tuple[AppendResult, Delta]:
        conn = tx.conn
        if event.dedupe_key is not None:
            # Whoever inserts (or replaces an expired) key first stores the event; a concurrent
            # insert of the same key waits for that commit, then finds it here.
            won = conn.execute(
                "INSERT INTO dedupe AS d (source, dedupe_key, event_id, received_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (source, dedupe_key) DO UPDATE "
                "SET event_id = EXCLUDED.event_id, received_at = EXCLUDED.received_at "
                "WHERE d.received_at < EXCLUDED.received_at - %s RETURNING event_id",
                (event.source, event.dedupe_key, event.id, event.received_at,
                 self._dedupe_window),
            ).fetchone()
            if won is None:
                first = conn.execute(
                    "SELECT event_id FROM dedupe WHERE source = %s AND dedupe_key = %s",
                    (event.source, event.dedupe_key)).fetchone()
                assert first is not None
                return AppendResult(first[0], duplicate=True), NO_CHANGE
        conn.execute(
            "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
            "is_json, dedupe_key, size, status, next_attempt_at, ordering_key, lane) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s)",
            (event.id, event.source, event.type, event.received_at, json_bytes(event.headers),
             event.body, event.content_type, event.is_json, event.dedupe_key, size, now,
             event.ordering_key, event.lane),
        )
        tx.touch(event.lane, now)
        created = insert_runs(conn, runs, now) if runs else []
        return AppendResult(event.id), Delta(
            pending=1, bytes=size, wake_events=True, wake_runs=bool(created))

    def _claim_op(self, limit: int, lease: float, ordered: bool, per_source: int
                  ) -> Op[list[StoredEvent]]:
        fn = (partial(self._tx_claim_ordered, limit, lease, per_source)
              if ordered else partial(self._tx_claim_unordered, limit, lease))
        return Op(fn, claim=True)

    def _tx_claim_ordered(
        self, limit: int, lease: float, per_source: int, tx: Tx, now: float
    ) -> tuple[list[StoredEvent], Delta]:
        conn = tx.conn

        def ready(n: int) -> list[tuple[str, int]]:
            return conn.execute(
                "SELECT lane, cursor FROM lanes WHERE ready_at <= %s "
                "ORDER BY ready_at, lane LIMIT %s FOR UPDATE SKIP LOCKED", (now, n)).fetchall()

        def heads(rows: Sequence[tuple[str, int]]) -> dict[str, list[LaneHead]]:
            found: dict[str, list[LaneHead]] = {}
            for lane, seq, status, due, lease_until in conn.execute(
                "SELECT s.lane, e.seq, e.status, e.next_attempt_at, e.lease_until "
                "FROM unnest(%s::text[], %s::int8[]) AS s(lane, cursor) CROSS JOIN LATERAL ("
                "  SELECT seq, status, next_attempt_at, lease_until FROM events "
                "  WHERE events.lane = s.lane AND events.seq > s.cursor "
                "    AND events.status IN ('pending', 'claimed') "
                "  ORDER BY events.seq LIMIT %s) AS e",
                ([r[0] for r in rows], [r[1] for r in rows], per_source),
            ):
                found.setdefault(lane, []).append((seq, status, due, lease_until))
            return found

        def update(lanes: list[str], cursors: list[int | None], looks: list[float]) -> None:
            conn.execute(
                "UPDATE lanes SET cursor = COALESCE(u.c, lanes.cursor), ready_at = u.r "
                "FROM unnest(%s::text[], %s::int8[], %s::float8[]) AS u(s, c, r) "
                "WHERE lanes.lane = u.s", (lanes, cursors, looks))

        seqs = claim_lanes(ready, heads, update, limit=limit, lease=lease, now=now)
        return self._take(conn, seqs, lease, now), NO_CHANGE

    def _tx_claim_unordered(
        self, limit: int, lease: float, tx: Tx, now: float
    ) -> tuple[list[StoredEvent], Delta]:
        conn = tx.conn
        expired = locked(conn, "SELECT seq FROM events WHERE status = 'claimed' "
                         "AND lease_until <= %s FOR UPDATE SKIP LOCKED", (now,))
        if expired:
            conn.execute(
                "UPDATE events SET status = 'pending', claim_token = NULL, claimed_by = NULL, "
                "lease_until = NULL, next_attempt_at = %s WHERE seq = ANY(%s)", (now, expired))
        if expired:
            log.warning("store.leases_expired", count=len(expired))
        seqs = [r[0] for r in conn.execute(
            "SELECT seq FROM events WHERE status = 'pending' AND next_attempt_at <= %s "
            "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED", (now, limit))]
        return self._take(conn, seqs, lease, now), NO_CHANGE

    def _take(self, conn: Conn, seqs: list[int], lease: float, now: float) -> list[StoredEvent]:
        """Claim the events *seqs* for this node under one new token."""
        if not seqs:
            return []
        rows = conn.execute(
            f"UPDATE events SET status = 'claimed', claim_token = %s, claimed_by = %s, "
            f"lease_until = %s WHERE seq = ANY(%s) RETURNING seq, {EVENT_COLS}",
            (new_id(), self._node, now + lease, seqs),
        ).fetchall()
        claimed = in_seq_order(rows, stored_event)
        if len(self._claimed) > _CLAIMED_MEMORY:  # settles that never came (leases ran out)
            self._claimed.clear()
        for c in claimed:
            self._claimed[c.event.id] = c.event.lane
        return claimed

    def _settle_op(self, fn: Callable[..., tuple[None, Delta]], event_id: str,
                   *args: Any) -> Op[None]:
        lane = self._claimed.pop(event_id, None)
        return Op(partial(fn, event_id, *args), lanes=() if lane is None else (lane,))

    def _settle(
        self, tx: Tx, event_id: str, token: str, action: str, set_sql: str,
        params: tuple[Any, ...], next_look: float, now: float, send: Send | None,
        error: str | None,
    ) -> int | None:
        """Update a claimed event by id and token, record the attempt (*send*, as
        *action*), and wake its lane at *next_look*; the event's size, or None (stale)."""
        row = tx.conn.execute(
            f"UPDATE events SET {set_sql}, claim_token = NULL, claimed_by = NULL, "
            f"lease_until = NULL WHERE id = %s AND status = 'claimed' AND claim_token = %s "
            f"RETURNING size, lane, attempts",
            (*params, event_id, token),
        ).fetchone()
        if row is None:
            stale_settle(event_id, action)
            return None
        tx.touch(row[1], next_look)
        if send is not None:
            record_attempt(tx.conn, send, event_id, row[2], now, action, error)
        return int(row[0])

    async def mark_delivered_many(self, deliveries: Sequence[Delivered]) -> None:
        """Settle claimed events as delivered, in one op (see the protocol)."""
        if not deliveries:
            await anyio.lowlevel.checkpoint()
            return
        popped = (self._claimed.pop(d.event_id, None) for d in deliveries)
        lanes = tuple({lane for lane in popped if lane is not None})
        await self._submit(Op(partial(self._tx_delivered, tuple(deliveries)), lanes=lanes,
                              linger=SETTLE_LINGER))

    def _tx_delivered(self, deliveries: tuple[Delivered, ...], tx: Tx, now: float
                      ) -> tuple[None, Delta]:
        delta = Delta()
        for d in deliveries:
            size = self._settle(
                tx, d.event_id, d.claim_token, "delivered",
                "status = 'delivered', delivered_at = %s, attempts = attempts + 1, "
                "last_error = NULL", (now,), now, now, Send(d.sent_at, d.status, d.latency),
                None)
            if size is not None:
                delta.pending -= 1
                delta.bytes -= size
                delta.delivered += 1
                delta.wake_events = True
        return None, delta

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as pending, due at *next_attempt_at* (see the protocol)."""
        await self._submit(self._settle_op(
            self._tx_reschedule, event_id, claim_token, next_attempt_at, error,
            Send(sent_at, status, latency) if count_attempt else None))

    def _tx_reschedule(
        self, event_id: str, token: str, next_at: float, error: str, send: Send | None,
        tx: Tx, now: float,
    ) -> tuple[None, Delta]:
        size = self._settle(
            tx, event_id, token, "retry",
            "status = 'pending', next_attempt_at = %s, last_error = %s, attempts = attempts + %s",
            (next_at, error, int(send is not None)), max(next_at, now), now, send, error)
        return None, Delta(wake_events=size is not None and next_at <= now)

    async def dead_letter(
        self, event_id: str, claim_token: str, *, reason: str, sent_at: float | None = None,
        status: int | None = None, latency: float | None = None,
    ) -> None:
        """Settle a claimed event as dead with *reason*; counts an attempt."""
        await self._submit(self._settle_op(self._tx_dead, event_id, claim_token, reason,
                                           Send(sent_at, status, latency)))

    def _tx_dead(self, event_id: str, token: str, reason: str, send: Send, tx: Tx,
                 now: float) -> tuple[None, Delta]:
        size = self._settle(tx, event_id, token, "dead",
                            "status = 'dead', last_error = %s, attempts = attempts + 1",
                            (reason,), now, now, send, reason)
        if size is None:
            return None, NO_CHANGE
        # Wakes the forwarder: the next event of this lane may now be claimable.
        return None, Delta(pending=-1, bytes=-size, dead=1, wake_events=True)

    async def oldest_pending_at(self) -> float | None:
        """``received_at`` of the cluster's oldest pending or claimed event (index probes)."""

        def read(conn: Conn) -> float | None:
            row = conn.execute(
                "SELECT min(received_at) FROM (SELECT received_at FROM events "
                "WHERE status = 'pending' ORDER BY seq LIMIT 1) AS p"
            ).fetchone()
            claimed = conn.execute(
                "SELECT min(received_at) FROM events WHERE status = 'claimed'").fetchone()
            times = [r[0] for r in (row, claimed) if r is not None and r[0] is not None]
            return float(min(times)) if times else None

        return await self._read(read)

    async def recover_claims(self) -> int:
        """Make THIS node's claimed events pending and due now (start-up after a crash);
        other nodes' claims are theirs until their lease runs out."""
        return await self._submit(Op(self._tx_recover_claims))

    def _tx_recover_claims(self, tx: Tx, now: float) -> tuple[int, Delta]:
        rows = tx.conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = %s, claim_token = NULL, "
            "claimed_by = NULL, lease_until = NULL "
            "WHERE status = 'claimed' AND claimed_by = %s RETURNING lane",
            (now, self._node)).fetchall()
        for (lane,) in rows:
            tx.touch(lane, now)
        if rows:
            log.info("store.claims_recovered", count=len(rows), node=self._node)
        return len(rows), Delta(wake_events=bool(rows))

    async def replay(self, event_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Move dead events back to pending, due now, attempts reset; return how many moved."""
        ids = list(event_ids)
        if not ids and not all_dead:
            await anyio.lowlevel.checkpoint()
            return 0
        return await self._submit(Op(partial(self._tx_replay, ids, all_dead)))

    def _tx_replay(self, ids: list[str], all_dead: bool, tx: Tx, now: float
                   ) -> tuple[int, Delta]:
        rows = tx.conn.execute(
            "UPDATE events SET status = 'pending', attempt_base = attempts, "
            "next_attempt_at = %s, claim_token = NULL, claimed_by = NULL, lease_until = NULL "
            "WHERE status = 'dead' AND (%s OR id = ANY(%s)) RETURNING size, lane, seq",
            (now, all_dead, ids)).fetchall()
        for _, lane, seq in rows:
            tx.touch(lane, now, cursor=seq - 1)  # a replayed event may sit below the cursor
        n = len(rows)
        if n:
            log.info("store.replayed", count=n)
        return n, Delta(pending=n, bytes=sum(r[0] for r in rows), dead=-n, wake_events=n > 0)

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered over *delivered_older_than* seconds ago (in
        chunks), keeping those within the dedupe window; expired dedupe keys go too."""
        return await prune_in_chunks(
            lambda: self._submit(Op(partial(self._tx_prune, delivered_older_than))))

    def _tx_prune(self, age: float, tx: Tx, now: float) -> tuple[int, Delta]:
        horizon = now - self._dedupe_window
        ids = [r[0] for r in tx.conn.execute(
            _PRUNE_EVENTS, (now - age, horizon, PRUNE_CHUNK)).fetchall()]
        n = len(ids)
        forget_attempts(tx.conn, ids)  # their attempt histories go with them
        tx.conn.execute(
            "DELETE FROM dedupe WHERE ctid IN (SELECT ctid FROM dedupe WHERE received_at < %s "
            "LIMIT %s)", (horizon, PRUNE_CHUNK))
        # Lanes with nothing unsettled since a claim last looked (one per past user id, with
        # user-id keys). SKIP LOCKED: a lane a batch is writing is not idle; a batch that
        # needs a lane later upserts its row again (see _postgres.py).
        idle = [r[0] for r in tx.conn.execute(
            "SELECT lane FROM lanes WHERE ready_at = 'Infinity' LIMIT %s "
            "FOR UPDATE SKIP LOCKED", (PRUNE_CHUNK,))]
        if idle:
            tx.conn.execute("DELETE FROM lanes WHERE lane = ANY(%s)", (idle,))
        return n, Delta(delivered=-n)
