"""The PostgreSQL backend: one database that several daemons (nodes) share, for scale-out.

Connections. psycopg 3's synchronous connections from a small ``psycopg_pool`` pool, used in
anyio worker threads, so the store runs on asyncio and trio alike. Sessions run with
``synchronous_commit=on`` (a commit is on the server's disk before the 202 goes out) and an
``idle_in_transaction_session_timeout``, so a stuck node never holds locks for long.

Writes. The group-commit writer of ``_engine.py``: one transaction per batch, a savepoint per
op. Before its ops run, a batch locks the ``sources`` rows of the events it appends or
settles, in sorted order: two nodes' batches then never wait on each other in a cycle, and an
append's seq is drawn only once its source is locked, so within a source seq order is commit
order (see ``_pg_schema.py``). Each batch sends at most one NOTIFY per channel.

Claims. An ordered claim locks up to *limit* ready ``sources`` rows with ``FOR UPDATE SKIP
LOCKED`` (other nodes skip them), reads each one's head events from its cursor, claims the
due ones and sets when to look at the source again: the claim's lease, the head's backoff, or
never (empty) until an append or settle says otherwise. Sources are taken by how long they
have been ready, so an idle source costs nothing and a busy one cannot starve the others.
Every claim and active run records its node; start-up recovery takes back only this node's.

Counts. Each node keeps its own row in ``counts`` (changed in its own transactions, so no row
is written by two nodes); ``stats()`` and backpressure read the cluster's sum, refreshed at
most every :data:`COUNTS_REFRESH` seconds, plus this node's own changes since.

Wake-ups. LISTEN/NOTIFY on a dedicated connection, with polling as the backstop (callers wait
with a timeout). A pgbouncer in transaction mode does not carry LISTEN: point the store at
the server, or at a session-mode pool.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import msgspec
import psycopg
import psycopg.errors
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from mfo_actors.ids import new_id
from mfo_actors.messages import Event, RunStatus
from mfo_actors.observability import get_logger
from mfo_actors.store._codec import (
    ATTEMPT_COLS,
    ATTEMPT_UPSERT,
    EVENT_COLS,
    RUN_COLS,
    SESSION_COLS,
    TASK_COLS,
    TASK_UPSERT,
    Send,
    attempt_record,
    capped_json,
    capped_list,
    json_bytes,
    load_json,
    newest_first,
    run_record,
    session_record,
    stored_event,
    task_params,
    task_record,
)
from mfo_actors.store._engine import NO_CHANGE, Counts, Delta, GroupCommitStore, Op
from mfo_actors.store._pg_schema import NewerSchemaError, migrate
from mfo_actors.store._protocol import (
    AppendResult,
    DeliveryAttempt,
    EventStatus,
    RunRecord,
    RunRequest,
    SessionOpen,
    SessionRecord,
    SessionStatus,
    StoreClosedError,
    StoredEvent,
    StoreError,
    TaskRunRecord,
)

__all__ = ["PostgresStore", "PostgresStoreStatistics", "open_postgres_store"]

log = get_logger("mfo_actors.store.postgres")

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]

CONNECT_TIMEOUT = 5  # seconds, unless the DSN says otherwise
POOL_TIMEOUT = 1.0  # seconds to wait for a connection; the pool has one spare, so a wait
# means the database is away: fail (the listener answers 503) rather than hold the caller
DOWN_POOL_TIMEOUT = 0.2  # the same while the last batch found the database away
OPEN_TIMEOUT = 15.0  # seconds to reach the database at start-up
RECONNECT_GIVE_UP = 4.0  # seconds a pool slot retries in the background before it is dropped
COUNTS_REFRESH = 1.0  # seconds between reads of the cluster's counts
LISTEN_POLL = 0.5  # seconds the LISTEN thread blocks before looking at the clock again
PRUNE_CHUNK = 5_000
IDLE_IN_TX_TIMEOUT_MS = 60_000
_CLAIMED_MEMORY = 100_000  # event id -> source of this node's claims, for settles' lock order

_TASK_UPSERT = TASK_UPSERT.replace("?", "%s").encode()
_ATTEMPT_UPSERT = ATTEMPT_UPSERT.replace("?", "%s").encode()
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
              psycopg.errors.LockNotAvailable)


class PostgresStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of this node's writer, for tests and benchmarks."""

    node: str
    batches: int
    ops: int
    appends: int
    max_batch: int
    failed_batches: int
    queued: int


class _Tx:
    """One batch's transaction as an op sees it: the connection, and the sources to wake."""

    __slots__ = ("conn", "cursors", "ready")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.ready: dict[str, float] = {}
        self.cursors: dict[str, int] = {}

    def touch(self, source: str, ready_at: float, cursor: int | None = None) -> None:
        """Have claimers look at *source* from *ready_at* on (and from *cursor*, if lower)."""
        self.ready[source] = min(self.ready.get(source, math.inf), ready_at)
        if cursor is not None:
            self.cursors[source] = min(self.cursors.get(source, cursor), cursor)

    def flush(self) -> None:
        """Write the batch's wake-ups to ``sources`` (one statement)."""
        if not self.ready:
            return
        names = sorted(self.ready)
        self.conn.execute(
            "UPDATE sources SET ready_at = LEAST(sources.ready_at, u.r), "
            "cursor = LEAST(sources.cursor, COALESCE(u.c, sources.cursor)) "
            "FROM unnest(%s::text[], %s::float8[], %s::int8[]) AS u(s, r, c) "
            "WHERE sources.source = u.s",
            (names, [self.ready[n] for n in names], [self.cursors.get(n) for n in names]),
        )


def _where(dsn: str) -> str:
    """host:port/db of *dsn*, for messages (never the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid dsn>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user', '')}"


def _connect_kwargs(dsn: str, node: str) -> dict[str, Any]:
    params = conninfo_to_dict(dsn)
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT
    if "application_name" not in params:
        kwargs["application_name"] = f"mfo-actors {node}"[:63]
    return kwargs


def _configure(schema: str, conn: Conn) -> None:
    """Session settings of every pooled connection."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.execute("SET synchronous_commit TO on")
    conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TX_TIMEOUT_MS:d}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _store_error(exc: BaseException, dsn: str, verb: str = "write") -> StoreError:
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return StoreError(f"postgres store at {_where(dsn)} unreachable (no connection)")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"postgres store at {_where(dsn)} unreachable: {_first_line(exc)}")
    return StoreError(f"store {verb} failed: {_first_line(exc)}")


def _sums(conn: Conn) -> Counts:
    row = conn.execute(
        "SELECT COALESCE(sum(pending), 0), COALESCE(sum(pending_bytes), 0), "
        "COALESCE(sum(delivered), 0), COALESCE(sum(dead), 0) FROM counts"
    ).fetchone()
    assert row is not None
    return Counts(pending=int(row[0]), pending_bytes=int(row[1]), delivered=int(row[2]),
                  dead=int(row[3]))


def _claimable(status: str, due: float, lease_until: float | None, now: float) -> bool:
    """A pending event that is due, or a claim whose lease ran out."""
    if status == "pending":
        return due <= now
    return lease_until is not None and lease_until <= now


class PostgresStore(GroupCommitStore):
    """The Postgres :class:`~mfo_actors.store.EventStore`; open with :func:`open_postgres_store`.

    Besides the protocol it offers :meth:`statistics` and :attr:`node`.
    """

    _DB_ERRORS = (psycopg.Error,)

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[Conn],
        counts: Counts,
        *,
        dsn: str,
        schema: str,
        node: str,
        group_commit_max: int,
        max_pending: int,
        max_bytes: int,
        dedupe_window: float,
        node_lease: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(counts, group_commit_max=group_commit_max, max_pending=max_pending,
                         max_bytes=max_bytes)
        self._pool: psycopg_pool.ConnectionPool[Conn] | None = pool
        self._dsn = dsn
        self._schema = schema
        self._node = node
        self._dedupe_window = dedupe_window
        self._node_lease = node_lease
        self._clock = clock
        self._read_limiter = anyio.CapacityLimiter(2)
        self._events_channel = f"{schema}_events"
        self._runs_channel = f"{schema}_runs"
        self._counted_at = time.monotonic()
        self._renewed_at = time.monotonic()
        self._claimed: dict[str, str] = {}  # event id -> source, for events this node claimed
        self._down = False  # the last batch could not reach the database

    @property
    def node(self) -> str:
        """This node's id, recorded on its claims and runs."""
        return self._node

    def statistics(self) -> PostgresStoreStatistics:
        """A snapshot of this node's group-commit counters."""
        return PostgresStoreStatistics(
            node=self._node, batches=self._batches, ops=self._ops, appends=self._appends,
            max_batch=self._max_batch, failed_batches=self._failed_batches,
            queued=self._queued(),
        )

    # -- the writer (in the write thread) ------------------------------------------------------

    def _apply_batch(self, batch: list[Op[Any]]) -> None:
        pool = self._pool
        if pool is None:
            self._fail_all(batch, StoreClosedError("the store is closed"))
            return
        now = self._clock()
        # While the database is away, fail fast (503 at once) instead of waiting a full
        # POOL_TIMEOUT per batch; the pool keeps reconnecting in the background.
        wait = DOWN_POOL_TIMEOUT if self._down else POOL_TIMEOUT
        try:
            with pool.connection(timeout=wait) as conn:
                try:
                    # Fast path: the whole batch pipelined, no savepoints (a few round trips
                    # for any number of ops) ...
                    with conn.pipeline():
                        resync = self._run_transaction(conn, batch, now, isolate=False)
                except psycopg.OperationalError:
                    raise
                except Exception as exc:
                    # ... and when some op fails, the batch again, each op in a savepoint, so
                    # only that op's caller gets the error.
                    log.debug("store.batch_retried", ops=len(batch), error=_first_line(exc))
                    resync = self._run_transaction(conn, batch, now, isolate=True)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
                if not self._down:
                    log.error("store.unreachable", where=_where(self._dsn),
                              error=_first_line(exc))
                self._down = True
            self._fail_all(batch, _store_error(exc, self._dsn))
            return
        if self._down:
            log.info("store.reachable", where=_where(self._dsn))
            self._down = False
        if resync is not None:
            self._resync = resync
        self._committed(batch)

    def _run_transaction(self, conn: Conn, batch: list[Op[Any]], now: float, *,
                         isolate: bool) -> Counts | None:
        resync = None
        with conn.transaction():
            if time.monotonic() - self._counted_at >= COUNTS_REFRESH:
                resync = _sums(conn)  # before this batch's changes, which _complete adds
            sources = sorted({op.source for op in batch if op.source is not None})
            if sources:
                # Lock every source this batch writes, in one order for all nodes.
                conn.execute(
                    "INSERT INTO sources (source, ready_at) SELECT s, 'Infinity' "
                    "FROM unnest(%s::text[]) AS s ORDER BY s ON CONFLICT (source) DO NOTHING",
                    (sources,))
                conn.execute("SELECT 1 FROM sources WHERE source = ANY(%s) ORDER BY source "
                             "FOR UPDATE", (sources,))
            tx = _Tx(conn)
            total = Delta()
            for op in batch:
                op.error = None
                if not isolate:
                    op.result, op.delta = op.fn(tx, now)
                else:
                    try:
                        with conn.transaction():
                            op.result, op.delta = op.fn(tx, now)
                    except psycopg.OperationalError:
                        raise  # the connection is gone: the whole batch fails
                    except Exception as exc:
                        if isinstance(exc, _TRANSIENT):
                            log.warning("store.op_conflict", error=_first_line(exc))
                        self._op_failed(op, exc)
                        continue
                d = op.delta
                total.pending += d.pending
                total.bytes += d.bytes
                total.delivered += d.delivered
                total.dead += d.dead
                total.wake_events |= d.wake_events
                total.wake_runs |= d.wake_runs
            tx.flush()
            if total.pending or total.bytes or total.delivered or total.dead:
                conn.execute(
                    "UPDATE counts SET pending = pending + %s, pending_bytes = pending_bytes + %s,"
                    " delivered = delivered + %s, dead = dead + %s WHERE node = %s",
                    (total.pending, total.bytes, total.delivered, total.dead, self._node))
            if total.wake_events:
                conn.execute("SELECT pg_notify(%s, '')", (self._events_channel,))
            if total.wake_runs:
                conn.execute("SELECT pg_notify(%s, '')", (self._runs_channel,))
        if resync is not None:
            self._counted_at = time.monotonic()
        return resync

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreClosedError("the store is closed")

        def read() -> T:
            with pool.connection(timeout=POOL_TIMEOUT) as conn:
                return fn(conn)

        try:
            return await anyio.to_thread.run_sync(read, limiter=self._read_limiter)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise _store_error(exc, self._dsn, "read") from exc

    # -- background: wake-ups, counts, leases ------------------------------------------------

    async def _serve_notifications(self) -> None:
        """LISTEN for other nodes' appends and runs; reconnect (and wake everyone) after a
        lost connection, since notifications sent meanwhile are gone."""
        conn: Conn | None = None
        backoff = 0.5
        channels = (self._events_channel, self._runs_channel)

        def connect() -> Conn:
            c = psycopg.connect(self._dsn, **_connect_kwargs(self._dsn, self._node))
            for channel in channels:
                c.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            return c

        def receive(c: Conn) -> set[str]:
            return {n.channel for n in c.notifies(timeout=LISTEN_POLL, stop_after=1)}

        def close(c: Conn) -> None:
            c.close()

        try:
            while True:
                try:
                    if conn is None:
                        conn = await anyio.to_thread.run_sync(connect)
                        backoff = 0.5
                        self._events_latch.set()
                        self._runs_latch.set()
                    got = await anyio.to_thread.run_sync(receive, conn)
                except psycopg.Error as exc:
                    log.warning("store.listen_lost", error=str(exc).strip()[:200])
                    if conn is not None:
                        await anyio.to_thread.run_sync(close, conn)
                    conn = None
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if self._events_channel in got:
                    self._events_latch.set()
                if self._runs_channel in got:
                    self._runs_latch.set()
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close, conn)

    async def _serve_maintenance(self) -> None:
        """Every second: refresh the cluster's counts (if no batch did) and renew this node's
        run leases, so a live node's runs are never taken for a dead one's."""
        while True:
            await anyio.sleep(min(COUNTS_REFRESH, self._node_lease / 3))
            renew = time.monotonic() - self._renewed_at >= self._node_lease / 3
            try:
                await self._submit(Op(partial(self._tx_maintain, renew)))
            except StoreClosedError:
                return
            except StoreError as exc:
                log.warning("store.maintenance_failed", error=str(exc))
                continue
            if renew:
                self._renewed_at = time.monotonic()

    def _tx_maintain(self, renew: bool, tx: _Tx, now: float) -> tuple[None, Delta]:
        if renew:
            tx.conn.execute(
                "UPDATE runs SET lease_until = %s WHERE status = 'active' AND node = %s",
                (now + self._node_lease, self._node))
        return None, NO_CHANGE

    async def _stop_background(self) -> None:
        """Send ourselves a notification, so the LISTEN thread returns now, not in 0.5 s."""
        pool = self._pool
        if pool is None:
            return

        def notify() -> None:
            with pool.connection(timeout=POOL_TIMEOUT) as conn:
                conn.execute("SELECT pg_notify(%s, 'closing')", (self._events_channel,))

        try:
            await anyio.to_thread.run_sync(notify)
        except (psycopg.Error, psycopg_pool.PoolTimeout):
            pass  # the database is away: the thread returns within LISTEN_POLL anyway

    async def _close_connections(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)
        log.info("store.closed", node=self._node)

    # -- events ------------------------------------------------------------------------------

    async def append(self, event: Event, *, runs: Sequence[RunRequest] = ()) -> AppendResult:
        """Store *event* (and *runs*) in the next group commit; return once it is on disk."""
        size = len(event.body)
        self._reserve(size)
        op = Op(partial(self._tx_append, event, tuple(runs), size), reserved=size,
                source=event.source)
        return await self._submit(op)

    def _tx_append(
        self, event: Event, runs: Sequence[RunRequest], size: int, tx: _Tx, now: float
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
            "is_json, dedupe_key, size, status, next_attempt_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s)",
            (event.id, event.source, event.type, event.received_at, json_bytes(event.headers),
             event.body, event.content_type, event.is_json, event.dedupe_key, size, now),
        )
        tx.touch(event.source, now)
        created = self._insert_runs(conn, runs, now) if runs else []
        return AppendResult(event.id), Delta(
            pending=1, bytes=size, wake_events=True, wake_runs=bool(created))

    async def claim_due(
        self, *, limit: int, lease: float, ordered_by_source: bool = True, per_source: int = 1
    ) -> list[StoredEvent]:
        """Claim up to *limit* due events (see the protocol), each call with a new token."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        fn = (partial(self._tx_claim_ordered, limit, lease, max(1, per_source))
              if ordered_by_source else partial(self._tx_claim_unordered, limit, lease))
        return await self._submit(Op(fn))

    def _tx_claim_ordered(
        self, limit: int, lease: float, per_source: int, tx: _Tx, now: float
    ) -> tuple[list[StoredEvent], Delta]:
        conn = tx.conn
        ready = conn.execute(
            "SELECT source, cursor FROM sources WHERE ready_at <= %s "
            "ORDER BY ready_at, source LIMIT %s FOR UPDATE SKIP LOCKED", (now, limit),
        ).fetchall()
        if not ready:
            return [], NO_CHANGE
        names = [r[0] for r in ready]
        heads: dict[str, list[tuple[int, str, float, float | None]]] = {n: [] for n in names}
        for source, seq, status, due, lease_until in conn.execute(
            "SELECT s.source, e.seq, e.status, e.next_attempt_at, e.lease_until "
            "FROM unnest(%s::text[], %s::int8[]) AS s(source, cursor) CROSS JOIN LATERAL ("
            "  SELECT seq, status, next_attempt_at, lease_until FROM events "
            "  WHERE events.source = s.source AND events.seq > s.cursor "
            "    AND events.status IN ('pending', 'claimed') "
            "  ORDER BY events.seq LIMIT %s) AS e",
            (names, [r[1] for r in ready], per_source),
        ):
            heads[source].append((seq, status, due, lease_until))
        seqs: list[int] = []
        cursors: list[int | None] = []
        next_look: list[float] = []
        for source in names:
            rows = sorted(heads[source])
            if not rows:  # nothing pending: look again when an append says so
                cursors.append(None)
                next_look.append(math.inf)
                continue
            cursors.append(rows[0][0] - 1)
            taken = 0
            for seq, status, due, lease_until in rows:
                if not _claimable(status, due, lease_until, now):
                    break
                seqs.append(seq)
                taken += 1
            _, status, due, lease_until = rows[0]
            if taken:
                next_look.append(now + lease)
            elif status == "claimed":
                next_look.append(lease_until if lease_until is not None else now + lease)
            else:
                next_look.append(due)
        conn.execute(
            "UPDATE sources SET cursor = COALESCE(u.c, sources.cursor), ready_at = u.r "
            "FROM unnest(%s::text[], %s::int8[], %s::float8[]) AS u(s, c, r) "
            "WHERE sources.source = u.s", (names, cursors, next_look))
        return self._take(conn, seqs, lease, now), NO_CHANGE

    def _tx_claim_unordered(
        self, limit: int, lease: float, tx: _Tx, now: float
    ) -> tuple[list[StoredEvent], Delta]:
        conn = tx.conn
        expired = _locked(conn, "SELECT seq FROM events WHERE status = 'claimed' "
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
        rows.sort(key=lambda r: r[0])
        claimed = [stored_event(r[1:]) for r in rows]
        if len(self._claimed) > _CLAIMED_MEMORY:  # settles that never came (leases ran out)
            self._claimed.clear()
        for c in claimed:
            self._claimed[c.event.id] = c.event.source
        return claimed

    def _settle_op(self, fn: Callable[..., tuple[None, Delta]], event_id: str,
                   *args: Any) -> Op[None]:
        return Op(partial(fn, event_id, *args), source=self._claimed.pop(event_id, None))

    def _settle(
        self, tx: _Tx, event_id: str, token: str, action: str, set_sql: str,
        params: tuple[Any, ...], next_look: float, now: float, send: Send | None,
        error: str | None,
    ) -> int | None:
        """Update a claimed event by id and token, record the attempt (*send*, as
        *action*), and wake its source at *next_look*; the event's size, or None (stale)."""
        row = tx.conn.execute(
            f"UPDATE events SET {set_sql}, claim_token = NULL, claimed_by = NULL, "
            f"lease_until = NULL WHERE id = %s AND status = 'claimed' AND claim_token = %s "
            f"RETURNING size, source, attempts",
            (*params, event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id,
                        action="delivered" if action == "delivered" else
                        "reschedule" if action == "retry" else "dead_letter")
            return None
        tx.touch(row[1], next_look)
        if send is not None:
            tx.conn.execute(_ATTEMPT_UPSERT, send.params(event_id, row[2], now, action, error))
        return int(row[0])

    async def mark_delivered(
        self, event_id: str, claim_token: str, *, sent_at: float | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as delivered (ignored, and logged, for a stale token)."""
        await self._submit(self._settle_op(self._tx_delivered, event_id, claim_token,
                                           Send(sent_at, None, latency)))

    def _tx_delivered(self, event_id: str, token: str, send: Send, tx: _Tx, now: float
                      ) -> tuple[None, Delta]:
        size = self._settle(
            tx, event_id, token, "delivered",
            "status = 'delivered', delivered_at = %s, attempts = attempts + 1, last_error = NULL",
            (now,), now, now, send, None)
        if size is None:
            return None, NO_CHANGE
        return None, Delta(pending=-1, bytes=-size, delivered=1, wake_events=True)

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
        tx: _Tx, now: float,
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

    def _tx_dead(self, event_id: str, token: str, reason: str, send: Send, tx: _Tx,
                 now: float) -> tuple[None, Delta]:
        size = self._settle(tx, event_id, token, "dead",
                            "status = 'dead', last_error = %s, attempts = attempts + 1",
                            (reason,), now, now, send, reason)
        if size is None:
            return None, NO_CHANGE
        # Wakes the forwarder: the next event of this source may now be claimable.
        return None, Delta(pending=-1, bytes=-size, dead=1, wake_events=True)

    async def list_attempts(self, event_id: str) -> list[DeliveryAttempt]:
        """The event's attempts, oldest first."""

        def read(conn: Conn) -> list[DeliveryAttempt]:
            return [attempt_record(r) for r in conn.execute(
                f"SELECT {ATTEMPT_COLS} FROM attempts WHERE event_id = %s ORDER BY n",
                (event_id,))]

        return await self._read(read)

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

    def _tx_recover_claims(self, tx: _Tx, now: float) -> tuple[int, Delta]:
        rows = tx.conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = %s, claim_token = NULL, "
            "claimed_by = NULL, lease_until = NULL "
            "WHERE status = 'claimed' AND claimed_by = %s RETURNING source",
            (now, self._node)).fetchall()
        for (source,) in rows:
            tx.touch(source, now)
        if rows:
            log.info("store.claims_recovered", count=len(rows), node=self._node)
        return len(rows), Delta(wake_events=bool(rows))

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its state, or None."""

        def read(conn: Conn) -> StoredEvent | None:
            row = conn.execute(f"SELECT {EVENT_COLS} FROM events WHERE id = %s",
                               (event_id,)).fetchone()
            return None if row is None else stored_event(row)

        return await self._read(read)

    async def list_events(
        self, *, status: EventStatus | None = None, source: str | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Events, newest first (acceptance order), filtered by status and source."""
        query, params = newest_first(EVENT_COLS, "events", limit, "%s", status=status,
                                     source=source)

        def read(conn: Conn) -> list[StoredEvent]:
            return [stored_event(r) for r in conn.execute(query.encode(), params)]

        return await self._read(read)

    async def replay(self, event_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Move dead events back to pending, due now, attempts reset; return how many moved."""
        ids = list(event_ids)
        if not ids and not all_dead:
            await anyio.lowlevel.checkpoint()
            return 0
        return await self._submit(Op(partial(self._tx_replay, ids, all_dead)))

    def _tx_replay(self, ids: list[str], all_dead: bool, tx: _Tx, now: float
                   ) -> tuple[int, Delta]:
        rows = tx.conn.execute(
            "UPDATE events SET status = 'pending', attempt_base = attempts, "
            "next_attempt_at = %s, claim_token = NULL, claimed_by = NULL, lease_until = NULL "
            "WHERE status = 'dead' AND (%s OR id = ANY(%s)) RETURNING size, source, seq",
            (now, all_dead, ids)).fetchall()
        for _, source, seq in rows:
            tx.touch(source, now, cursor=seq - 1)  # a replayed event may sit below the cursor
        n = len(rows)
        if n:
            log.info("store.replayed", count=n)
        return n, Delta(pending=n, bytes=sum(r[0] for r in rows), dead=-n, wake_events=n > 0)

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered over *delivered_older_than* seconds ago (in
        chunks), keeping those within the dedupe window; expired dedupe keys go too."""
        total = 0
        while True:
            n = await self._submit(Op(partial(self._tx_prune, delivered_older_than)))
            total += n
            if n < PRUNE_CHUNK:
                break
        if total:
            log.info("store.pruned", count=total)
        return total

    def _tx_prune(self, age: float, tx: _Tx, now: float) -> tuple[int, Delta]:
        horizon = now - self._dedupe_window
        ids = [r[0] for r in tx.conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 'delivered' "
            "AND delivered_at < %s AND (dedupe_key IS NULL OR received_at < %s) "
            "ORDER BY seq LIMIT %s) RETURNING id",
            (now - age, horizon, PRUNE_CHUNK)).fetchall()]
        n = len(ids)
        if ids:  # their attempt histories go with them
            tx.conn.execute("DELETE FROM attempts WHERE event_id = ANY(%s)", (ids,))
        tx.conn.execute(
            "DELETE FROM dedupe WHERE ctid IN (SELECT ctid FROM dedupe WHERE received_at < %s "
            "LIMIT %s)", (horizon, PRUNE_CHUNK))
        return n, Delta(delivered=-n)

    # -- runs --------------------------------------------------------------------------------

    def _insert_runs(self, conn: Conn, runs: Sequence[RunRequest], now: float,
                     *, claim: bool = False) -> list[str]:
        """Insert *runs* (``active`` and this node's with *claim*); skip ids and ticks seen."""
        created = []
        status, started, node, lease = (
            ("active", now, self._node, now + self._node_lease) if claim
            else ("new", None, None, None))
        for run in runs:
            row = conn.execute(
                "INSERT INTO runs (run_id, flow, status, trigger, event_id, input, schedule_key, "
                "tick, created_at, started_at, node, lease_until) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING run_id",
                (run.run_id, run.flow, status, run.trigger, run.event_id, json_bytes(run.input),
                 run.schedule_key, run.tick, now, started, node, lease),
            ).fetchone()
            if row is not None:
                created.append(run.run_id)
        return created

    async def create_runs(self, runs: Sequence[RunRequest], *, claim: bool = False) -> list[str]:
        """Create ``new`` runs (``active`` with *claim*); a (flow, schedule_key, tick) or run
        id seen before, by any node, is skipped."""
        items = tuple(runs)
        if not items:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_create_runs, items, claim)))

    def _tx_create_runs(self, runs: Sequence[RunRequest], claim: bool, tx: _Tx, now: float
                        ) -> tuple[list[str], Delta]:
        created = self._insert_runs(tx.conn, runs, now, claim=claim)
        return created, Delta(wake_runs=bool(created) and not claim)

    async def claim_runs(self, *, limit: int) -> list[RunRecord]:
        """Mark up to *limit* ``new`` runs ``active`` for this node, oldest first."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_claim_runs, limit)))

    def _tx_claim_runs(self, limit: int, tx: _Tx, now: float) -> tuple[list[RunRecord], Delta]:
        seqs = _locked(tx.conn, "SELECT seq FROM runs WHERE status = 'new' ORDER BY seq "
                       "LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
        rows = tx.conn.execute(
            f"UPDATE runs SET status = 'active', started_at = %s, node = %s, lease_until = %s "
            f"WHERE seq = ANY(%s) RETURNING seq, {RUN_COLS}",
            (now, self._node, now + self._node_lease, seqs)).fetchall() if seqs else []
        rows.sort(key=lambda r: r[0])
        return [run_record(r[1:]) for r in rows], NO_CHANGE

    async def record_task(self, record: TaskRunRecord) -> None:
        """Insert or replace one task's record; outputs over 64 KiB become a marker."""
        await self._submit(Op(partial(self._tx_record_task, record)))

    def _tx_record_task(self, r: TaskRunRecord, tx: _Tx, now: float) -> tuple[None, Delta]:
        tx.conn.execute(_TASK_UPSERT, task_params(r))
        return None, NO_CHANGE

    async def finish_run(
        self,
        run_id: str,
        *,
        status: Literal["done", "error"],
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Settle a new run, or an active one of this node; others are left alone."""
        await self._submit(Op(partial(self._tx_finish_run, run_id, status, error, outputs)))

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        tx: _Tx, now: float,
    ) -> tuple[None, Delta]:
        found = tx.conn.execute(
            "UPDATE runs SET status = %s, finished_at = %s, error = %s, outputs = %s, "
            "started_at = COALESCE(started_at, %s), lease_until = NULL WHERE run_id = %s "
            "AND (status = 'new' OR (status = 'active' AND node = %s)) RETURNING seq",
            (status, now, error, capped_json(outputs), now, run_id, self._node)).fetchone()
        if found is None:
            log.warning("store.finish_run_ignored", run_id=run_id, status=status)
        return None, NO_CHANGE

    async def recover_runs(
        self, *, rerun_flows: Sequence[str], orphaned: bool = False
    ) -> list[RunRecord]:
        """This node's runs left ``active`` by a crash (or, with *orphaned*, other nodes'
        whose lease ran out): ``interrupted += 1``, then ``new`` (flows in *rerun_flows*) or
        ``error`` "interrupted" with their unfinished tasks ``cancelled``."""
        return await self._submit(Op(partial(
            self._tx_recover_runs, list(rerun_flows), orphaned)))

    def _tx_recover_runs(self, rerun: list[str], orphaned: bool, tx: _Tx, now: float
                         ) -> tuple[list[RunRecord], Delta]:
        conn = tx.conn
        if orphaned:
            seqs = _locked(conn, "SELECT seq FROM runs WHERE status = 'active' AND node <> %s "
                           "AND lease_until < %s FOR UPDATE SKIP LOCKED", (self._node, now))
        else:
            seqs = _locked(conn, "SELECT seq FROM runs WHERE status = 'active' AND node = %s "
                           "FOR UPDATE", (self._node,))
        if not seqs:
            return [], NO_CHANGE
        rows = conn.execute(
            f"UPDATE runs SET interrupted = interrupted + 1, node = NULL, lease_until = NULL, "
            f"status = CASE WHEN flow = ANY(%s) THEN 'new' ELSE 'error' END, "
            f"started_at = CASE WHEN flow = ANY(%s) THEN NULL ELSE started_at END, "
            f"error = CASE WHEN flow = ANY(%s) THEN error ELSE 'interrupted' END, "
            f"finished_at = CASE WHEN flow = ANY(%s) THEN finished_at ELSE %s END "
            f"WHERE seq = ANY(%s) RETURNING seq, {RUN_COLS}",
            (rerun, rerun, rerun, rerun, now, seqs)).fetchall()
        rows.sort(key=lambda r: r[0])
        out = [run_record(r[1:]) for r in rows]
        failed = [r.run_id for r in out if r.status == "error"]
        if failed:
            conn.execute(
                "UPDATE task_runs SET state = 'cancelled', error = 'interrupted', "
                "finished_at = %s WHERE run_id = ANY(%s) AND state IN ('pending', 'running')",
                (now, failed))
        if out:
            log.info("store.runs_recovered", count=len(out), orphaned=orphaned,
                     rerun=len(out) - len(failed))
        return out, Delta(wake_runs=len(failed) < len(out))

    async def get_run(self, run_id: str) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        """One run and its task records (in the order they were first recorded), or None."""

        def read(conn: Conn) -> tuple[RunRecord, list[TaskRunRecord]] | None:
            row = conn.execute(f"SELECT {RUN_COLS} FROM runs WHERE run_id = %s",
                               (run_id,)).fetchone()
            if row is None:
                return None
            tasks = conn.execute(
                f"SELECT {TASK_COLS} FROM task_runs WHERE run_id = %s ORDER BY seq", (run_id,)
            ).fetchall()
            return run_record(row), [task_record(t) for t in tasks]

        return await self._read(read)

    async def list_runs(
        self, *, flow: str | None = None, status: RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        query, params = newest_first(RUN_COLS, "runs", limit, "%s", flow=flow, status=status)

        def read(conn: Conn) -> list[RunRecord]:
            return [run_record(r) for r in conn.execute(query.encode(), params)]

        return await self._read(read)

    async def last_tick(self, flow: str, schedule_key: str) -> float | None:
        """The latest tick recorded for (flow, schedule_key) by any node, or None."""

        def read(conn: Conn) -> float | None:
            row = conn.execute("SELECT MAX(tick) FROM runs WHERE flow = %s AND schedule_key = %s",
                               (flow, schedule_key)).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(read)


    # -- chat sessions -----------------------------------------------------------------------

    async def open_session(
        self, key: str, *, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any] | None = None,
    ) -> SessionOpen:
        """The active session of *key* (closed first if idle past *ttl*), or a new one. Two
        nodes opening a new key at once get one session: the unique active key decides."""
        return await self._submit(Op(partial(
            self._tx_open_session, key, thread_id, ttl, max(1, max_active), metadata or {})))

    def _tx_open_session(
        self, key: str, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any], tx: _Tx, now: float,
    ) -> tuple[SessionOpen, Delta]:
        conn = tx.conn
        closed: list[SessionRecord] = []
        row = conn.execute(f"SELECT {SESSION_COLS} FROM sessions WHERE key = %s AND "
                           f"status = 'active' FOR UPDATE", (key,)).fetchone()
        if row is not None:
            current = session_record(row)
            if current.last_activity + ttl > now:
                return SessionOpen(session=current, created=False), NO_CHANGE
            closed += _close_sessions(conn, "session_id = %s", (current.session_id,),
                                      "expired", now)
        found = conn.execute("SELECT count(*) FROM sessions WHERE status = 'active'").fetchone()
        active = int(found[0]) if found is not None else 0
        if active >= max_active:
            idlest = _locked(conn, "SELECT seq FROM sessions WHERE status = 'active' "
                             "ORDER BY last_activity, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                             (active - max_active + 1,))
            closed += _close_sessions(conn, "seq = ANY(%s)", (idlest,), "evicted", now)
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

    async def record_turn(
        self, session_id: str, *, thread_id: str, messages: Sequence[dict[str, Any]] = (),
        context_limit: int = 20, metadata: dict[str, Any] | None = None,
    ) -> SessionRecord | None:
        """Count one exchange of the session and keep its messages in the context."""
        return await self._submit(Op(partial(
            self._tx_record_turn, session_id, thread_id, tuple(messages), context_limit,
            metadata)))

    def _tx_record_turn(
        self, session_id: str, thread_id: str, messages: Sequence[dict[str, Any]],
        limit: int, metadata: dict[str, Any] | None, tx: _Tx, now: float,
    ) -> tuple[SessionRecord | None, Delta]:
        row = tx.conn.execute(  # locked: two nodes' turns of one session add up
            "SELECT context, metadata FROM sessions WHERE session_id = %s FOR UPDATE",
            (session_id,)).fetchone()
        if row is None:
            return None, NO_CHANGE
        context = [*(load_json(row[0]) or []), *messages]
        context = context[len(context) - limit:] if limit > 0 else []
        merged = {**(load_json(row[1]) or {}), **(metadata or {})}
        updated = tx.conn.execute(
            f"UPDATE sessions SET turns = turns + 1, last_activity = GREATEST(last_activity, "
            f"%s), thread_id = %s, context = %s, metadata = %s WHERE session_id = %s "
            f"RETURNING {SESSION_COLS}",
            (now, thread_id, capped_list(context), json_bytes(merged), session_id),
        ).fetchone()
        return (None if updated is None else session_record(updated)), NO_CHANGE

    async def get_session(self, key: str) -> SessionRecord | None:
        """The active session of *key*, else its latest closed one."""

        def read(conn: Conn) -> SessionRecord | None:
            row = conn.execute(
                f"SELECT {SESSION_COLS} FROM sessions WHERE key = %s "
                f"ORDER BY status = 'active' DESC, seq DESC LIMIT 1", (key,)).fetchone()
            return None if row is None else session_record(row)

        return await self._read(read)

    async def list_sessions(
        self, *, status: SessionStatus | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first."""

        def read(conn: Conn) -> list[SessionRecord]:
            return [session_record(r) for r in conn.execute(
                f"SELECT {SESSION_COLS} FROM sessions WHERE (%s::text IS NULL OR status = %s) "
                f"ORDER BY last_activity DESC, seq DESC LIMIT %s",
                (status, status, max(0, limit)))]

        return await self._read(read)

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key* (None if it had none)."""

        def tx(t: _Tx, now: float) -> tuple[SessionRecord | None, Delta]:
            closed = _close_sessions(t.conn, "key = %s", (key,), reason, now)
            return (closed[0] if closed else None), NO_CHANGE

        return await self._submit(Op(tx))

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close every active session idle for *ttl* seconds or more."""

        def tx(t: _Tx, now: float) -> tuple[list[SessionRecord], Delta]:
            return _close_sessions(t.conn, "last_activity <= %s", (now - ttl,), "expired",
                                   now), NO_CHANGE

        return await self._submit(Op(tx))

    async def count_sessions(self) -> int:
        """Active sessions, cluster-wide."""

        def read(conn: Conn) -> int:
            row = conn.execute("SELECT count(*) FROM sessions WHERE status = 'active'"
                               ).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(read)


def _locked(conn: Conn, query: str, params: tuple[Any, ...]) -> list[int]:
    """The seqs a ``SELECT seq ... FOR UPDATE [SKIP LOCKED]`` locked, for a separate UPDATE.

    Never ``UPDATE ... WHERE seq IN (SELECT ... LIMIT n FOR UPDATE)``: when the planner
    rescans that subquery, its row locks skip the rows the UPDATE already changed, and the
    LIMIT then lets further rows through (seen here: two sessions evicted instead of one).
    """
    return [int(r[0]) for r in conn.execute(query.encode(), params)]


def _close_sessions(conn: Conn, where: str, params: tuple[Any, ...], reason: str,
                    now: float) -> list[SessionRecord]:
    """Close the active sessions matching *where*; returns them as closed, oldest first."""
    rows = conn.execute(
        f"UPDATE sessions SET status = 'closed', closed_at = %s, close_reason = %s "
        f"WHERE status = 'active' AND {where} RETURNING seq, {SESSION_COLS}".encode(),
        (now, reason, *params),
    ).fetchall()
    rows.sort(key=lambda r: r[0])
    return [session_record(r[1:]) for r in rows]

def _open_sync(dsn: str, schema: str, node: str, must_exist: bool
               ) -> tuple[psycopg_pool.ConnectionPool[Conn], Counts, int]:
    kwargs = _connect_kwargs(dsn, node)
    with psycopg.connect(dsn, **kwargs) as conn:
        if must_exist:
            row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
            if row is None or row[0] is None:
                raise StoreError(f"no event store in schema {schema!r} at {_where(dsn)}")
        before, _ = migrate(conn, schema)
    pool: psycopg_pool.ConnectionPool[Conn] = psycopg_pool.ConnectionPool(
        dsn, kwargs=kwargs, min_size=2, max_size=4, open=False, timeout=POOL_TIMEOUT,
        configure=partial(_configure, schema), name=f"mfo-{schema}",
        # The pool retries a lost connection with a doubling delay; giving up early lets the
        # next request open one at once, so a database back from a long outage is used within
        # seconds, not after a minute-long backoff.
        reconnect_timeout=RECONNECT_GIVE_UP,
    )
    try:
        pool.open(wait=True, timeout=OPEN_TIMEOUT)
        with pool.connection() as conn:
            conn.execute("INSERT INTO counts (node) VALUES (%s) ON CONFLICT DO NOTHING", (node,))
            counts = _sums(conn)
    except BaseException:
        pool.close()
        raise
    return pool, counts, before


@asynccontextmanager
async def open_postgres_store(
    dsn: str,
    *,
    schema: str = "mfo",
    node: str = "local",
    group_commit_max: int = 512,
    max_pending: int = 100_000,
    max_bytes: int = 1024**3,
    dedupe_window: float = 86400.0,
    node_lease: float = 30.0,
    clock: Callable[[], float] = time.time,
    must_exist: bool = False,
) -> AsyncIterator[PostgresStore]:
    """Open (creating and migrating *schema* if needed) the Postgres store at *dsn*.

    Args:
      dsn: A libpq connection string or ``postgresql://`` URL.
      schema: The schema holding the tables; several instances may share a database.
      node: This node's id (``store.node_id``), recorded on claims and runs.
      node_lease: Seconds after which a node that stopped renewing loses its active runs.
      must_exist: Raise StoreError instead of creating a missing schema (the CLI).
      Others: as :func:`~mfo_actors.store.open_sqlite_store`.

    Raises:
      StoreError: the database cannot be reached, or the schema is newer than this code.
    """
    try:
        pool, counts, before = await anyio.to_thread.run_sync(
            _open_sync, dsn, schema, node, must_exist)
    except NewerSchemaError as exc:
        raise StoreError(f"schema {schema!r} at {_where(dsn)}: {exc}") from None
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        raise StoreError(f"cannot open the postgres store at {_where(dsn)}: "
                         f"{_first_line(exc)}") from exc
    store = PostgresStore(
        pool, counts, dsn=dsn, schema=schema, node=node, group_commit_max=group_commit_max,
        max_pending=max_pending, max_bytes=max_bytes, dedupe_window=dedupe_window,
        node_lease=node_lease, clock=clock,
    )
    log.info("store.opened", backend="postgres", where=_where(dsn), schema=schema, node=node,
             schema_before=before, pending=counts.pending, dead=counts.dead)
    async with store._running(store._serve_notifications, store._serve_maintenance):
        yield store
