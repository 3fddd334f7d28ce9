"""Group commit, shared by the SQL backends: many write calls, one transaction, one fsync.

Every write call becomes an :class:`Op` put on a queue that a dedicated writer thread takes
from. The thread takes everything queued (up to ``group_commit_max``) and hands the batch to
the backend's ``_apply_batch``, which runs it in ONE transaction (a backend runs the batch
without a savepoint per op, and again with one per op only when an op failed, so a failing
op is rolled back alone and its caller gets the error; the others still commit). As soon
as COMMIT returns, the thread hands the batch back to the event loop (a byte on a socket
pair wakes it) and starts the next batch: it never waits for the loop, which is busy
answering requests (waiting for it was 60-75% of the commit cycle when each batch went
through ``to_thread``). On the loop, one task updates the in-memory counts and wakes every
caller with its own result. While a batch commits the next one queues up, so commits per
second stay flat while writes per commit grow with the load.

Lazy ops share a commit instead of starting one: an op with a ``linger`` waits in the writer
for up to that many seconds until a batch with an eager op (an append, most often) commits,
and runs in its transaction after the eager ops, claims last; a lazy op that is not a claim
waits only while eager ops are coming (one came within its linger), else it commits at once.
The forwarder's settles are lazy (``SETTLE_LINGER``), and so is the claim of an idle claimer
(:meth:`_claim_next`): at a few events per commit, each event otherwise paid three commits
(its append, the claim that found it, its settle; ~1.9 per event measured at a steady
1,000/s) where one can carry all three. A lazy claim runs at once when a write that may make
events due committed since the last claim ran (``_claim_behind``, kept by the writer thread,
so no append slips between a claimer's empty claim and its lazy one).

Counts for backpressure and ``stats()`` live in memory; an append reserves its slot before
queueing, so the bound holds for writes in flight too. A backend that learns the true counts
(another process wrote) puts them in ``_resync``; the loop takes them before the batch's own
changes.

Write health (:class:`~mfo_actors.store.WriteHealth`, ``stats().writable``): a committed
batch makes the store writable, a batch that could not be committed makes it not writable;
while not writable, the writer calls the backend's ``_probe`` (a small write) after each
``PROBE_INTERVAL`` without traffic, so readiness recovers without waiting for writes that a
load balancer no longer sends.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from mfo_actors.errors import MFOError
from mfo_actors.observability import get_logger
from mfo_actors.store._protocol import (
    PROBE_INTERVAL,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreStats,
    WriteHealth,
)

__all__ = ["NO_CHANGE", "SETTLE_LINGER", "Counts", "Delta", "GroupCommitStore", "Latch", "Op"]

log = get_logger("mfo_actors.store")

T = TypeVar("T")

CLOSE_TIMEOUT = 30.0  # seconds to drain queued writes at close before giving up on them
# Seconds a delivered settle (``mark_delivered_many``) may wait in the writer for another
# write to share its commit (only while other writes are coming). A lane stays blocked until
# its settle commits, so this is also the most it adds before the lane's next claim.
SETTLE_LINGER = 0.005
_WAITING, _TAKEN, _WITHDRAWN = 0, 1, 2  # a lazy op: queued, in a batch, given up by its caller


@dataclass(slots=True)
class Delta:
    """What one committed op changes in the in-memory counts, and whom it wakes."""

    pending: int = 0
    bytes: int = 0
    delivered: int = 0
    dead: int = 0
    wake_events: bool = False
    wake_runs: bool = False


NO_CHANGE = Delta()
# An op's body: (the backend's transaction handle, now) -> (result, delta).
OpFn = Callable[[Any, float], tuple[T, Delta]]


class Op(Generic[T]):
    """One write call waiting for its transaction.

    ``row``, when set, says the op is a plain insert of that row that cannot conflict with
    any other op (an append without dedupe key or runs): a backend may insert a run of such
    ops with one ``executemany``; ``fn`` must do the same as that insert.

    ``linger``, when set, makes the op lazy (see the module docstring): it rides with the
    next batch that has an eager op, or commits after *linger* seconds. ``claim`` marks an
    event claim (it sees every event committed before it runs; lazy claims run last).
    """

    __slots__ = ("claim", "completed", "delta", "done", "error", "fn", "is_append", "lanes",
                 "linger", "reserved", "result", "row", "state")

    def __init__(self, fn: OpFn[T], *, reserved: int | None = None,
                 lanes: tuple[str, ...] = (), row: tuple[Any, ...] | None = None,
                 linger: float | None = None, claim: bool = False) -> None:
        self.fn = fn
        self.row = row
        self.linger = linger
        self.claim = claim
        self.state = _WAITING  # lazy ops only: guarded by the store's _lazy_lock
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.delta: Delta = NO_CHANGE
        self.completed = False  # the writer ran it (successfully or not)
        self.reserved = reserved  # bytes of a backpressure reservation (appends), until settled
        self.is_append = reserved is not None
        self.lanes = lanes  # the delivery lanes the op writes (Event.lane), known before it runs


class Latch:
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
class Counts:
    pending: int = 0
    pending_bytes: int = 0
    delivered: int = 0
    dead: int = 0


def as_store_error(exc: BaseException, db_errors: tuple[type[BaseException], ...] = ()
                   ) -> BaseException:
    """*exc* as a StoreError for the caller (a database error by its message)."""
    if isinstance(exc, MFOError):
        return exc
    if isinstance(exc, db_errors):
        err = StoreError(f"store write failed: {exc}")
    else:
        err = StoreError(f"store write failed: {exc!r}")
    err.__cause__ = exc
    return err


class GroupCommitStore:
    """The writer task, the op queue, counts and wake-ups; a backend adds ``_apply_batch``
    (run in a worker thread under ``_write_limiter``) and the ops themselves."""

    _DB_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self, counts: Counts, *, group_commit_max: int, max_pending: int,
                 max_bytes: int) -> None:
        self._counts = counts
        self._resync: Counts | None = None
        self._group_commit_max = max(1, group_commit_max)
        self._max_pending = max_pending
        self._max_bytes = max_bytes
        self._reserved = 0
        self._reserved_bytes = 0
        self._closing = False
        self._closed_queue = False  # the end-of-queue marker was put
        self._queue: queue.SimpleQueue[Op[Any] | _Nudge | None] = queue.SimpleQueue()
        self._lazy_lock = threading.Lock()  # lazy ops: the writer takes them, callers withdraw
        self._claim_behind = True  # (writer thread) events may be due that no claim has seen
        self._external_wakes = 0  # (loop) other processes' writes announced: _nudge calls
        self._claims_saw = 0  # (writer thread) _external_wakes when the last claim ran
        self._monotonic = time.monotonic  # the writer's clock for lazy ops (a test may fake it)
        self._done: deque[list[Op[Any]] | None] = deque()  # batches back from the thread
        self._wake_loop, self._wake_thread_side = socket.socketpair()
        self._wake_loop.setblocking(False)
        self._wake_thread_side.setblocking(False)
        self._writer: threading.Thread | None = None
        self._stop_now = False  # the writer thread stops after its current batch
        self._write_limiter = anyio.CapacityLimiter(1)  # backends: no write thread running
        self._writer_done = anyio.Event()
        self._events_latch = Latch()
        self._runs_latch = Latch()
        self._batches = self._ops = self._appends = self._max_batch = 0
        self._failed_batches = self._external_resyncs = 0
        self._health = WriteHealth()

    def _apply_batch(self, batch: list[Op[Any]]) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _probe(self) -> None:
        """In the write thread, while writes fail: try a small write and record the outcome
        in ``self._health``. The default does nothing (health returns with the next batch)."""

    async def _close_connections(self) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    async def _stop_background(self) -> None:
        """Hurry the background tasks to their next checkpoint (they are being cancelled)."""

    @asynccontextmanager
    async def _running(self, *background: Callable[[], Coroutine[Any, Any, None]]
                       ) -> AsyncIterator[None]:
        """Run the writer (and *background* tasks) for the block; then commit what is queued
        (for up to CLOSE_TIMEOUT), stop, and close the connections."""
        body_error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self._serve_writer)
                for task in background:
                    tg.start_soon(task)
                try:
                    yield
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
                        await self.aclose()
                    if scope.cancelled_caught:
                        log.error("store.close_timeout", queued=self._queued())
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await self._stop_background()
        except BaseExceptionGroup as group:
            # The task group wraps what the body raised; give the caller its own exception.
            if body_error is not None and list(group.exceptions) == [body_error]:
                raise body_error from body_error.__cause__
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_writer()
                await self._close_connections()

    def _queued(self) -> int:
        """Writes waiting for the writer thread."""
        return self._queue.qsize()

    async def aclose(self) -> None:
        """Refuse new writes, let the writer commit what is queued, and wait for it."""
        self._closing = True
        if not self._closed_queue:
            self._closed_queue = True
            self._queue.put(None)  # after every write already queued
        await self._writer_done.wait()

    async def stats(self) -> StoreStats:
        """Counts from memory (committed writes only)."""
        await anyio.lowlevel.checkpoint()
        c = self._counts
        return StoreStats(pending=c.pending, pending_bytes=c.pending_bytes,
                          delivered=c.delivered, dead=c.dead, writable=self._health.ok,
                          write_error=self._health.error)

    async def wait_for_events(self, timeout: float) -> None:  # noqa: ASYNC109 (protocol)
        """Return after an append, replay, settle or due reschedule, or after *timeout*."""
        await self._events_latch.wait(timeout)

    async def wait_for_runs(self, timeout: float) -> None:  # noqa: ASYNC109 (protocol)
        """Return once a ``new`` run may exist, or after *timeout*."""
        await self._runs_latch.wait(timeout)

    # -- the writer ----------------------------------------------------------------------------

    async def _serve_writer(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the writer thread, and complete its batches on the loop until it ends."""
        self._writer = threading.Thread(target=self._write_loop, name="mfo-store-writer",
                                        daemon=True)
        self._writer.start()
        try:
            task_status.started()
            while True:
                await anyio.wait_readable(self._wake_loop)
                with suppress(BlockingIOError):
                    while self._wake_loop.recv(4096):
                        pass
                if self._take_done():
                    return
        finally:
            # Cancelled (or crashed): stop the thread after its batch (a transaction always
            # finishes), and tell the callers still queued that theirs were not stored.
            with anyio.CancelScope(shield=True):
                await self._stop_writer()

    def _take_done(self) -> bool:
        """Complete the batches the thread handed back; True once it has ended."""
        done = self._done
        while done:
            batch = done.popleft()
            if batch is None:
                self._writer_done.set()
                return True
            self._complete(batch)
        return False

    async def _stop_writer(self) -> None:
        """Stop the writer thread and fail what it did not run (idempotent)."""
        self._closing = self._stop_now = True
        writer = self._writer
        if writer is not None:
            if not self._closed_queue:
                self._closed_queue = True
                self._queue.put(None)
            await anyio.to_thread.run_sync(writer.join)
            self._writer = None
        self._take_done()
        leftovers: list[Op[Any]] = []
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(op, Op):
                leftovers.append(op)
        self._complete(leftovers)
        self._writer_done.set()
        for sock in (self._wake_loop, self._wake_thread_side):
            sock.close()

    def _write_loop(self) -> None:
        """The writer thread: batches from the queue, each in one transaction."""
        get = self._queue.get
        lazy: list[tuple[float, Op[Any]]] = []  # (commit by, op): lazy ops waiting for company
        last_eager = -math.inf  # when the last eager op came
        try:
            while not self._stop_now:
                timeout = None if self._health.ok else PROBE_INTERVAL
                if lazy:
                    wait = max(0.0, min(by for by, _ in lazy) - self._monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                try:
                    first = get(timeout=timeout)
                except queue.Empty:
                    if lazy and min(by for by, _ in lazy) <= self._monotonic():
                        self._run_batch([], lazy)  # they waited long enough: alone, then
                    else:  # writes fail and none came: probe
                        self._probe()
                    continue
                eager: list[Op[Any]] = []
                end = flush = False
                item: Op[Any] | _Nudge | None = first
                while True:
                    if item is None:
                        end = True
                        break
                    now = self._monotonic()
                    if isinstance(item, _Nudge):
                        flush = True
                    elif item.linger is None:
                        eager.append(item)
                        last_eager = now
                    elif item.state != _WITHDRAWN:
                        wait = self._lazy_wait(item, item.linger, now - last_eager)
                        lazy.append((now + wait, item))
                    if len(eager) + len(lazy) >= self._group_commit_max:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if (eager or flush or end or len(lazy) >= self._group_commit_max
                        or (lazy and min(by for by, _ in lazy) <= self._monotonic())):
                    self._run_batch(eager, lazy)
                if end:
                    return
        finally:
            if lazy:  # stopped: their callers learn they were not committed
                self._hand_back([op for _, op in lazy])
            self._hand_back(None)

    def _lazy_wait(self, op: Op[Any], linger: float, since_eager: float) -> float:
        """How long lazy *op* may wait for company. A claim behind the writes runs now (still
        last, after the settles that ride along, whose lanes it then sees); another lazy op
        waits only while eager ops are coming (none for its whole linger: a forwarder
        draining a backlog, whose settles only the claims follow, gains nothing by waiting)."""
        if op.claim:
            return 0.0 if self._claims_behind() else linger
        return linger if since_eager < linger else 0.0

    def _run_batch(self, eager: list[Op[Any]], lazy: list[tuple[float, Op[Any]]]) -> None:
        """Commit *eager* with every lazy op still wanted (which *lazy* is emptied of): the
        eager ops first, then the lazy ones in queue order, claims last."""
        with self._lazy_lock:
            riders = [op for _, op in lazy if _take(op)]
        lazy.clear()
        batch = eager + [op for op in riders if not op.claim] + [op for op in riders if op.claim]
        if not batch:
            return
        wakes = self._external_wakes
        try:
            self._apply_batch(batch)
        except BaseException as exc:  # a bug in the backend: fail the batch, go on
            self._fail_all(batch, exc)
        self._note_claims(batch, wakes)
        self._hand_back(batch)

    def _claims_behind(self) -> bool:
        """(Writer thread) May events be due that no claim has seen?"""
        return self._claim_behind or self._external_wakes != self._claims_saw

    def _note_claims(self, batch: list[Op[Any]], wakes: int) -> None:
        """In the writer thread, after *batch* (begun when *wakes* nudges had come): whether
        events may be due that no claim has seen since (a committed op that wakes claimers
        after the batch's last claim, or a nudge since the claim began)."""
        for op in batch:
            if op.claim and op.completed and op.error is None:
                self._claim_behind = False
                self._claims_saw = wakes
            elif op.error is not None or op.delta.wake_events or not op.completed:
                self._claim_behind = True

    def _hand_back(self, batch: list[Op[Any]] | None) -> None:
        """In the writer thread: give *batch* (None: the thread ended) to the loop."""
        self._done.append(batch)
        with suppress(BlockingIOError, OSError):  # a full socket buffer: a wake-up is pending
            self._wake_thread_side.send(b"\0")

    def _committed(self, batch: list[Op[Any]]) -> None:
        """In the write thread, once *batch*'s transaction committed."""
        self._health.succeeded()
        self._batches += 1
        self._ops += len(batch)
        self._max_batch = max(self._max_batch, len(batch))
        for op in batch:
            op.completed = True

    def _op_failed(self, op: Op[Any], exc: Exception) -> None:
        op.error = as_store_error(exc, self._DB_ERRORS)

    def _fail_all(self, batch: list[Op[Any]], exc: BaseException) -> None:
        self._failed_batches += 1
        self._health.failed(str(as_store_error(exc, self._DB_ERRORS)))
        log.error("store.batch_failed", ops=len(batch), error=repr(exc))
        for op in batch:
            # One exception object per caller: each raises it in its own task.
            op.error = (type(exc)(str(exc)) if isinstance(exc, StoreError)
                        else as_store_error(exc, self._DB_ERRORS))
            op.delta = NO_CHANGE
            op.completed = True

    def _complete(self, batch: list[Op[Any]]) -> None:
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

    def _reserve(self, size: int) -> None:
        """Hold a slot for an append of *size* bytes, or raise StoreFullError at the bound."""
        if self._closing:
            raise StoreClosedError("the store is closing")
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

    def _release(self, op: Op[Any]) -> None:
        if op.reserved is not None:
            self._reserved -= 1
            self._reserved_bytes -= op.reserved
            op.reserved = None

    def _nudge(self) -> None:
        """(On the loop) Another process made events due: have the writer commit its lazy
        ops now, and the next lazy claim run at once."""
        self._external_wakes += 1
        self._queue.put(_NUDGE)

    async def _claim_next(self, op: Op[T], within: float,
                          give_back: Callable[[T], Coroutine[Any, Any, None]]) -> T:
        """Run the claim *op* lazily (see the module docstring), at the latest after
        *within* seconds. Cancelled while it waits, it is withdrawn; if the writer had
        already taken it, what it claimed is handed to *give_back* (nobody will send it)."""
        op.linger = max(0.0, within)
        if self._closing:
            raise StoreClosedError("the store is closing")
        self._queue.put(op)
        try:
            await op.done.wait()
        except BaseException:
            with self._lazy_lock:
                taken = op.state == _TAKEN
                if not taken:
                    op.state = _WITHDRAWN
            if taken:
                with anyio.CancelScope(shield=True):
                    await op.done.wait()
                    if op.error is None and op.result:
                        await give_back(op.result)  # type: ignore[arg-type]
            raise
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]  # set when error is None

    async def _submit(self, op: Op[T]) -> T:
        try:
            if self._closing:
                raise StoreClosedError("the store is closing")
            self._queue.put(op)
            await op.done.wait()
        finally:
            self._release(op)  # no-op once the writer settled it
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]  # set when error is None


def _take(op: Op[Any]) -> bool:
    """Under ``_lazy_lock``: take lazy *op* into a batch, unless its caller withdrew it."""
    if op.state != _WAITING:
        return False
    op.state = _TAKEN
    return True


class _Nudge:
    """Put on the writer's queue: commit the lazy ops now."""


_NUDGE = _Nudge()
