"""The SQLite backend: one file in ``state_dir``, WAL, ``synchronous=FULL``, group commit.

Writes. Every write call (append, claim, settle, replay, runs) becomes an :class:`_Op` put on
a bounded memory stream. One writer task takes everything queued (up to ``group_commit_max``),
runs it in ONE transaction on the write connection in a worker thread, commits (one fsync for
the whole batch), then wakes every caller with its own result. While a batch is being
committed the next one queues up, so the number of fsyncs per second stays flat while the
number of writes per fsync grows with the load. Each op runs inside a SAVEPOINT: one failing
op is rolled back alone and its caller gets the error; the others still commit.

Reads use a second, ``query_only`` connection in a worker thread. WAL lets it read while the
writer writes, and lets another process (the CLI, while the daemon runs) read and write the
same file; the writer notices other processes' commits (``PRAGMA data_version``) and then
recounts the in-memory statistics.

Counts for backpressure and ``stats()`` are kept in memory, initialised from the file at open
and updated after each commit; appends reserve their slot before queueing so the bound holds
for writes in flight too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus

from mfo_actors.errors import MFOError
from mfo_actors.ids import new_id
from mfo_actors.messages import Event, RunStatus
from mfo_actors.observability import get_logger
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
    StoreFullError,
    StoreStats,
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
OUTPUT_CAP = 64 * 1024  # task/run outputs above this many JSON bytes are replaced by a marker
CLOSE_TIMEOUT = 30.0  # seconds to drain queued writes at close before giving up on them
PRUNE_CHUNK = 5_000  # rows deleted per transaction, so appends interleave with a big prune
_IN_CHUNK = 500  # ids per "IN (...)" clause, well under SQLite's variable limit

_EVENT_COLS = (
    "id, source, type, received_at, headers, body, content_type, is_json, dedupe_key, "
    "status, attempts, next_attempt_at, last_error, delivered_at, claim_token, attempt_base"
)
_ATTEMPT_COLS = "n, at, outcome, status, error, latency"
_RUN_COLS = (
    "run_id, flow, status, trigger, event_id, input, created_at, started_at, finished_at, "
    "error, outputs, interrupted, schedule_key, tick"
)
_TASK_COLS = "run_id, task_id, state, attempts, started_at, finished_at, error, output"
_SESSION_COLS = (
    "session_id, key, thread_id, status, turns, created_at, last_activity, closed_at, "
    "close_reason, context, metadata"
)

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

_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


class SQLiteStoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the writer's work, for tests and benchmarks."""

    batches: int  # transactions committed by the writer (one fsync each)
    ops: int  # write calls served in those transactions
    appends: int  # of which appends
    max_batch: int  # the most ops one transaction carried
    failed_batches: int  # transactions that could not be committed
    external_resyncs: int  # recounts after another process wrote the file
    queued: int  # ops waiting for the writer right now


@dataclass(slots=True)
class _Delta:
    """What one committed op changes in the in-memory counts, and whom it wakes."""

    pending: int = 0
    bytes: int = 0
    delivered: int = 0
    dead: int = 0
    wake_events: bool = False
    wake_runs: bool = False


_NO_CHANGE = _Delta()


@dataclass(frozen=True, slots=True)
class _Send:
    """How one send went, for the attempt history (see :func:`_record_attempt`)."""

    sent_at: float | None
    status: int | None
    latency: float | None

    def record(self, conn: sqlite3.Connection, event_id: str, number: int, now: float,
               outcome: str, error: str | None) -> None:
        """Insert attempt *number* of *event_id* (started at ``now - latency`` if unknown)."""
        at = self.sent_at if self.sent_at is not None else now - (self.latency or 0.0)
        conn.execute(
            f"INSERT OR REPLACE INTO attempts (event_id, {_ATTEMPT_COLS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, number, at, outcome, self.status, error, self.latency),
        )
_OpFn = Callable[[sqlite3.Connection, float], tuple[T, _Delta]]


class _Op(Generic[T]):
    """One write call waiting for its transaction."""

    __slots__ = ("completed", "delta", "done", "error", "fn", "is_append", "reserved", "result")

    def __init__(self, fn: _OpFn[T], *, reserved: int | None = None) -> None:
        self.fn = fn
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.delta: _Delta = _NO_CHANGE
        self.completed = False  # the writer ran it (successfully or not)
        self.reserved = reserved  # bytes of a backpressure reservation (appends), until settled
        self.is_append = reserved is not None


class _Latch:
    """A wake-up signal that is kept until a waiter consumes it (no lost wake-ups)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        event = self._event
        if event.is_set():
            await anyio.lowlevel.checkpoint()
        else:
            with anyio.move_on_after(max(seconds, 0.0)):
                await event.wait()
        if event.is_set() and self._event is event:
            self._event = anyio.Event()


@dataclass(slots=True)
class _Counts:
    pending: int = 0
    pending_bytes: int = 0
    delivered: int = 0
    dead: int = 0


def _as_store_error(exc: BaseException) -> BaseException:
    if isinstance(exc, MFOError):
        return exc
    if isinstance(exc, sqlite3.Error):
        err = StoreError(f"store write failed: {exc}")
    else:
        err = StoreError(f"store write failed: {exc!r}")
    err.__cause__ = exc
    return err


def _enc_fallback(obj: Any) -> Any:
    return str(obj)  # outputs may hold objects JSON cannot say; keep their text


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value, enc_hook=_enc_fallback)


def _capped_json(value: dict[str, Any] | None) -> bytes | None:
    """JSON of *value*, or a ``{"_truncated": true, "size": n}`` marker above OUTPUT_CAP."""
    if value is None:
        return None
    data = _json(value)
    if len(data) > OUTPUT_CAP:
        return _json({"_truncated": True, "size": len(data)})
    return data


def _capped_list(messages: list[dict[str, Any]]) -> bytes:
    """JSON of a session's context; the oldest messages go first past OUTPUT_CAP."""
    data = _json(messages)
    while len(data) > OUTPUT_CAP and messages:
        messages = messages[max(1, len(messages) // 4):]
        data = _json(messages)
    return data


def _load(data: bytes | None) -> Any:
    return None if data is None else msgspec.json.decode(data)


def _stored(row: Sequence[Any]) -> StoredEvent:
    event = Event(
        id=row[0], source=row[1], type=row[2], received_at=row[3],
        headers=_decode_headers(row[4]), body=bytes(row[5]), content_type=row[6],
        is_json=bool(row[7]), dedupe_key=row[8],
    )
    return StoredEvent(
        event=event, status=row[9], attempts=row[10], next_attempt_at=row[11],
        last_error=row[12], delivered_at=row[13], claim_token=row[14], attempt_base=row[15],
    )



def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        run_id=row[0], flow=row[1], status=row[2], trigger=row[3], event_id=row[4],
        input=_load(row[5]) or {}, created_at=row[6], started_at=row[7], finished_at=row[8],
        error=row[9], outputs=_load(row[10]), interrupted=row[11], schedule_key=row[12],
        tick=row[13],
    )


def _task(row: Sequence[Any]) -> TaskRunRecord:
    return TaskRunRecord(
        run_id=row[0], task_id=row[1], state=row[2], attempts=row[3], started_at=row[4],
        finished_at=row[5], error=row[6], output=_load(row[7]),
    )


def _session(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(
        session_id=row[0], key=row[1], thread_id=row[2], status=row[3], turns=row[4],
        created_at=row[5], last_activity=row[6], closed_at=row[7], close_reason=row[8],
        context=_load(row[9]) or [], metadata=_load(row[10]) or {},
    )


def _close_sessions(conn: sqlite3.Connection, where: str, params: tuple[Any, ...],
                    reason: str, now: float) -> list[SessionRecord]:
    """Close the active sessions matching *where*; returns them as closed."""
    rows = conn.execute(
        f"UPDATE sessions SET status = 'closed', closed_at = ?, close_reason = ? "
        f"WHERE status = 'active' AND {where} RETURNING seq, {_SESSION_COLS}",
        (now, reason, *params),
    ).fetchall()
    rows.sort(key=lambda r: r[0])
    return [_session(r[1:]) for r in rows]


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _newest_first(
    cols: str, table: str, limit: int, **equal: str | None
) -> tuple[str, tuple[str | int, ...]]:
    """``SELECT cols FROM table WHERE k = ? ... ORDER BY seq DESC LIMIT ?`` and its parameters.

    Each keyword given a value (not None) is one ``column = ?`` filter.
    """
    given = {column: value for column, value in equal.items() if value is not None}
    sql = f"SELECT {cols} FROM {table}"
    if given:
        sql += " WHERE " + " AND ".join(f"{column} = ?" for column in given)
    return sql + " ORDER BY seq DESC LIMIT ?", (*given.values(), max(0, limit))


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


def _count(conn: sqlite3.Connection) -> _Counts:
    counts = _Counts()
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


def _insert_runs(conn: sqlite3.Connection, runs: Sequence[RunRequest], now: float,
                 *, claim: bool = False) -> list[str]:
    created = []
    status, started_at = ("active", now) if claim else ("new", None)
    for run in runs:
        cur = conn.execute(
            "INSERT OR IGNORE INTO runs (run_id, flow, status, trigger, event_id, input, "
            "schedule_key, tick, created_at, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.flow, status, run.trigger, run.event_id, _json(run.input),
             run.schedule_key, run.tick, now, started_at),
        )
        if cur.rowcount == 1:
            created.append(run.run_id)
    return created


class SQLiteStore:
    """The SQLite :class:`~mfo_actors.store.EventStore`; open it with :func:`open_sqlite_store`.

    Besides the protocol it offers :meth:`statistics` (group-commit counts) and :attr:`path`.
    """

    def __init__(
        self,
        path: Path,
        wconn: sqlite3.Connection,
        rconn: sqlite3.Connection,
        counts: _Counts,
        data_version: int,
        *,
        group_commit_max: int,
        max_pending: int,
        max_bytes: int,
        dedupe_window: float,
        clock: Callable[[], float],
    ) -> None:
        self._path = path
        self._wconn: sqlite3.Connection | None = wconn
        self._rconn: sqlite3.Connection | None = rconn
        self._counts = counts
        self._data_version = data_version
        self._resync: _Counts | None = None
        self._group_commit_max = max(1, group_commit_max)
        self._max_pending = max_pending
        self._max_bytes = max_bytes
        self._dedupe_window = dedupe_window
        self._clock = clock
        self._reserved = 0
        self._reserved_bytes = 0
        self._closing = False
        self._send, self._recv = anyio.create_memory_object_stream[_Op[Any]](
            self._group_commit_max
        )
        self._write_limiter = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(1)
        self._writer_done = anyio.Event()
        self._events_latch = _Latch()
        self._runs_latch = _Latch()
        self._batches = self._ops = self._appends = self._max_batch = 0
        self._failed_batches = self._external_resyncs = 0

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
    ) -> SQLiteStore:
        def open_sync() -> tuple[sqlite3.Connection, sqlite3.Connection, _Counts, int, int]:
            if must_exist and not path.exists():
                raise StoreError(f"no event store at {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            wconn = _connect(path, readonly=False)
            try:
                before, _ = migrate(wconn)
                counts = _count(wconn)
                version = _data_version(wconn)
                rconn = _connect(path, readonly=True)
            except BaseException:
                wconn.close()
                raise
            return wconn, rconn, counts, version, before

        try:
            wconn, rconn, counts, version, before = await anyio.to_thread.run_sync(open_sync)
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
            clock=clock,
        )
        log.info("store.opened", path=str(path), schema_before=before, pending=counts.pending,
                 dead=counts.dead)
        return store

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    async def aclose(self) -> None:
        """Refuse new writes, let the writer commit what is queued, and wait for it."""
        if not self._closing:
            self._closing = True
            self._send.close()  # blocked senders get ClosedResourceError -> StoreClosedError
        await self._writer_done.wait()

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

    # -- the writer --------------------------------------------------------------------------

    async def _serve_writer(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit queued writes in batches until the stream is closed and drained."""
        try:
            async with self._recv:
                try:
                    task_status.started()
                    while True:
                        try:
                            first = await self._recv.receive()
                        except anyio.EndOfStream:
                            return
                        batch = [first]
                        while len(batch) < self._group_commit_max:
                            try:
                                batch.append(self._recv.receive_nowait())
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                        await self._run_batch(batch)
                finally:
                    # Cancelled (or crashed) with writes still queued: refuse new ones, and
                    # tell the queued callers that theirs were not stored.
                    self._closing = True
                    self._send.close()
                    leftovers: list[_Op[Any]] = []
                    while True:
                        try:
                            leftovers.append(self._recv.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    self._complete(leftovers)
        finally:
            self._writer_done.set()

    async def _run_batch(self, batch: list[_Op[Any]]) -> None:
        try:
            # Not abandoned on cancellation: the transaction always finishes before we go on.
            await anyio.to_thread.run_sync(self._apply_batch, batch, limiter=self._write_limiter)
        finally:
            self._complete(batch)

    def _apply_batch(self, batch: list[_Op[Any]]) -> None:
        """Run *batch* in one transaction (in the write thread)."""
        conn = self._wconn
        if conn is None:
            self._fail_all(batch, StoreClosedError("the store is closed"))
            return
        now = self._clock()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_all(batch, exc)
            return
        try:
            version = _data_version(conn)
            if version != self._data_version:
                # Another process (the CLI) committed since our last batch: recount.
                self._resync = _count(conn)
                self._data_version = version
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    op.result, op.delta = op.fn(conn, now)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    op.error = _as_store_error(exc)
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self._batches += 1
            self._ops += len(batch)
            self._max_batch = max(self._max_batch, len(batch))
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
        for op in batch:
            op.completed = True

    def _fail_all(self, batch: list[_Op[Any]], exc: BaseException) -> None:
        self._failed_batches += 1
        log.error("store.batch_failed", ops=len(batch), error=repr(exc))
        for op in batch:
            # One exception object per caller: each raises it in its own task.
            op.error = type(exc)(str(exc)) if isinstance(exc, StoreError) else _as_store_error(exc)
            op.delta = _NO_CHANGE
            op.completed = True

    def _complete(self, batch: list[_Op[Any]]) -> None:
        """On the event loop, after a batch: update counts, wake callers and waiters."""
        if not batch:
            return
        if self._resync is not None:
            self._counts, self._resync = self._resync, None
            self._external_resyncs += 1
        wake_events = wake_runs = False
        counts = self._counts
        for op in batch:
            if not op.completed:
                op.error = StoreClosedError("the store closed before this write was committed")
            elif op.error is None:
                delta = op.delta
                counts.pending += delta.pending
                counts.pending_bytes += delta.bytes
                counts.delivered += delta.delivered
                counts.dead += delta.dead
                wake_events |= delta.wake_events
                wake_runs |= delta.wake_runs
            self._release(op)
            if op.is_append:
                self._appends += 1
            op.done.set()
        if wake_events:
            self._events_latch.set()
        if wake_runs:
            self._runs_latch.set()

    def _release(self, op: _Op[Any]) -> None:
        if op.reserved is not None:
            self._reserved -= 1
            self._reserved_bytes -= op.reserved
            op.reserved = None

    async def _submit(self, op: _Op[T]) -> T:
        try:
            if self._closing:
                raise StoreClosedError("the store is closing")
            try:
                await self._send.send(op)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise StoreClosedError("the store is closing") from None
            await op.done.wait()
        finally:
            self._release(op)  # no-op once the writer settled it
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]  # set when error is None

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
        if self._closing:
            raise StoreClosedError("the store is closing")
        size = len(event.body)
        counts = self._counts
        if (
            counts.pending + self._reserved + 1 > self._max_pending
            or counts.pending_bytes + self._reserved_bytes + size > self._max_bytes
        ):
            raise StoreFullError(
                f"the store is full ({counts.pending + self._reserved} events, "
                f"{counts.pending_bytes + self._reserved_bytes} bytes pending)"
            )
        self._reserved += 1
        self._reserved_bytes += size
        op = _Op(partial(self._tx_append, event, tuple(runs), size), reserved=size)
        return await self._submit(op)

    def _tx_append(
        self, event: Event, runs: Sequence[RunRequest], size: int,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[AppendResult, _Delta]:
        if event.dedupe_key is not None:
            row = conn.execute(
                "SELECT id FROM events WHERE source = ? AND dedupe_key = ? AND received_at >= ? "
                "ORDER BY seq LIMIT 1",
                (event.source, event.dedupe_key, event.received_at - self._dedupe_window),
            ).fetchone()
            if row is not None:
                return AppendResult(row[0], duplicate=True), _NO_CHANGE
        conn.execute(
            "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
            "is_json, dedupe_key, size, status, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            (event.id, event.source, event.type, event.received_at, _json(event.headers),
             event.body, event.content_type, int(event.is_json), event.dedupe_key, size, now),
        )
        created = _insert_runs(conn, runs, now) if runs else []
        return AppendResult(event.id), _Delta(
            pending=1, bytes=size, wake_events=True, wake_runs=bool(created)
        )

    async def claim_due(
        self, *, limit: int, lease: float, ordered_by_source: bool = True, per_source: int = 1
    ) -> list[StoredEvent]:
        """Claim up to *limit* due events (see the protocol), each batch with a new token."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(_Op(partial(
            self._tx_claim, limit, lease, ordered_by_source, max(1, per_source))))

    def _tx_claim(
        self, limit: int, lease: float, ordered: bool, per_source: int,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[list[StoredEvent], _Delta]:
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
            return [], _NO_CHANGE
        token = new_id()
        rows = conn.execute(
            f"UPDATE events SET status = 'claimed', claim_token = ?, lease_until = ? "
            f"WHERE seq IN ({_marks(len(seqs))}) RETURNING seq, {_EVENT_COLS}",
            (token, now + lease, *seqs),
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [_stored(r[1:]) for r in rows], _NO_CHANGE

    async def mark_delivered(
        self, event_id: str, claim_token: str, *, sent_at: float | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as delivered (ignored, and logged, for a stale token)."""
        await self._submit(_Op(partial(
            self._tx_delivered, event_id, claim_token, _Send(sent_at, None, latency))))

    def _tx_delivered(
        self, event_id: str, token: str, send: _Send, conn: sqlite3.Connection, now: float
    ) -> tuple[None, _Delta]:
        row = conn.execute(
            "UPDATE events SET status = 'delivered', delivered_at = ?, attempts = attempts + 1, "
            "last_error = NULL, claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (now, event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="delivered")
            return None, _NO_CHANGE
        send.record(conn, event_id, row[1], now, "delivered", None)
        return None, _Delta(pending=-1, bytes=-row[0], delivered=1, wake_events=True)

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as pending, due at *next_attempt_at* (see the protocol)."""
        await self._submit(_Op(partial(
            self._tx_reschedule, event_id, claim_token, next_attempt_at, error, count_attempt,
            _Send(sent_at, status, latency))))

    def _tx_reschedule(
        self, event_id: str, token: str, next_at: float, error: str, count_attempt: bool,
        send: _Send, conn: sqlite3.Connection, now: float,
    ) -> tuple[None, _Delta]:
        row = conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = ?, last_error = ?, "
            "attempts = attempts + ?, claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (next_at, error, int(count_attempt), event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="reschedule")
            return None, _NO_CHANGE
        if count_attempt:
            send.record(conn, event_id, row[1], now, "retry", error)
        return None, _Delta(wake_events=next_at <= now)

    async def dead_letter(
        self, event_id: str, claim_token: str, *, reason: str, sent_at: float | None = None,
        status: int | None = None, latency: float | None = None,
    ) -> None:
        """Settle a claimed event as dead with *reason*; counts an attempt."""
        await self._submit(_Op(partial(
            self._tx_dead, event_id, claim_token, reason, _Send(sent_at, status, latency))))

    def _tx_dead(
        self, event_id: str, token: str, reason: str, send: _Send, conn: sqlite3.Connection,
        now: float,
    ) -> tuple[None, _Delta]:
        row = conn.execute(
            "UPDATE events SET status = 'dead', last_error = ?, attempts = attempts + 1, "
            "claim_token = NULL, lease_until = NULL "
            "WHERE id = ? AND status = 'claimed' AND claim_token = ? RETURNING size, attempts",
            (reason, event_id, token),
        ).fetchone()
        if row is None:
            log.warning("store.stale_settle", event_id=event_id, action="dead_letter")
            return None, _NO_CHANGE
        send.record(conn, event_id, row[1], now, "dead", reason)
        # Wakes the forwarder: the next event of this source may now be claimable.
        return None, _Delta(pending=-1, bytes=-row[0], dead=1, wake_events=True)

    async def list_attempts(self, event_id: str) -> list[DeliveryAttempt]:
        """The event's attempts, oldest first."""

        def read(conn: sqlite3.Connection) -> list[DeliveryAttempt]:
            return [
                DeliveryAttempt(number=r[0], at=r[1], outcome=r[2], status=r[3], error=r[4],
                                latency=r[5])
                for r in conn.execute(
                    f"SELECT {_ATTEMPT_COLS} FROM attempts WHERE event_id = ? ORDER BY n",
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
        """Make every claimed event pending and due now (start-up after a crash)."""
        return await self._submit(_Op(self._tx_recover_claims))

    def _tx_recover_claims(self, conn: sqlite3.Connection, now: float) -> tuple[int, _Delta]:
        n = conn.execute(
            "UPDATE events SET status = 'pending', next_attempt_at = ?, claim_token = NULL, "
            "lease_until = NULL WHERE status = 'claimed'",
            (now,),
        ).rowcount
        if n:
            log.info("store.claims_recovered", count=n)
        return n, _Delta(wake_events=n > 0)

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its state, or None."""

        def read(conn: sqlite3.Connection) -> StoredEvent | None:
            row = conn.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE id = ?", (event_id,)
            ).fetchone()
            return None if row is None else _stored(row)

        return await self._read(read)

    async def list_events(
        self, *, status: EventStatus | None = None, source: str | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Events, newest first (acceptance order), filtered by status and source."""
        sql, params = _newest_first(_EVENT_COLS, "events", limit, status=status, source=source)

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [_stored(r) for r in conn.execute(sql, params)]

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
        return await self._submit(_Op(partial(self._tx_replay, ids, all_dead)))

    def _tx_replay(
        self, ids: list[str], all_dead: bool, conn: sqlite3.Connection, now: float
    ) -> tuple[int, _Delta]:
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
        return n, _Delta(pending=n, bytes=sum(sizes), dead=-n, wake_events=n > 0)

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered over *delivered_older_than* seconds ago.

        Events with a dedupe key received within the dedupe window are kept, so provider
        retries are still recognised. Deletes in chunks, so appends go on meanwhile.
        """
        total = 0
        while True:
            n = await self._submit(_Op(partial(self._tx_prune, delivered_older_than)))
            total += n
            if n < PRUNE_CHUNK:
                break
        if total:
            log.info("store.pruned", count=total)
        return total

    def _tx_prune(self, age: float, conn: sqlite3.Connection, now: float) -> tuple[int, _Delta]:
        ids = [r[0] for r in conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 'delivered' "
            "AND delivered_at < ? AND (dedupe_key IS NULL OR received_at < ?) "
            "ORDER BY seq LIMIT ?) RETURNING id",
            (now - age, now - self._dedupe_window, PRUNE_CHUNK),
        )]
        for chunk in _chunks(ids):
            conn.execute(f"DELETE FROM attempts WHERE event_id IN ({_marks(len(chunk))})", chunk)
        return len(ids), _Delta(delivered=-len(ids))

    async def stats(self) -> StoreStats:
        """Counts from memory (committed writes only)."""
        await anyio.lowlevel.checkpoint()
        c = self._counts
        return StoreStats(pending=c.pending, pending_bytes=c.pending_bytes,
                          delivered=c.delivered, dead=c.dead)

    def statistics(self) -> SQLiteStoreStatistics:
        """A snapshot of the group-commit counters."""
        return SQLiteStoreStatistics(
            batches=self._batches, ops=self._ops, appends=self._appends,
            max_batch=self._max_batch, failed_batches=self._failed_batches,
            external_resyncs=self._external_resyncs,
            queued=self._send.statistics().current_buffer_used,
        )

    async def wait_for_events(self, timeout: float) -> None:  # noqa: ASYNC109 (protocol)
        """Return after an append, replay, settle or due reschedule, or after *timeout*."""
        await self._events_latch.wait(timeout)

    # -- runs --------------------------------------------------------------------------------

    async def wait_for_runs(self, timeout: float) -> None:  # noqa: ASYNC109 (protocol)
        """Return once a ``new`` run may exist, or after *timeout*."""
        await self._runs_latch.wait(timeout)

    async def create_runs(self, runs: Sequence[RunRequest], *, claim: bool = False) -> list[str]:
        """Create ``new`` runs (``active`` with *claim*); a (flow, schedule_key, tick) or run id
        seen before is skipped."""
        items = tuple(runs)
        if not items:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(_Op(partial(self._tx_create_runs, items, claim)))

    def _tx_create_runs(
        self, runs: Sequence[RunRequest], claim: bool, conn: sqlite3.Connection, now: float
    ) -> tuple[list[str], _Delta]:
        created = _insert_runs(conn, runs, now, claim=claim)
        return created, _Delta(wake_runs=bool(created) and not claim)

    async def claim_runs(self, *, limit: int) -> list[RunRecord]:
        """Mark up to *limit* ``new`` runs ``active``, oldest first, and return them."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(_Op(partial(self._tx_claim_runs, limit)))

    def _tx_claim_runs(
        self, limit: int, conn: sqlite3.Connection, now: float
    ) -> tuple[list[RunRecord], _Delta]:
        rows = conn.execute(
            f"UPDATE runs SET status = 'active', started_at = ? WHERE seq IN "
            f"(SELECT seq FROM runs WHERE status = 'new' ORDER BY seq LIMIT ?) "
            f"RETURNING seq, {_RUN_COLS}",
            (now, limit),
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [_run(r[1:]) for r in rows], _NO_CHANGE

    async def record_task(self, record: TaskRunRecord) -> None:
        """Insert or replace one task's record; outputs over 64 KiB become a marker."""
        await self._submit(_Op(partial(self._tx_record_task, record)))

    def _tx_record_task(
        self, r: TaskRunRecord, conn: sqlite3.Connection, now: float
    ) -> tuple[None, _Delta]:
        # An upsert, not INSERT OR REPLACE: the rowid (the order tasks are shown in) is kept.
        conn.execute(
            f"INSERT INTO task_runs ({_TASK_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, task_id) DO UPDATE SET state = excluded.state, "
            "attempts = excluded.attempts, started_at = excluded.started_at, "
            "finished_at = excluded.finished_at, error = excluded.error, "
            "output = excluded.output",
            (r.run_id, r.task_id, r.state, r.attempts, r.started_at, r.finished_at, r.error,
             _capped_json(r.output)),
        )
        return None, _NO_CHANGE

    async def finish_run(
        self,
        run_id: str,
        *,
        status: Literal["done", "error"],
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Settle a new or active run (outputs size-capped); a settled one is left alone."""
        await self._submit(_Op(partial(self._tx_finish_run, run_id, status, error, outputs)))

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[None, _Delta]:
        n = conn.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ?, outputs = ?, "
            "started_at = COALESCE(started_at, ?) WHERE run_id = ? AND status IN ('new', 'active')",
            (status, now, error, _capped_json(outputs), now, run_id),
        ).rowcount
        if not n:
            log.warning("store.finish_run_ignored", run_id=run_id, status=status)
        return None, _NO_CHANGE

    async def recover_runs(self, *, rerun_flows: Sequence[str]) -> list[RunRecord]:
        """Runs left ``active`` by a crash: ``interrupted += 1``, then ``new`` again (flows in
        *rerun_flows*) or ``error`` "interrupted" with their unfinished tasks ``cancelled``."""
        return await self._submit(_Op(partial(self._tx_recover_runs, frozenset(rerun_flows))))

    def _tx_recover_runs(
        self, rerun: frozenset[str], conn: sqlite3.Connection, now: float
    ) -> tuple[list[RunRecord], _Delta]:
        found = conn.execute(
            "SELECT run_id, flow FROM runs WHERE status = 'active' ORDER BY seq"
        ).fetchall()
        out: list[RunRecord] = []
        for run_id, flow in found:
            if flow in rerun:
                conn.execute(
                    "UPDATE runs SET status = 'new', started_at = NULL, "
                    "interrupted = interrupted + 1 WHERE run_id = ?", (run_id,))
            else:
                conn.execute(
                    "UPDATE runs SET status = 'error', error = 'interrupted', finished_at = ?, "
                    "interrupted = interrupted + 1 WHERE run_id = ?", (now, run_id))
                conn.execute(
                    "UPDATE task_runs SET state = 'cancelled', error = 'interrupted', "
                    "finished_at = ? WHERE run_id = ? AND state IN ('pending', 'running')",
                    (now, run_id))
            row = conn.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = ?",
                               (run_id,)).fetchone()
            out.append(_run(row))
        if out:
            log.info("store.runs_recovered", count=len(out),
                     rerun=sum(1 for r in out if r.status == "new"))
        return out, _Delta(wake_runs=any(r.status == "new" for r in out))

    async def get_run(self, run_id: str) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        """One run and its task records (in the order they were first recorded), or None."""

        def read(conn: sqlite3.Connection) -> tuple[RunRecord, list[TaskRunRecord]] | None:
            row = conn.execute(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = ?",
                               (run_id,)).fetchone()
            if row is None:
                return None
            tasks = conn.execute(
                f"SELECT {_TASK_COLS} FROM task_runs WHERE run_id = ? ORDER BY rowid", (run_id,)
            ).fetchall()
            return _run(row), [_task(t) for t in tasks]

        return await self._read(read)

    async def list_runs(
        self, *, flow: str | None = None, status: RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        sql, params = _newest_first(_RUN_COLS, "runs", limit, flow=flow, status=status)

        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            return [_run(r) for r in conn.execute(sql, params)]

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
        return await self._submit(_Op(partial(
            self._tx_open_session, key, thread_id, ttl, max(1, max_active), metadata or {})))

    def _tx_open_session(
        self, key: str, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any], conn: sqlite3.Connection, now: float,
    ) -> tuple[SessionOpen, _Delta]:
        row = conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE key = ? AND status = 'active'", (key,)
        ).fetchone()
        closed: list[SessionRecord] = []
        if row is not None:
            current = _session(row)
            if current.last_activity + ttl > now:
                return SessionOpen(session=current, created=False), _NO_CHANGE
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
            f"RETURNING {_SESSION_COLS}",
            (new_id(), key, thread_id, now, now, b"[]", _json(metadata)),
        ).fetchone()
        return SessionOpen(session=_session(row), created=True, closed=closed), _NO_CHANGE

    async def record_turn(
        self, session_id: str, *, thread_id: str, messages: Sequence[dict[str, Any]] = (),
        context_limit: int = 20, metadata: dict[str, Any] | None = None,
    ) -> SessionRecord | None:
        """Count one exchange of the session and keep its messages in the context."""
        return await self._submit(_Op(partial(
            self._tx_record_turn, session_id, thread_id, tuple(messages), context_limit,
            metadata)))

    def _tx_record_turn(
        self, session_id: str, thread_id: str, messages: Sequence[dict[str, Any]],
        limit: int, metadata: dict[str, Any] | None, conn: sqlite3.Connection, now: float,
    ) -> tuple[SessionRecord | None, _Delta]:
        row = conn.execute("SELECT context, metadata FROM sessions WHERE session_id = ?",
                           (session_id,)).fetchone()
        if row is None:
            return None, _NO_CHANGE
        context = [*(_load(row[0]) or []), *messages]
        context = context[len(context) - limit:] if limit > 0 else []
        merged = {**(_load(row[1]) or {}), **(metadata or {})}
        updated = conn.execute(
            f"UPDATE sessions SET turns = turns + 1, last_activity = MAX(last_activity, ?), "
            f"thread_id = ?, context = ?, metadata = ? WHERE session_id = ? "
            f"RETURNING {_SESSION_COLS}",
            (now, thread_id, _capped_list(context), _json(merged), session_id),
        ).fetchone()
        return _session(updated), _NO_CHANGE

    async def get_session(self, key: str) -> SessionRecord | None:
        """The active session of *key*, else its latest closed one."""

        def read(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM sessions WHERE key = ? "
                f"ORDER BY status = 'active' DESC, seq DESC LIMIT 1", (key,)).fetchone()
            return None if row is None else _session(row)

        return await self._read(read)

    async def list_sessions(
        self, *, status: SessionStatus | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first."""
        sql = f"SELECT {_SESSION_COLS} FROM sessions"
        params: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            params = (status,)
        sql += " ORDER BY last_activity DESC, seq DESC LIMIT ?"

        def read(conn: sqlite3.Connection) -> list[SessionRecord]:
            return [_session(r) for r in conn.execute(sql, (*params, max(0, limit)))]

        return await self._read(read)

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key* (None if it had none)."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[SessionRecord | None, _Delta]:
            closed = _close_sessions(conn, "key = ?", (key,), reason, now)
            return (closed[0] if closed else None), _NO_CHANGE

        return await self._submit(_Op(tx))

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close every active session idle for *ttl* seconds or more."""

        def tx(conn: sqlite3.Connection, now: float) -> tuple[list[SessionRecord], _Delta]:
            return _close_sessions(conn, "last_activity <= ?", (now - ttl,), "expired",
                                   now), _NO_CHANGE

        return await self._submit(_Op(tx))

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

    Raises:
      StoreError: the file cannot be opened, is not a store, or has a newer schema.
    """
    store = await SQLiteStore._open(
        Path(path), must_exist=must_exist, group_commit_max=group_commit_max,
        max_pending=max_pending, max_bytes=max_bytes, dedupe_window=dedupe_window, clock=clock,
    )
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store._serve_writer)
            try:
                yield store
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
                    await store.aclose()
                if scope.cancelled_caught:
                    log.error("store.close_timeout", path=str(store.path))
                    tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The task group wraps what the body raised; give the caller its own exception back.
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from body_error.__cause__
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await store._close_connections()
