"""The PostgreSQL backend: one database that several daemons (nodes) share, for scale-out.

Connections. psycopg 3's synchronous connections from a small ``psycopg_pool`` pool, used in
anyio worker threads, so the store runs on asyncio and trio alike. Sessions run with
``synchronous_commit=on`` (a commit is on the server's disk before the 202 goes out) and an
``idle_in_transaction_session_timeout``, so a stuck node never holds locks for long; and with
``lock_timeout`` and ``statement_timeout`` (``store.lock_timeout``, ``store.statement_timeout``),
so a lock held elsewhere (a long migration, a DBA's ``LOCK TABLE``) cannot hang the daemon.

Transient failures. A batch that fails on a lock or statement timeout, a deadlock or a
serialization failure was rolled back whole: the writer runs it again (at most
:data:`TRANSIENT_TRIES` times, with a short pause), and only then fails it to its callers
with a :class:`StoreError` that says so. Nothing was written, so nothing is lost: an append's
caller answers 503 (the provider retries), a settle's event comes back by its lease, a run's
result is retried by the scheduler. Such a failure does not count as the database being away.

Writes. The group-commit writer of ``_engine.py``: one transaction per batch, a savepoint per
op. Before its ops run, a batch locks the ``lanes`` rows of the events it appends or
settles (``Event.lane``: the ordering key, else the source), in sorted order: two nodes'
batches then never wait on each other in a cycle, and an append's seq is drawn only once its
lane is locked, so within a lane seq order is commit order (see ``_pg_schema.py``). Each
batch sends at most one NOTIFY per channel.

Claims. An ordered claim locks up to *limit* ready ``lanes`` rows with ``FOR UPDATE SKIP
LOCKED`` (other nodes skip them), reads each one's head events from its cursor, claims the
due ones and sets when to look at the lane again: the claim's lease, the head's backoff, or
never (empty) until an append or settle says otherwise (``_tables.claim_lanes``). Lanes are
taken by how long they have been ready, so an idle lane (an idle key) costs nothing and a
busy one cannot starve the others.
Every claim and active run records its node; start-up recovery takes back only this node's.

Counts. Each node keeps its own row in ``counts`` (changed in its own transactions, so no row
is written by two nodes); ``stats()`` and backpressure read the cluster's sum, refreshed at
most every :data:`COUNTS_REFRESH` seconds, plus this node's own changes since.

Wake-ups. LISTEN/NOTIFY on a dedicated connection, with polling as the backstop (callers wait
with a timeout). A pgbouncer in transaction mode does not carry LISTEN: point the store at
the server, or at a session-mode pool.

This module holds the pool, the writer's transaction, the background tasks and opening; the
tables are in their own modules, each a part of :class:`PostgresStore`: ``_pg_events.py``
(the outbox and its lanes), ``_pg_attempts.py`` (delivery history), ``_pg_runs.py`` (runs
and tasks) and ``_pg_sessions.py`` (chat sessions), over ``_pg_base.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import msgspec
import psycopg
import psycopg.errors
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from mfo_actors.observability import get_logger
from mfo_actors.store._engine import NO_CHANGE, Counts, Delta, Op
from mfo_actors.store._pg_attempts import PostgresAttempts
from mfo_actors.store._pg_base import Conn, Tx
from mfo_actors.store._pg_events import PostgresEvents
from mfo_actors.store._pg_runs import PostgresRuns
from mfo_actors.store._pg_schema import NewerSchemaError, migrate
from mfo_actors.store._pg_sessions import PostgresSessions
from mfo_actors.store._protocol import StoreClosedError, StoreError
from mfo_actors.store._tables import RENEW_RUNS

__all__ = ["PostgresStore", "PostgresStoreStatistics", "open_postgres_store"]

log = get_logger("mfo_actors.store.postgres")

T = TypeVar("T")

CONNECT_TIMEOUT = 5  # seconds, unless the DSN says otherwise
POOL_TIMEOUT = 1.0  # seconds to wait for a connection; the pool has one spare, so a wait
# means the database is away: fail (the listener answers 503) rather than hold the caller
DOWN_POOL_TIMEOUT = 0.2  # the same while the last batch found the database away
OPEN_TIMEOUT = 15.0  # seconds to reach the database at start-up
RECONNECT_GIVE_UP = 4.0  # seconds a pool slot retries in the background before it is dropped
COUNTS_REFRESH = 1.0  # seconds between reads of the cluster's counts
LISTEN_POLL = 0.5  # seconds the LISTEN thread blocks before looking at the clock again
IDLE_IN_TX_TIMEOUT_MS = 60_000
_RENEW_RUNS = RENEW_RUNS.replace("?", "%s").encode()
TRANSIENT_TRIES = 3  # runs of a batch that keeps failing on timeouts or conflicts
TRANSIENT_PAUSE = 0.05  # seconds before the second run, doubling

# Errors after which the transaction was rolled back and may succeed if run again. Lock and
# statement timeouts are OperationalErrors in psycopg, but the server is there.
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
              psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)


class PostgresStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of this node's writer, for tests and benchmarks."""

    node: str
    batches: int
    ops: int
    appends: int
    max_batch: int
    failed_batches: int
    queued: int
    transient_retries: int  # batches run again after a timeout or a conflict


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


def _configure(schema: str, lock_timeout: float, statement_timeout: float, conn: Conn) -> None:
    """Session settings of every pooled connection (timeouts in seconds, 0: none)."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    conn.execute("SET synchronous_commit TO on")
    conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TX_TIMEOUT_MS:d}")
    conn.execute(f"SET lock_timeout = {round(lock_timeout * 1000):d}")
    conn.execute(f"SET statement_timeout = {round(statement_timeout * 1000):d}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _store_error(exc: BaseException, dsn: str, verb: str = "write") -> StoreError:
    if isinstance(exc, _TRANSIENT):
        return StoreError(f"store {verb} failed, transient (lock or statement timeout, or a "
                          f"conflict; nothing was written): {_first_line(exc)}")
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


class PostgresStore(PostgresEvents, PostgresAttempts, PostgresRuns, PostgresSessions):
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
        self._claimed: dict[str, str] = {}  # event id -> lane, for events this node claimed
        self._down = False  # the last batch could not reach the database
        self._transient_retries = 0

    @property
    def node(self) -> str:
        """This node's id, recorded on its claims and runs."""
        return self._node

    def statistics(self) -> PostgresStoreStatistics:
        """A snapshot of this node's group-commit counters."""
        return PostgresStoreStatistics(
            node=self._node, batches=self._batches, ops=self._ops, appends=self._appends,
            max_batch=self._max_batch, failed_batches=self._failed_batches,
            queued=self._queued(), transient_retries=self._transient_retries,
        )

    # -- the writer (in the write thread) ------------------------------------------------------

    def _apply_batch(self, batch: list[Op[Any]]) -> None:
        pause = TRANSIENT_PAUSE
        for tries in range(1, TRANSIENT_TRIES + 1):
            try:
                self._try_batch(batch)
                return
            except _TRANSIENT as exc:
                if tries == TRANSIENT_TRIES or self._stop_now:
                    self._fail_all(batch, _store_error(exc, self._dsn))
                    return
                # Rolled back whole: nothing of it was written; run it again.
                self._transient_retries += 1
                log.warning("store.batch_transient", ops=len(batch), tries=tries,
                            retry_in=pause, error=_first_line(exc))
                time.sleep(pause)  # the writer thread: batches queue up meanwhile
                pause *= 2

    def _try_batch(self, batch: list[Op[Any]]) -> None:
        """One run of *batch*; raises what :data:`_TRANSIENT` names (the batch may be run
        again), fails the batch to its callers on any other error."""
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
                except psycopg.OperationalError:  # _TRANSIENT included
                    raise
                except Exception as exc:
                    # ... and when some op fails, the batch again, each op in a savepoint, so
                    # only that op's caller gets the error.
                    log.debug("store.batch_retried", ops=len(batch), error=_first_line(exc))
                    resync = self._run_transaction(conn, batch, now, isolate=True)
        except _TRANSIENT:
            raise
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
            lanes = sorted({lane for op in batch for lane in op.lanes})
            if lanes:
                # Lock every lane this batch writes, in one order for all nodes. An upsert
                # that updates locks the row whether it existed, was just pruned, or is new
                # (INSERT ... DO NOTHING then SELECT ... FOR UPDATE could find it pruned in
                # between, and draw a seq without the lock).
                conn.execute(
                    "INSERT INTO lanes AS l (lane, ready_at) SELECT s, 'Infinity' "
                    "FROM unnest(%s::text[]) AS s ORDER BY s ON CONFLICT (lane) "
                    "DO UPDATE SET ready_at = l.ready_at", (lanes,))
            tx = Tx(conn)
            total = Delta()
            for op in batch:
                op.error = None
                if op.claim:
                    tx.flush()  # the lanes this batch's appends and settles made ready
                if not isolate:
                    op.result, op.delta = op.fn(tx, now)
                else:
                    try:
                        with conn.transaction():
                            op.result, op.delta = op.fn(tx, now)
                    except psycopg.OperationalError:
                        # The connection is gone, or a timeout or conflict (_TRANSIENT are
                        # OperationalErrors): the whole batch fails (and is run again).
                        raise
                    except Exception as exc:
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
                # The payload names this node: its own notifications need no nudge.
                conn.execute("SELECT pg_notify(%s, %s)", (self._events_channel, self._node))
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

        def receive(c: Conn) -> set[tuple[str, str]]:
            return {(n.channel, n.payload)
                    for n in c.notifies(timeout=LISTEN_POLL, stop_after=1)}

        def close(c: Conn) -> None:
            c.close()

        try:
            while True:
                try:
                    if conn is None:
                        conn = await anyio.to_thread.run_sync(connect)
                        backoff = 0.5
                        self._events_latch.set()
                        self._nudge()
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
                events = {payload for channel, payload in got
                          if channel == self._events_channel}
                if events:
                    self._events_latch.set()
                    if events - {self._node}:  # another node's: a waiting claim runs now
                        self._nudge()
                if any(channel == self._runs_channel for channel, _ in got):
                    self._runs_latch.set()
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close, conn)

    async def _serve_maintenance(self) -> None:
        """Every second: refresh the cluster's counts (any batch does, when due) and renew
        this node's run leases every third of the lease (see :class:`RunLeases`), so a live
        node's runs are never taken for a dead one's. While renewals fail (the database is
        away) they are tried every round."""
        while True:
            await anyio.sleep(min(COUNTS_REFRESH, self._node_lease / 3))
            renew = time.monotonic() - self._renewed_at >= self._node_lease / 3
            try:
                if renew:
                    await self._renew_runs()
                else:
                    await self._submit(Op(_tx_nothing))
            except StoreClosedError:
                return
            except StoreError as exc:
                log.warning("store.maintenance_failed", renew=renew, error=str(exc))

    def _tx_renew_runs(self, tx: Tx, now: float) -> tuple[None, Delta]:
        tx.conn.execute(_RENEW_RUNS, (now + self._node_lease, self._node))
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
        log.info("store.closed", node=self._node, commits=self._batches, ops=self._ops,
                 appends=self._appends)



def _tx_nothing(tx: Tx, now: float) -> tuple[None, Delta]:
    """An empty op: its batch refreshes the cluster's counts when they are due."""
    return None, NO_CHANGE


def _open_sync(dsn: str, schema: str, node: str, must_exist: bool,
               timeouts: tuple[float, float]
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
        configure=partial(_configure, schema, *timeouts), name=f"mfo-{schema}",
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
    lock_timeout: float = 2.0,
    statement_timeout: float = 30.0,
    clock: Callable[[], float] = time.time,
    must_exist: bool = False,
) -> AsyncIterator[PostgresStore]:
    """Open (creating and migrating *schema* if needed) the Postgres store at *dsn*.

    Args:
      dsn: A libpq connection string or ``postgresql://`` URL.
      schema: The schema holding the tables; several instances may share a database.
      node: This node's id (``store.node_id``), recorded on claims and runs.
      node_lease: Seconds after which a node that stopped renewing loses its active runs.
      lock_timeout: Seconds a statement waits for a lock (0: forever); see "Transient
        failures" above.
      statement_timeout: Seconds a statement may run (0: no limit).
      must_exist: Raise StoreError instead of creating a missing schema (the CLI).
      Others: as :func:`~mfo_actors.store.open_sqlite_store`.

    Raises:
      StoreError: the database cannot be reached, or the schema is newer than this code.
    """
    try:
        pool, counts, before = await anyio.to_thread.run_sync(
            _open_sync, dsn, schema, node, must_exist, (lock_timeout, statement_timeout))
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
