"""Table logic both SQL backends share, and the statements they can say alike.

The backends differ in their dialect (placeholders, locking, ``ON CONFLICT``), not in what
they do with the rows: these helpers are that common part. A statement written here uses
``?`` placeholders; :class:`Dialect` turns it into a backend's (:data:`SQLITE`,
:data:`POSTGRES`), the one place that difference is said. The reads that are the same on
both backends are written once too (:class:`SharedEvents`, :class:`SharedAttempts`,
:class:`SharedRuns`, :class:`SharedSessions`): each backend's table class takes its table's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, TypeVar

import anyio
import anyio.lowlevel

from mfo_actors.messages import RunStatus
from mfo_actors.observability import get_logger
from mfo_actors.store._codec import (
    ATTEMPT_COLS,
    EVENT_COLS,
    RUN_COLS,
    SESSION_COLS,
    TASK_COLS,
    attempt_record,
    capped_list,
    json_bytes,
    load_json,
    newest_first,
    run_record,
    session_record,
    stored_event,
    task_record,
)
from mfo_actors.store._engine import Delta, GroupCommitStore, Op
from mfo_actors.store._protocol import (
    Delivered,
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

__all__ = [
    "CLAIM_ROUNDS",
    "COUNT_SESSIONS",
    "ORPHANED_RUNS",
    "POSTGRES",
    "PRUNE_CHUNK",
    "PRUNE_EVENTS",
    "PRUNE_SESSIONS",
    "RENEW_RUNS",
    "SQLITE",
    "Dialect",
    "LaneHead",
    "RunLeases",
    "SharedAttempts",
    "SharedEvents",
    "SharedRuns",
    "SharedSessions",
    "SharedTables",
    "claim_lanes",
    "in_seq_order",
    "prune_in_chunks",
    "stale_settle",
    "turn_update",
]

log = get_logger("mfo_actors.store")

R = TypeVar("R")

PRUNE_CHUNK = 5_000  # rows deleted per transaction, so appends interleave with a big prune
# Ordered claims look at ready lanes in rounds of at most the lanes still wanted; a lane found
# blocked (its head in flight or backing off) is pushed to its next look, so the next round
# sees others. A few rounds fill the claim in practice; the cap bounds one transaction.
CLAIM_ROUNDS = 4

# (seq, status, next_attempt_at, lease_until) of a lane's oldest unsettled events.
LaneHead = tuple[int, str, float, float | None]


def _claimable(status: str, due: float, lease_until: float | None, now: float) -> bool:
    """A pending event that is due, or a claim whose lease ran out."""
    if status == "pending":
        return due <= now
    return lease_until is not None and lease_until <= now


def claim_lanes(
    ready: Callable[[int], Sequence[tuple[str, int]]],
    heads: Callable[[Sequence[tuple[str, int]]], Mapping[str, list[LaneHead]]],
    update: Callable[[list[str], list[int | None], list[float]], None],
    *, limit: int, lease: float, now: float,
) -> list[int]:
    """The seqs an ordered claim takes: the algorithm both backends run over ``lanes``.

    Each round takes up to the lanes still wanted that are ready (``ready(n)``: ``(lane,
    cursor)`` rows by ``ready_at``, locked where the backend locks), reads each one's oldest
    unsettled events above its cursor (``heads``, at most the run length, in seq order) and
    claims its head with the claimable events right behind it. Then ``update`` moves each
    lane's cursor to just below its head (None: unchanged) and sets when to look again: the
    claim's lease (in flight), the head's due time or lease end (blocked), or never (empty,
    until an append, settle or replay touches it). *limit* counts lanes that got events.

    Why a lane table and not a scan of the outbox: a claim then costs the lanes it looks at,
    whatever the backlog, the number of idle keys, or the delivered rows behind a cursor.
    """
    seqs: list[int] = []
    taken = 0
    for _ in range(CLAIM_ROUNDS):
        want = limit - taken
        rows = ready(want)
        if not rows:
            break
        found = heads(rows)
        names: list[str] = []
        cursors: list[int | None] = []
        next_look: list[float] = []
        for lane, _cursor in rows:
            names.append(lane)
            events = sorted(found.get(lane, ()))
            if not events:  # nothing unsettled: look again when something touches the lane
                cursors.append(None)
                next_look.append(math.inf)
                continue
            cursors.append(events[0][0] - 1)
            run = 0
            for seq, status, due, lease_until in events:
                if not _claimable(status, due, lease_until, now):
                    break
                seqs.append(seq)
                run += 1
            _, status, due, lease_until = events[0]
            if run:
                taken += 1
                next_look.append(now + lease)
            elif status == "claimed":
                next_look.append(lease_until if lease_until is not None else now + lease)
            else:
                next_look.append(due)
        update(names, cursors, next_look)
        if len(rows) < want or taken >= limit:
            break
    return seqs


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the statements written here leave to a backend: its driver's placeholder, and
    the column that keeps ``task_runs`` in the order tasks were first recorded (SQLite's
    table has no ``seq``; its ``rowid`` serves)."""

    mark: str
    task_order: str

    def sql(self, statement: str) -> str:
        """*statement*, written with ``?`` placeholders (and ``{task_order}``), with this
        backend's."""
        return statement.replace("?", self.mark).replace("{task_order}", self.task_order)


SQLITE = Dialect(mark="?", task_order="rowid")
POSTGRES = Dialect(mark="%s", task_order="seq")

# The reads of the Shared* classes below.
_GET_EVENT = f"SELECT {EVENT_COLS} FROM events WHERE id = ?"
_LIST_ATTEMPTS = f"SELECT {ATTEMPT_COLS} FROM attempts WHERE event_id = ? ORDER BY n"
_GET_RUN = f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?"
_RUN_TASKS = f"SELECT {TASK_COLS} FROM task_runs WHERE run_id = ? ORDER BY {{task_order}}"
_LAST_TICK = "SELECT MAX(tick) FROM runs WHERE flow = ? AND schedule_key = ?"
# The active session of a key, else its latest closed one.
_GET_SESSION = (f"SELECT {SESSION_COLS} FROM sessions WHERE key = ? "
                f"ORDER BY status = 'active' DESC, seq DESC LIMIT 1")
COUNT_SESSIONS = "SELECT COUNT(*) FROM sessions WHERE status = 'active'"
# Close the active sessions matching {where} (params: closed_at, close_reason, then where's).
_CLOSE_SESSIONS = ("UPDATE sessions SET status = 'closed', closed_at = ?, close_reason = ? "
                   f"WHERE status = 'active' AND {{where}} RETURNING seq, {SESSION_COLS}")

# One chunk of delivered events past retention (params: delivered cutoff, dedupe horizon,
# chunk): an event with a dedupe key stays while a provider retry may still come. RETURNING
# id: their attempt histories go with them.
PRUNE_EVENTS = (
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE status = 'delivered' "
    "AND delivered_at < ? AND (dedupe_key IS NULL OR received_at < ?) "
    "ORDER BY seq LIMIT ?) RETURNING id"
)

# One chunk of closed sessions closed before a cutoff (params: cutoff, cutoff, chunk;
# RETURNING, as a pipelined psycopg cursor has no rowcount). A session closes after its last
# activity, so ``last_activity < cutoff`` holds for each of them and lets the
# (status, last_activity) index find them.
PRUNE_SESSIONS = (
    "DELETE FROM sessions WHERE seq IN (SELECT seq FROM sessions WHERE status = 'closed' "
    "AND last_activity < ? AND closed_at < ? LIMIT ?) RETURNING seq"
)


# This node's active runs, their lease moved on (params: lease_until, node).
RENEW_RUNS = "UPDATE runs SET lease_until = ? WHERE status = 'active' AND node = ?"
# Other nodes' active runs whose lease ran out (params: node, now). A run without a lease was
# claimed before leases were kept (SQLite before schema 5): nobody renews it, so it is out.
ORPHANED_RUNS = ("status = 'active' AND node IS NOT NULL AND node <> ? "
                 "AND COALESCE(lease_until, 0) < ?")


class RunLeases(GroupCommitStore):
    """This node's hold on its active runs, as both backends keep it.

    A claimed run carries a lease (``lease_until``, wall-clock, the claim's time plus
    ``node_lease``) that a background task renews every third of ``node_lease``
    (:meth:`_renew_runs`); another node reruns (or fails) an active run whose lease ran out
    (``recover_runs(orphaned=True)``). So a node that cannot renew, because the database is
    away, must stop working on its runs before their lease runs out, or they run twice at
    once: :meth:`runs_held_until` tells the scheduler until when a run is surely still its
    own, counted from when the claim or the last renewal that succeeded was *sent* (each sets
    ``lease_until`` to its transaction's time plus the lease, later than that).
    """

    _node: str
    _node_lease: float  # seconds a node's active runs stay its own without renewal
    _renewed_at: float = -1e18  # monotonic: when the last renewal that succeeded was sent

    def runs_held_until(self, claimed_at: float) -> float:
        """Monotonic time until which a run claimed (sent) at monotonic *claimed_at* is
        surely this node's, if its lease is not renewed again."""
        return max(claimed_at, self._renewed_at) + self._node_lease

    def _tx_renew_runs(self, tx: Any, now: float) -> tuple[None, Delta]:  # pragma: no cover
        raise NotImplementedError

    async def _renew_runs(self) -> None:
        """Renew the lease of this node's active runs (raises StoreError if it cannot)."""
        sent = time.monotonic()
        await self._submit(Op(self._tx_renew_runs))
        self._renewed_at = max(self._renewed_at, sent)

    async def _serve_run_leases(self) -> None:
        """Renew every third of the lease; failures (the store away) are logged and tried
        again at the next round, and the scheduler stops runs whose hold ran out."""
        while True:
            await anyio.sleep(self._node_lease / 3)
            try:
                await self._renew_runs()
            except StoreClosedError:
                return
            except StoreError as exc:
                log.warning("store.lease_renewal_failed", node=self._node, error=str(exc))


def in_seq_order(rows: Sequence[Sequence[Any]], decode: Callable[[Sequence[Any]], R]) -> list[R]:
    """Rows of ``... RETURNING seq, <cols>`` decoded in seq order (RETURNING has no order)."""
    return [decode(row[1:]) for row in sorted(rows, key=lambda row: row[0])]


def turn_update(context: bytes | None, metadata: bytes | None,
                messages: Sequence[dict[str, Any]], limit: int,
                more: dict[str, Any] | None) -> tuple[bytes, bytes]:
    """A session's stored context and metadata after one turn: *messages* appended, the
    context cut to its last *limit* messages (and to the size cap), *more* merged in."""
    turns = [*(load_json(context) or []), *messages]
    turns = turns[len(turns) - limit:] if limit > 0 else []
    merged = {**(load_json(metadata) or {}), **(more or {})}
    return capped_list(turns), json_bytes(merged)


def stale_settle(event_id: str, outcome: str) -> None:
    """Log a settle whose claim token no longer holds (the lease ran out, another claim won).

    *outcome* is the attempt's outcome (``delivered``, ``retry``, ``dead``); the log names the
    store call that came too late."""
    action = {"retry": "reschedule", "dead": "dead_letter"}.get(outcome, outcome)
    log.warning("store.stale_settle", event_id=event_id, action=action)


async def prune_in_chunks(chunk: Callable[[], Awaitable[int]], *, what: str = "events"
                          ) -> int:
    """Run *chunk* (one transaction deleting at most PRUNE_CHUNK rows) until a short one;
    return how many rows went. Appends are committed between the chunks."""
    total = 0
    while True:
        n = await chunk()
        total += n
        if n < PRUNE_CHUNK:
            break
    if total:
        log.info("store.pruned", table=what, count=total)
    return total


class SharedTables(RunLeases):
    """What the table classes of both backends have: the backend's :class:`Dialect` and its
    ``_read`` (``fn(connection)`` in a worker thread). The Shared* classes below are written
    against it; ``PostgresTables`` and ``SQLiteTables`` set it."""

    _dialect: ClassVar[Dialect]

    async def _read(self, fn: Callable[[Any], R]) -> R:  # pragma: no cover (abstract)
        raise NotImplementedError

    async def _read_one(self, statement: str, params: tuple[Any, ...],
                        decode: Callable[[Any], R]) -> R | None:
        """The first row of *statement* (written with ``?``) decoded, or None."""
        sql = self._dialect.sql(statement)

        def read(conn: Any) -> R | None:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else decode(row)

        return await self._read(read)


# Why events a withdrawn claim took are due again (their last_error until they are sent).
UNCLAIMED = "not sent: its claimer stopped while the claim was committing"


class SharedEvents(SharedTables):
    """The ``events`` reads, alike on both backends, the two ways to claim (each backend
    builds the claim op), and the one-event settle that is a backend's
    ``mark_delivered_many`` of one."""

    _clock: Callable[[], float]  # wall-clock time (the backend's)

    async def mark_delivered_many(self, deliveries: Sequence[Delivered]) -> None:
        raise NotImplementedError  # pragma: no cover (each backend's own)

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        raise NotImplementedError  # pragma: no cover (each backend's own)

    def _claim_op(self, limit: int, lease: float, ordered: bool, per_source: int
                  ) -> Op[list[StoredEvent]]:  # pragma: no cover (each backend's own)
        raise NotImplementedError

    async def claim_due(
        self, *, limit: int, lease: float, ordered_by_source: bool = True, per_source: int = 1,
        within: float | None = None,
    ) -> list[StoredEvent]:
        """Claim up to *limit* due events (see the protocol), each call with a new token."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        op = self._claim_op(limit, lease, ordered_by_source, max(1, per_source))
        if within is None:
            return await self._submit(op)
        return await self._claim_next(op, within, self._give_back)

    async def release(self, claimed: Sequence[StoredEvent], *, reason: str) -> None:
        """Give claimed events back unsent, due now (see the protocol)."""
        now = self._clock()
        errors: list[StoreError] = []

        async def release_one(stored: StoredEvent) -> None:
            try:
                await self.reschedule(stored.event.id, stored.claim_token or "",
                                      next_attempt_at=now, error=reason, count_attempt=False)
            except StoreError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for stored in claimed:
                tg.start_soon(release_one, stored)
        if errors:
            raise errors[0]

    async def _give_back(self, claimed: list[StoredEvent]) -> None:
        """Make events a withdrawn claim took due again at once (none was sent)."""
        with contextlib.suppress(StoreError):  # else their lease makes them due again
            await self.release(claimed, reason=UNCLAIMED)

    async def mark_delivered(
        self, event_id: str, claim_token: str, *, sent_at: float | None = None,
        latency: float | None = None, status: int | None = None,
    ) -> None:
        """Settle a claimed event as delivered (ignored, and logged, for a stale token)."""
        await self.mark_delivered_many([Delivered(
            event_id=event_id, claim_token=claim_token, sent_at=sent_at, latency=latency,
            status=status)])

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its state, or None."""
        return await self._read_one(_GET_EVENT, (event_id,), stored_event)

    async def list_events(
        self, *, status: EventStatus | None = None, source: str | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Events, newest first (acceptance order), filtered by status and source."""
        sql, params = newest_first(EVENT_COLS, "events", limit, self._dialect.mark,
                                   status=status, source=source)

        def read(conn: Any) -> list[StoredEvent]:
            return [stored_event(r) for r in conn.execute(sql, params)]

        return await self._read(read)


class SharedAttempts(SharedTables):
    """The ``attempts`` reads, alike on both backends."""

    async def list_attempts(self, event_id: str) -> list[DeliveryAttempt]:
        """The event's attempts, oldest first."""
        sql = self._dialect.sql(_LIST_ATTEMPTS)

        def read(conn: Any) -> list[DeliveryAttempt]:
            return [attempt_record(r) for r in conn.execute(sql, (event_id,))]

        return await self._read(read)


class SharedRuns(SharedTables):
    """The ``runs`` and ``task_runs`` reads alike on both backends, and the calls that submit
    the backend's writes (its ``_tx_*`` ops)."""

    async def create_runs(self, runs: Sequence[RunRequest], *, claim: bool = False) -> list[str]:
        """Create ``new`` runs (``active`` with *claim*); a (flow, schedule_key, tick) or run
        id seen before (on Postgres, by any node) is skipped."""
        items = tuple(runs)
        if not items:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_create_runs, items, claim)))

    def _tx_create_runs(self, runs: Sequence[RunRequest], claim: bool, tx: Any, now: float
                        ) -> tuple[list[str], Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

    async def claim_runs(self, *, limit: int) -> list[RunRecord]:
        """Mark up to *limit* ``new`` runs ``active`` for this node, oldest first, and return
        them."""
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        return await self._submit(Op(partial(self._tx_claim_runs, limit)))

    def _tx_claim_runs(self, limit: int, tx: Any, now: float
                       ) -> tuple[list[RunRecord], Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

    async def record_task(self, record: TaskRunRecord) -> None:
        """Insert or replace one task's record; outputs over 64 KiB become a marker."""
        await self._submit(Op(partial(self._tx_record_task, record)))

    def _tx_record_task(self, r: TaskRunRecord, tx: Any, now: float
                        ) -> tuple[None, Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

    async def finish_run(
        self,
        run_id: str,
        *,
        status: Literal["done", "error"],
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Settle a new run, or an active one of this node (outputs size-capped); a settled
        one, or one another node took over, is left alone."""
        await self._submit(Op(partial(self._tx_finish_run, run_id, status, error, outputs)))

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        tx: Any, now: float,
    ) -> tuple[None, Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

    async def get_run(self, run_id: str) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        """One run and its task records (in the order they were first recorded), or None."""
        run_sql, tasks_sql = self._dialect.sql(_GET_RUN), self._dialect.sql(_RUN_TASKS)

        def read(conn: Any) -> tuple[RunRecord, list[TaskRunRecord]] | None:
            row = conn.execute(run_sql, (run_id,)).fetchone()
            if row is None:
                return None
            tasks = conn.execute(tasks_sql, (run_id,)).fetchall()
            return run_record(row), [task_record(t) for t in tasks]

        return await self._read(read)

    async def list_runs(
        self, *, flow: str | None = None, status: RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        sql, params = newest_first(RUN_COLS, "runs", limit, self._dialect.mark, flow=flow,
                                   status=status)

        def read(conn: Any) -> list[RunRecord]:
            return [run_record(r) for r in conn.execute(sql, params)]

        return await self._read(read)

    async def last_tick(self, flow: str, schedule_key: str) -> float | None:
        """The latest tick recorded for (flow, schedule_key), by any node, or None."""
        tick = await self._read_one(_LAST_TICK, (flow, schedule_key), lambda row: row[0])
        return None if tick is None else float(tick)


class SharedSessions(SharedTables):
    """The ``sessions`` reads and closing sessions alike on both backends, and the calls
    that submit the backend's writes (its ``_tx_*`` ops)."""

    async def open_session(
        self, key: str, *, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any] | None = None,
    ) -> SessionOpen:
        """The active session of *key* (closed first if idle past *ttl*), or a new one. On
        Postgres, two nodes opening a new key at once get one session: the unique active key
        decides."""
        return await self._submit(Op(partial(
            self._tx_open_session, key, thread_id, ttl, max(1, max_active), metadata or {})))

    def _tx_open_session(
        self, key: str, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any], tx: Any, now: float,
    ) -> tuple[SessionOpen, Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

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
        limit: int, metadata: dict[str, Any] | None, tx: Any, now: float,
    ) -> tuple[SessionRecord | None, Delta]:  # pragma: no cover (the backend's)
        raise NotImplementedError

    def _close_sessions(self, conn: Any, where: str, params: tuple[Any, ...], reason: str,
                        now: float) -> list[SessionRecord]:
        """Close the active sessions matching *where* (a condition in the backend's
        placeholders); returns them as closed, oldest first."""
        rows = conn.execute(self._dialect.sql(_CLOSE_SESSIONS).format(where=where),
                            (now, reason, *params)).fetchall()
        return in_seq_order(rows, session_record)

    async def get_session(self, key: str) -> SessionRecord | None:
        """The active session of *key*, else its latest closed one."""
        return await self._read_one(_GET_SESSION, (key,), session_record)

    async def list_sessions(
        self, *, status: SessionStatus | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first."""
        sql, params = newest_first(SESSION_COLS, "sessions", limit, self._dialect.mark,
                                   order="last_activity DESC, seq DESC", status=status)

        def read(conn: Any) -> list[SessionRecord]:
            return [session_record(r) for r in conn.execute(sql, params)]

        return await self._read(read)

    async def count_sessions(self) -> int:
        """Active sessions (on Postgres, cluster-wide)."""

        def read(conn: Any) -> int:
            row = conn.execute(COUNT_SESSIONS).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(read)
