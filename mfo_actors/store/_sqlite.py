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

This module holds the connections, the writer's transaction and opening; the tables are in
their own modules, each a part of :class:`SQLiteStore`: ``_sqlite_events.py`` (the outbox),
``_sqlite_attempts.py`` (delivery history), ``_sqlite_runs.py`` (runs and tasks) and
``_sqlite_sessions.py`` (chat sessions), over ``_sqlite_base.py``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from mfo_actors.observability import get_logger
from mfo_actors.store._codec import OUTPUT_CAP
from mfo_actors.store._engine import NO_CHANGE, Counts, Op, as_store_error
from mfo_actors.store._protocol import StoreClosedError, StoreError
from mfo_actors.store._schema import NewerSchemaError, NotAStoreError, migrate
from mfo_actors.store._sqlite_attempts import SQLiteAttempts
from mfo_actors.store._sqlite_events import SQLiteEvents, insert_events
from mfo_actors.store._sqlite_runs import SQLiteRuns
from mfo_actors.store._sqlite_sessions import SQLiteSessions

__all__ = [
    "DEFAULT_GROUP_COMMIT_MAX",
    "OUTPUT_CAP",
    "SQLiteStore",
    "SQLiteStoreStatistics",
    "open_sqlite_store",
]

log = get_logger("mfo_actors.store.sqlite")


DEFAULT_GROUP_COMMIT_MAX = 512  # as StoreConfig.group_commit_max
BUSY_TIMEOUT_MS = 10_000  # another process (the CLI) holding the write lock: wait this long


class SQLiteStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the writer's work, for tests and benchmarks."""

    batches: int  # transactions committed by the writer (one fsync each)
    ops: int  # write calls served in those transactions
    appends: int  # of which appends
    max_batch: int  # the most ops one transaction carried
    failed_batches: int  # transactions that could not be committed
    external_resyncs: int  # recounts after another process wrote the file
    queued: int  # ops waiting for the writer right now


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



class SQLiteStore(SQLiteEvents, SQLiteAttempts, SQLiteRuns, SQLiteSessions):
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
        node_lease: float = 30.0,
        identity: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(counts, group_commit_max=group_commit_max, max_pending=max_pending,
                         max_bytes=max_bytes)
        self._path = path
        self._node = node
        self._node_lease = node_lease
        self._renewed_at = time.monotonic()
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
        node_lease: float,
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
            clock=clock, node=node, node_lease=node_lease, identity=identity,
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
        log.info("store.closed", path=str(self._path), commits=self._batches, ops=self._ops,
                 appends=self._appends)

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
                insert_events(conn, bulk, now)
                bulk = []
            op.result, op.delta = op.fn(conn, now)
        if bulk:
            insert_events(conn, bulk, now)

    def statistics(self) -> SQLiteStoreStatistics:
        """A snapshot of the group-commit counters."""
        return SQLiteStoreStatistics(
            batches=self._batches, ops=self._ops, appends=self._appends,
            max_batch=self._max_batch, failed_batches=self._failed_batches,
            external_resyncs=self._external_resyncs,
            queued=self._queued(),
        )


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
    node_lease: float = 30.0,
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
      node_lease: Seconds this node's active runs stay its own without renewal (renewed
        every third of it); another node sharing the file takes them over after that.

    Raises:
      StoreError: the file cannot be opened, is not a store, or has a newer schema.
    """
    store = await SQLiteStore._open(
        Path(path), must_exist=must_exist, group_commit_max=group_commit_max,
        max_pending=max_pending, max_bytes=max_bytes, dedupe_window=dedupe_window, clock=clock,
        node=node, node_lease=node_lease,
    )
    async with store._running(store._serve_run_leases):
        yield store
