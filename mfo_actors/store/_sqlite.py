"""The SQLite backend: one file in ``state_dir``, WAL, ``synchronous=FULL``, group commit.

Writes go through the group-commit writer of ``_engine.py``: every write call (append, claim,
settle, replay, runs) is queued, and the writer runs each batch in ONE ``BEGIN IMMEDIATE``
transaction on the write connection (one fsync for the whole batch). Appends without dedupe
key or runs go in with one ``executemany`` per run of them; no op gets a SAVEPOINT unless one
fails: then the batch is rolled back and run again with a SAVEPOINT per op, so only the
failing op's caller gets the error.

Reads use a second, ``query_only`` connection in a worker thread. WAL lets it read while the
writer writes, and lets another process (the CLI, while the daemon runs) read and write the
same file; the writer notices other processes' commits (``PRAGMA data_version``) and then
recounts the in-memory statistics.

Counts for backpressure and ``stats()`` are kept in memory, initialised from the file at open
and updated after each commit; appends reserve their slot before queueing so the bound holds
for writes in flight too.

Failing writes. ``stats().writable`` is the outcome of the last transaction
(:class:`~mfo_actors.store.WriteHealth`); while it failed (disk full, immutable files), the
writer tries a one-page probe write every ``PROBE_INTERVAL`` so readiness comes back on its
own. Before each transaction the writer checks that the path still names the file it opened
(same device and inode): once the file (or the state dir) is removed or replaced under a
running daemon, every write fails with a :class:`StoreError` saying so, instead of being
committed into a deleted file and acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from mfo_actors.ids import new_id
from mfo_actors.messages import Event, RunStatus
from mfo_actors.observability import get_logger
from mfo_actors.store._codec import (
    ATTEMPT_COLS,
    ATTEMPT_UPSERT,
    EVENT_COLS,
    OUTPUT_CAP,
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
from mfo_actors.store._engine import (
    NO_CHANGE,
    Counts,
    Delta,
    GroupCommitStore,
    Op,
    as_store_error,
)
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
from mfo_actors.store._schema import NewerSchemaError, NotAStoreError, migrate

__all__ = [
    "DEFAULT_GROUP_COMMIT_MAX",
    "OUTPUT_CAP",
    "SQLiteStore",
    "SQLiteStoreStatistics",
    "open_sqlite_store",
]

log = get_logger("mfo_actors.store.sqlite")

T = TypeVar("T")

DEFAULT_GROUP_COMMIT_MAX = 512  # as StoreConfig.group_commit_max
BUSY_TIMEOUT_MS = 10_000  # another process (the CLI) holding the write lock: wait this long
PRUNE_CHUNK = 5_000  # rows deleted per transaction, so appends interleave with a big prune
_IN_CHUNK = 500  # ids per "IN (...)" clause, well under SQLite's variable limit

# Each source's head (its oldest pending-or-claimed event), found with a loose index scan over
# events_outbox: one index probe per distinct source, whatever the outbox depth. INDEXED BY is
# needed because the planner otherwise prefers events_status and scans every pending row.
_HEADS_SQL = """
WITH RECURSIVE src(s) AS (
    SELECT (SELECT source FROM events INDEXED BY events_outbox
            WHERE status IN ('pending', 'claimed') ORDER BY source LIMIT 1)
    UNION ALL
    SELECT (SELECT source FROM events INDEXED BY events_outbox
            WHERE status IN ('pending', 'claimed') AND source > src.s ORDER BY source LIMIT 1)
    FROM src WHERE src.s IS NOT NULL
),
heads(seq) AS (
    SELECT (SELECT seq FROM events INDEXED BY events_outbox
            WHERE status IN ('pending', 'claimed') AND source = src.s ORDER BY seq LIMIT 1)
    FROM src WHERE src.s IS NOT NULL
)
SELECT e.seq, e.source FROM heads JOIN events e ON e.seq = heads.seq
WHERE e.status = 'pending' AND e.next_attempt_at <= ?
ORDER BY e.seq LIMIT ?
"""
# The events of one source right after its head, in acceptance order.
_FOLLOWERS_SQL = """
SELECT seq, status, next_attempt_at FROM events INDEXED BY events_outbox
WHERE source = ? AND seq > ? AND status IN ('pending', 'claimed') ORDER BY seq LIMIT ?
"""


class SQLiteStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the writer's work, for tests and benchmarks."""

    batches: int  # transactions committed by the writer (one fsync each)
    ops: int  # write calls served in those transactions
    appends: int  # of which appends
    max_batch: int  # the most ops one transaction carried
    failed_batches: int  # transactions that could not be committed
    external_resyncs: int  # recounts after another process wrote the file
    queued: int  # ops waiting for the writer right now


def _close_sessions(conn: sqlite3.Connection, where: str, params: tuple[Any, ...],
                    reason: str, now: float) -> list[SessionRecord]:
    """Close the active sessions matching *where*; returns them as closed."""
    rows = conn.execute(
        f"UPDATE sessions SET status = 'closed', closed_at = ?, close_reason = ? "
        f"WHERE status = 'active' AND {where} RETURNING seq, {SESSION_COLS}",
        (now, reason, *params),
    ).fetchall()
    rows.sort(key=lambda r: r[0])
    return [session_record(r[1:]) for r in rows]


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # isolation_level=None: we write BEGIN/COMMIT ourselves. check_same_thread=False: the
    # connection moves between worker threads, but only one uses it at a time (a limiter of 1).
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
        else:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch the store to WAL mode (got {mode})")
        # FULL: the WAL is fsync'd at every commit, so a commit survives power loss.
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _count(conn: sqlite3.Connection) -> Counts:
    counts = Counts()
    rows = conn.execute(
        "SELECT status, COUNT(*), COALESCE(SUM(size), 0) FROM events GROUP BY status"
    ).fetchall()
    for status, n, size in rows:
        if status in ("pending", "claimed"):
            counts.pending += n
            counts.pending_bytes += size
        elif status == "delivered":
            counts.delivered = n
        elif status == "dead":
            counts.dead = n
    return counts


def _data_version(conn: sqlite3.Connection) -> int:
    (value,) = conn.execute("PRAGMA data_version").fetchone()
    return int(value)


_INSERT_EVENT = (
    "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
    "is_json, dedupe_key, size, status, next_attempt_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
)


def _event_row(event: Event, size: int, now: float) -> tuple[Any, ...]:
    return (event.id, event.source, event.type, event.received_at, json_bytes(event.headers),
            event.body, event.content_type, int(event.is_json), event.dedupe_key, size, now)


def _insert_events(conn: sqlite3.Connection, ops: list[Op[Any]], now: float) -> None:
    """Appends marked ``row`` (no dedupe key, no runs), in one ``executemany``."""
    rows: list[tuple[Event, int]] = [op.row for op in ops]  # type: ignore[misc]
    conn.executemany(_INSERT_EVENT, [_event_row(event, size, now) for event, size in rows])
    for op, (event, size) in zip(ops, rows, strict=True):
        op.result = AppendResult(event.id)
        op.delta = Delta(pending=1, bytes=size, wake_events=True)


def _insert_runs(conn: sqlite3.Connection, runs: Sequence[RunRequest], now: float,
                 *, node: str | None = None) -> list[str]:
    """Insert *runs* as ``new``, or ``active`` and owned by *node* when one is given."""
    created = []
    status, started_at = ("active", now) if node else ("new", None)
    for run in runs:
        cur = conn.execute(
            "INSERT OR IGNORE INTO runs (run_id, flow, status, trigger, event_id, input, "
            "schedule_key, tick, created_at, started_at, node) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.flow, status, run.trigger, run.event_id, json_bytes(run.input),
             run.schedule_key, run.tick, now, started_at, node),
        )
        if cur.rowcount == 1:
            created.append(run.run_id)
    return created


class SQLiteStore(GroupCommitStore):
    """The SQLite :class:`~mfo_actors.store.EventStore`; open it with :func:`open_sqlite_store`.

    Besides the protocol it offers :meth:`statistics` (group-commit counts) and :attr:`path`.
    """

    _DB_ERRORS = (sqlite3.Error,)

    def __init__(
        self,
        path: Path,
        wconn: sqlite3.Connection,
        rconn: sqlite3.Connection,
        counts: Counts,
        data_version: int,
        *,
        group_commit_max: int,
        max_pending: int,
        max_bytes: int,
        dedupe_window: float,
        clock: Callable[[], float],
        node: str,
        identity: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(counts, group_commit_max=group_commit_max, max_pending=max_pending,
                         max_bytes=max_bytes)
        self._path = path
        self._node = node
        self._identity = identity  # (st_dev, st_ino) of the file we opened
        self._wconn: sqlite3.Connection | None = wconn
        self._rconn: sqlite3.Connection | None = rconn
        self._data_version = data_version
        self._dedupe_window = dedupe_window
        self._clock = clock
        self._read_limiter = anyio.CapacityLimiter(1)

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    async def _open(
        cls,
        path: Path,
        *,
        must_exist: bool,
        group_commit_max: int,
        max_pending: int,
        max_bytes: int,
        dedupe_window: float,
        clock: Callable[[], float],
        node: str,
    ) -> SQLiteStore:
        def open_sync() -> tuple[sqlite3.Connection, sqlite3.Connection, Counts, int, int,
                                 tuple[int, int]]:
            if must_exist and not path.exists():
                raise StoreError(f"no event store at {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            wconn = _connect(path, readonly=False)
            try:
                before, _ = migrate(wconn)
                counts = _count(wconn)
                version = _data_version(wconn)
                rconn = _connect(path, readonly=True)
                st = os.stat(path)
            except BaseException:
                wconn.close()
                raise
            return wconn, rconn, counts, version, before, (st.st_dev, st.st_ino)

        try:
            wconn, rconn, counts, version, before, identity = await anyio.to_thread.run_sync(
                open_sync)
        except NewerSchemaError as exc:
            raise StoreError(f"{path}: {exc}") from None
        except NotAStoreError as exc:
            raise StoreError(f"{path} is not an mfo-actors store: {exc}") from None
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise StoreError(
                    f"{path} is not an mfo-actors store, or it is corrupt (SQLite: {exc}); "
                    "move it aside to start afresh") from None
            raise StoreError(f"{path}: cannot open the event store: {exc}") from None
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: cannot open the event store: {exc}") from None
        store = cls(
            path, wconn, rconn, counts, version, group_commit_max=group_commit_max,
            max_pending=max_pending, max_bytes=max_bytes, dedupe_window=dedupe_window,
            clock=clock, node=node, identity=identity,
        )
        log.info("store.opened", path=str(path), schema_before=before, pending=counts.pending,
                 dead=counts.dead)
        return store

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    async def _close_connections(self) -> None:
        wconn, rconn = self._wconn, self._rconn
        self._wconn = self._rconn = None

        def close_sync() -> None:
            for conn in (rconn, wconn):  # the writer last: it checkpoints the WAL
                if conn is not None:
                    conn.close()

        async with self._write_limiter, self._read_limiter:
            await anyio.to_thread.run_sync(close_sync)
        log.info("store.closed", path=str(self._path))

    def _check_file(self) -> None:
        """Raise StoreError unless the path still names the file we opened (in the write
        thread, before each transaction: one ``stat``, next to an fsync)."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise StoreError(
                f"{self._path}: the store file was removed while the daemon runs; writes "
                "are refused (they would go to a deleted file)") from None
        except OSError as exc:
            raise StoreError(f"{self._path}: cannot check the store file: {exc}") from None
        if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
            raise StoreError(
                f"{self._path}: the store file was replaced while the daemon runs; writes "
                "are refused (they would go to the old, deleted file)")

    def _probe(self) -> None:
        """A one-page write transaction (in the write thread): is the store writable again?"""
        conn = self._wconn
        if conn is None:
            return
        try:
            self._check_file()
            conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                conn.execute(f"PRAGMA user_version = {int(version):d}")  # rewrites page 1
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, StoreError, OSError) as exc:
            self._health.failed(str(as_store_error(exc, self._DB_ERRORS)))
            return
        log.info("store.writable_again", path=str(self._path))
        self._health.succeeded()

    def _apply_batch(self, batch: list[Op[Any]]) -> None:
        """Run *batch* in one transaction (in the write thread)."""
        conn = self._wconn
        if conn is None:
            self._fail_all(batch, StoreClosedError("the store is closed"))
            return
        now = self._clock()
        try:
            self._check_file()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, StoreError) as exc:
            self._fail_all(batch, exc)
            return
        try:
            self._check_version(conn)
            try:
                self._run_ops(conn, batch, now, isolate=False)
            except Exception as exc:
                # Some op failed: again, each op in a savepoint, so it fails alone.
                log.debug("store.batch_retried", ops=len(batch), error=repr(exc))
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                self._check_version(conn)
                self._run_ops(conn, batch, now, isolate=True)
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._resync = None
            self._data_version = -1  # recount at the next batch
            self._fail_all(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._committed(batch)

    def _check_version(self, conn: sqlite3.Connection) -> None:
        """In a write transaction: recount if another process (the CLI) committed since."""
        version = _data_version(conn)
        if version != self._data_version:
            self._resync = _count(conn)
            self._data_version = version

    def _run_ops(self, conn: sqlite3.Connection, batch: list[Op[Any]], now: float, *,
                 isolate: bool) -> None:
        """Run *batch*'s ops in order: each in a savepoint (*isolate*), or plain with runs of
        bulk appends in one ``executemany`` (an exception then fails the whole attempt)."""
        if isolate:
            for op in batch:
                op.error, op.delta = None, NO_CHANGE
                conn.execute("SAVEPOINT op")
                try:
                    op.result, op.delta = op.fn(conn, now)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    self._op_failed(op, exc)
                conn.execute("RELEASE op")
            return
        bulk: list[Op[Any]] = []
        for op in batch:
            if op.row is not None:
                bulk.append(op)
                continue
            if bulk:
                _insert_events(conn, bulk, now)
                bulk = []
            op.result, op.delta = op.fn(conn, now)
        if bulk:
            _insert_events(conn, bulk, now)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise StoreClosedError("the store is closed")
        try:
            return await anyio.to_thread.run_sync(fn, conn, limiter=self._read_limiter)
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    # -- events ------------------------------------------------------------------------------

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
        created = _insert_runs(conn, runs, now) if runs else []
        return AppendResult(event.id), Delta(
            pending=1, bytes=size, wake_events=True, wake_runs=bool(created)
        )

    async def claim_due(
        self, *, limit: int, lease: float, ordered_by_source: bool = True, per_source: int = 1
    ) -> list[StoredEvent]:
        """Claim up to *limit* due events (see the protocol), each batch with a new token."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(
            self._tx_claim, limit, lease, ordered_by_source, max(1, per_source))))

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
            seqs = []
            for head, source in conn.execute(_HEADS_SQL, (now, limit)).fetchall():
                seqs.append(head)
                if per_source > 1:
                    # The head's followers, while they are due (a rescheduled one stops the run).
                    for seq, status, due in conn.execute(_FOLLOWERS_SQL,
                                                         (source, head, per_source - 1)):
                        if status != "pending" or due > now:
                            break
                        seqs.append(seq)
        else:
            seqs = [r[0] for r in conn.execute(
                "SELECT seq FROM events WHERE status = 'pending' AND next_attempt_at <= ? "
                "ORDER BY seq LIMIT ?", (now, limit))]
        if not seqs:
            return [], NO_CHANGE
        token = new_id()
        rows = conn.execute(
            f"UPDATE events SET status = 'claimed', claim_token = ?, claimed_by = ?, "
            f"lease_until = ? WHERE seq IN ({_marks(len(seqs))}) RETURNING seq, {EVENT_COLS}",
            (token, self._node, now + lease, *seqs),
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [stored_event(r[1:]) for r in rows], NO_CHANGE

    async def mark_delivered(
        self, event_id: str, claim_token: str, *, sent_at: float | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as delivered (ignored, and logged, for a stale token)."""
        await self._submit(Op(partial(
            self._tx_delivered, event_id, claim_token, Send(sent_at, None, latency))))

    def _tx_delivered(
        self, event_id: str, token: str, send: Send, conn: sqlite3.Connection, now: float
    ) -> tuple[None, Delta]:
        row = conn.execute(
            "UPDATE events SET status = 'delivered', delivered_at = ?, attempts = attempts + 1, "
            "last_error = NULL, claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (now, event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="delivered")
            return None, NO_CHANGE
        conn.execute(ATTEMPT_UPSERT, send.params(event_id, row[1], now, "delivered", None))
        return None, Delta(pending=-1, bytes=-row[0], delivered=1, wake_events=True)

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as pending, due at *next_attempt_at* (see the protocol)."""
        await self._submit(Op(partial(
            self._tx_reschedule, event_id, claim_token, next_attempt_at, error, count_attempt,
            Send(sent_at, status, latency))))

    def _tx_reschedule(
        self, event_id: str, token: str, next_at: float, error: str, count_attempt: bool,
        send: Send, conn: sqlite3.Connection, now: float,
    ) -> tuple[None, Delta]:
        row = conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = ?, last_error = ?, "
            "attempts = attempts + ?, claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (next_at, error, int(count_attempt), event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="reschedule")
            return None, NO_CHANGE
        if count_attempt:
            conn.execute(ATTEMPT_UPSERT, send.params(event_id, row[1], now, "retry", error))
        return None, Delta(wake_events=next_at <= now)

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
        row = conn.execute(
            "UPDATE events SET status = 'dead', last_error = ?, attempts = attempts + 1, "
            "claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (reason, event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="dead_letter")
            return None, NO_CHANGE
        conn.execute(ATTEMPT_UPSERT, send.params(event_id, row[1], now, "dead", reason))
        # Wakes the forwarder: the next event of this source may now be claimable.
        return None, Delta(pending=-1, bytes=-row[0], dead=1, wake_events=True)

    async def list_attempts(self, event_id: str) -> list[DeliveryAttempt]:
        """The event's attempts, oldest first."""

        def read(conn: sqlite3.Connection) -> list[DeliveryAttempt]:
            return [
                attempt_record(r)
                for r in conn.execute(
                    f"SELECT {ATTEMPT_COLS} FROM attempts WHERE event_id = ? ORDER BY n",
                    (event_id,))
            ]

        return await self._read(read)

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
        n = conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = ?, claim_token = NULL, "
            "lease_until = NULL, claimed_by = NULL "
            "WHERE status = 'claimed' AND (claimed_by = ? OR claimed_by IS NULL)",
            (now, self._node),
        ).rowcount
        if n:
            log.info("store.claims_recovered", count=n)
        return n, Delta(wake_events=n > 0)

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its state, or None."""

        def read(conn: sqlite3.Connection) -> StoredEvent | None:
            row = conn.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE id = ?", (event_id,)
            ).fetchone()
            return None if row is None else stored_event(row)

        return await self._read(read)

    async def list_events(
        self, *, status: EventStatus | None = None, source: str | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Events, newest first (acceptance order), filtered by status and source."""
        sql, params = newest_first(EVENT_COLS, "events", limit, status=status, source=source)

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [stored_event(r) for r in conn.execute(sql, params)]

        return await self._read(read)

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
        sizes: list[int] = []
        if all_dead:
            sizes += [r[0] for r in conn.execute(sql + " RETURNING size", (now,))]
        for chunk in _chunks(ids):
            sizes += [r[0] for r in conn.execute(
                sql + f" AND id IN ({_marks(len(chunk))}) RETURNING size", (now, *chunk))]
        n = len(sizes)
        if n:
            log.info("store.replayed", count=n)
        return n, Delta(pending=n, bytes=sum(sizes), dead=-n, wake_events=n > 0)

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered over *delivered_older_than* seconds ago.

        Events with a dedupe key received within the dedupe window are kept, so provider
        retries are still recognised. Deletes in chunks, so appends go on meanwhile.
        """
        total = 0
        while True:
            n = await self._submit(Op(partial(self._tx_prune, delivered_older_than)))
            total += n
            if n < PRUNE_CHUNK:
                break
        if total:
            log.info("store.pruned", count=total)
        return total

    def _tx_prune(self, age: float, conn: sqlite3.Connection, now: float) -> tuple[int, Delta]:
        ids = [r[0] for r in conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 'delivered' "
            "AND delivered_at < ? AND (dedupe_key IS NULL OR received_at < ?) "
            "ORDER BY seq LIMIT ?) RETURNING id",
            (now - age, now - self._dedupe_window, PRUNE_CHUNK),
        )]
        for chunk in _chunks(ids):
            conn.execute(f"DELETE FROM attempts WHERE event_id IN ({_marks(len(chunk))})", chunk)
        return len(ids), Delta(delivered=-len(ids))

    def statistics(self) -> SQLiteStoreStatistics:
        """A snapshot of the group-commit counters."""
        return SQLiteStoreStatistics(
            batches=self._batches, ops=self._ops, appends=self._appends,
            max_batch=self._max_batch, failed_batches=self._failed_batches,
            external_resyncs=self._external_resyncs,
            queued=self._queued(),
        )

    # -- runs --------------------------------------------------------------------------------

    async def create_runs(self, runs: Sequence[RunRequest], *, claim: bool = False) -> list[str]:
        """Create ``new`` runs (``active`` with *claim*); a (flow, schedule_key, tick) or run id
        seen before is skipped."""
        items = tuple(runs)
        if not items:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_create_runs, items, claim)))

    def _tx_create_runs(
        self, runs: Sequence[RunRequest], claim: bool, conn: sqlite3.Connection, now: float
    ) -> tuple[list[str], Delta]:
        created = _insert_runs(conn, runs, now, node=self._node if claim else None)
        return created, Delta(wake_runs=bool(created) and not claim)

    async def claim_runs(self, *, limit: int) -> list[RunRecord]:
        """Mark up to *limit* ``new`` runs ``active``, oldest first, and return them."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_claim_runs, limit)))

    def _tx_claim_runs(
        self, limit: int, conn: sqlite3.Connection, now: float
    ) -> tuple[list[RunRecord], Delta]:
        rows = conn.execute(
            f"UPDATE runs SET status = 'active', started_at = ?, node = ? WHERE seq IN "
            f"(SELECT seq FROM runs WHERE status = 'new' ORDER BY seq LIMIT ?) "
            f"RETURNING seq, {RUN_COLS}",
            (now, self._node, limit),
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [run_record(r[1:]) for r in rows], NO_CHANGE

    async def record_task(self, record: TaskRunRecord) -> None:
        """Insert or replace one task's record; outputs over 64 KiB become a marker."""
        await self._submit(Op(partial(self._tx_record_task, record)))

    def _tx_record_task(
        self, r: TaskRunRecord, conn: sqlite3.Connection, now: float
    ) -> tuple[None, Delta]:
        conn.execute(TASK_UPSERT, task_params(r))
        return None, NO_CHANGE

    async def finish_run(
        self,
        run_id: str,
        *,
        status: Literal["done", "error"],
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Settle a new or active run (outputs size-capped); a settled one is left alone."""
        await self._submit(Op(partial(self._tx_finish_run, run_id, status, error, outputs)))

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[None, Delta]:
        n = conn.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ?, outputs = ?, "
            "started_at = COALESCE(started_at, ?) WHERE run_id = ? AND status IN ('new', 'active')",
            (status, now, error, capped_json(outputs), now, run_id),
        ).rowcount
        if not n:
            log.warning("store.finish_run_ignored", run_id=run_id, status=status)
        return None, NO_CHANGE

    async def recover_runs(
        self, *, rerun_flows: Sequence[str], orphaned: bool = False
    ) -> list[RunRecord]:
        """This node's runs left ``active`` by a crash: ``interrupted += 1``, then ``new`` again
        (flows in *rerun_flows*) or ``error`` "interrupted" with their unfinished tasks
        ``cancelled``. A file has one node, so there are never *orphaned* runs of others."""
        if orphaned:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_recover_runs, frozenset(rerun_flows))))

    def _tx_recover_runs(
        self, rerun: frozenset[str], conn: sqlite3.Connection, now: float
    ) -> tuple[list[RunRecord], Delta]:
        found = conn.execute(
            "SELECT run_id, flow FROM runs WHERE status = 'active' "
            "AND (node = ? OR node IS NULL) ORDER BY seq", (self._node,)
        ).fetchall()
        out: list[RunRecord] = []
        for run_id, flow in found:
            if flow in rerun:
                conn.execute(
                    "UPDATE runs SET status = 'new', started_at = NULL, node = NULL, "
                    "interrupted = interrupted + 1 WHERE run_id = ?", (run_id,))
            else:
                conn.execute(
                    "UPDATE runs SET status = 'error', error = 'interrupted', finished_at = ?, "
                    "interrupted = interrupted + 1 WHERE run_id = ?", (now, run_id))
                conn.execute(
                    "UPDATE task_runs SET state = 'cancelled', error = 'interrupted', "
                    "finished_at = ? WHERE run_id = ? AND state IN ('pending', 'running')",
                    (now, run_id))
            row = conn.execute(f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?",
                               (run_id,)).fetchone()
            out.append(run_record(row))
        if out:
            log.info("store.runs_recovered", count=len(out),
                     rerun=sum(1 for r in out if r.status == "new"))
        return out, Delta(wake_runs=any(r.status == "new" for r in out))

    async def get_run(self, run_id: str) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        """One run and its task records (in the order they were first recorded), or None."""

        def read(conn: sqlite3.Connection) -> tuple[RunRecord, list[TaskRunRecord]] | None:
            row = conn.execute(f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?",
                               (run_id,)).fetchone()
            if row is None:
                return None
            tasks = conn.execute(
                f"SELECT {TASK_COLS} FROM task_runs WHERE run_id = ? ORDER BY rowid", (run_id,)
            ).fetchall()
            return run_record(row), [task_record(t) for t in tasks]

        return await self._read(read)

    async def list_runs(
        self, *, flow: str | None = None, status: RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        sql, params = newest_first(RUN_COLS, "runs", limit, flow=flow, status=status)

        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            return [run_record(r) for r in conn.execute(sql, params)]

        return await self._read(read)

    async def last_tick(self, flow: str, schedule_key: str) -> float | None:
        """The latest tick recorded for (flow, schedule_key), or None."""

        def read(conn: sqlite3.Connection) -> float | None:
            (tick,) = conn.execute(
                "SELECT MAX(tick) FROM runs WHERE flow = ? AND schedule_key = ?",
                (flow, schedule_key),
            ).fetchone()
            return None if tick is None else float(tick)

        return await self._read(read)

    # -- chat sessions -----------------------------------------------------------------------

    async def open_session(
        self, key: str, *, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any] | None = None,
    ) -> SessionOpen:
        """The active session of *key* (closed first if idle past *ttl*), or a new one."""
        return await self._submit(Op(partial(
            self._tx_open_session, key, thread_id, ttl, max(1, max_active), metadata or {})))

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
            closed += _close_sessions(conn, "session_id = ?", (current.session_id,),
                                      "expired", now)
        (active,) = conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE status = 'active'").fetchone()
        if active >= max_active:
            closed += _close_sessions(
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
        limit: int, metadata: dict[str, Any] | None, conn: sqlite3.Connection, now: float,
    ) -> tuple[SessionRecord | None, Delta]:
        row = conn.execute("SELECT context, metadata FROM sessions WHERE session_id = ?",
                           (session_id,)).fetchone()
        if row is None:
            return None, NO_CHANGE
        context = [*(load_json(row[0]) or []), *messages]
        context = context[len(context) - limit:] if limit > 0 else []
        merged = {**(load_json(row[1]) or {}), **(metadata or {})}
        updated = conn.execute(
            f"UPDATE sessions SET turns = turns + 1, last_activity = MAX(last_activity, ?), "
            f"thread_id = ?, context = ?, metadata = ? WHERE session_id = ? "
            f"RETURNING {SESSION_COLS}",
            (now, thread_id, capped_list(context), json_bytes(merged), session_id),
        ).fetchone()
        return session_record(updated), NO_CHANGE

    async def get_session(self, key: str) -> SessionRecord | None:
        """The active session of *key*, else its latest closed one."""

        def read(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(
                f"SELECT {SESSION_COLS} FROM sessions WHERE key = ? "
                f"ORDER BY status = 'active' DESC, seq DESC LIMIT 1", (key,)).fetchone()
            return None if row is None else session_record(row)

        return await self._read(read)

    async def list_sessions(
        self, *, status: SessionStatus | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first."""
        sql = f"SELECT {SESSION_COLS} FROM sessions"
        params: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            params = (status,)
        sql += " ORDER BY last_activity DESC, seq DESC LIMIT ?"

        def read(conn: sqlite3.Connection) -> list[SessionRecord]:
            return [session_record(r) for r in conn.execute(sql, (*params, max(0, limit)))]

        return await self._read(read)

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key* (None if it had none)."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[SessionRecord | None, Delta]:
            closed = _close_sessions(conn, "key = ?", (key,), reason, now)
            return (closed[0] if closed else None), NO_CHANGE

        return await self._submit(Op(tx))

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close every active session idle for *ttl* seconds or more."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[list[SessionRecord], Delta]:
            return _close_sessions(conn, "last_activity <= ?", (now - ttl,), "expired",
                                   now), NO_CHANGE

        return await self._submit(Op(tx))

    async def count_sessions(self) -> int:
        """Active sessions."""

        def read(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE status = 'active'").fetchone()
            return int(n)

        return await self._read(read)


@asynccontextmanager
async def open_sqlite_store(
    path: str | Path,
    *,
    group_commit_max: int = DEFAULT_GROUP_COMMIT_MAX,
    max_pending: int = 100_000,
    max_bytes: int = 1024**3,
    dedupe_window: float = 86400.0,
    clock: Callable[[], float] = time.time,
    must_exist: bool = False,
    node: str = "local",
) -> AsyncIterator[SQLiteStore]:
    """Open (creating, and migrating, if needed) the SQLite store at *path*.

    The writer task lives in this context's task group. Leaving the context commits the
    writes still queued (for up to 30 s), then closes the connections.

    Args:
      path: The database file; its directory is created.
      group_commit_max: Most write calls committed in one transaction.
      max_pending: Pending + claimed events beyond which ``append`` raises StoreFullError.
      max_bytes: Bytes of pending + claimed bodies beyond which ``append`` raises.
      dedupe_window: Seconds within which a (source, dedupe_key) is a provider retry.
      clock: Wall-clock seconds; tests pass a fake one to expire leases without sleeping.
      must_exist: Raise StoreError instead of creating a missing file (the CLI).
      node: This node's id (``store.node_id``), recorded on claims and runs.

    Raises:
      StoreError: the file cannot be opened, is not a store, or has a newer schema.
    """
    store = await SQLiteStore._open(
        Path(path), must_exist=must_exist, group_commit_max=group_commit_max,
        max_pending=max_pending, max_bytes=max_bytes, dedupe_window=dedupe_window, clock=clock,
        node=node,
    )
    async with store._running():
        yield store
