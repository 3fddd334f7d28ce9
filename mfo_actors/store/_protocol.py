"""The store protocol: what the listener, forwarder, scheduler and CLI need from durable state.

Two backends implement it: SQLite in ``state_dir`` (the default, one daemon) and PostgreSQL,
which several daemons (nodes) share for scale-out. Everything here is async and safe to call
from many tasks at once; a backend that blocks does so off the event loop (worker threads).
Every write that returns has been made durable (SQLite: committed with ``synchronous=FULL``;
Postgres: committed with ``synchronous_commit=on``).

Claims and active runs are owned by the node (``store/_node.py``) that took them: start-up
recovery takes back only its own; another node's come back when their lease expires.

Event lifecycle::

    append --> pending --claim_due--> claimed --mark_delivered--> delivered
                  ^                     |  \\--dead_letter--> dead --replay--> pending
                  +----reschedule-------+
                  +----lease expiry / recover_claims (crash)

Every send of an event is one attempt, kept in its history (:meth:`EventStore.list_attempts`):
when it started, how it ended (delivered, retry, dead), the HTTP status or the error, and
how long the answer took. Attempts are numbered from 1 for the life of the event: a replay
goes on counting (the retry budget starts again from :attr:`StoredEvent.attempt_base`).

Run lifecycle (seed 001): new --claim_runs--> active --finish_run--> done | error.
A run found active at start-up was interrupted by a crash (``recover_runs``).

Chat session lifecycle: open_session --> active (record_turn: turns + 1, last_activity now)
--> closed (``expired`` after the TTL idle, ``evicted`` past max_active, ``closed`` by hand).
At most one session of a key is active: ``open_session`` decides in one transaction, so two
runs opening the same new key at once get the same session, and so the same thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

from mfo_actors.errors import MFOError
from mfo_actors.messages import Event, RunStatus, TriggerKind

__all__ = [
    "AppendResult",
    "AttemptOutcome",
    "Delivered",
    "DeliveryAttempt",
    "EventStatus",
    "EventStore",
    "RunRecord",
    "RunRequest",
    "SessionOpen",
    "SessionRecord",
    "SessionStatus",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "StoredEvent",
    "TaskRunRecord",
    "TaskState",
    "WriteHealth",
]

EventStatus = Literal["pending", "claimed", "delivered", "dead"]
TaskState = Literal["pending", "running", "done", "error", "skipped", "cancelled"]
SessionStatus = Literal["active", "closed"]
AttemptOutcome = Literal["delivered", "retry", "dead"]


class StoreError(MFOError):
    """The store could not do what was asked (disk full, corrupt file, lost connection)."""


class StoreFullError(StoreError):
    """``store.max_pending`` or ``store.max_bytes`` is reached: the listener answers 503."""


class StoreClosedError(StoreError):
    """The store is shutting down and accepts no more writes."""


class RunRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A run to create (with status ``new``) in the same transaction as an event or tick."""

    run_id: str
    flow: str
    trigger: TriggerKind
    event_id: str | None = None
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    # For cron/interval: (flow, schedule_key, tick) is unique, so a tick never fires twice.
    schedule_key: str | None = None
    tick: float | None = None


class AppendResult(msgspec.Struct, frozen=True):
    """``id`` of the stored event; when ``duplicate``, the id of the first delivery."""

    id: str
    duplicate: bool = False


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event with its delivery state."""

    event: Event
    status: EventStatus
    attempts: int = 0  # sends so far, over the event's whole life (replays included)
    next_attempt_at: float = 0.0
    last_error: str | None = None  # the latest failure; None once delivered
    delivered_at: float | None = None
    claim_token: str | None = None  # set on claimed events; settle calls must pass it back
    attempt_base: int = 0  # attempts made before the last replay: the retry budget's zero


class Delivered(msgspec.Struct, frozen=True, kw_only=True):
    """One claimed event the upstream took (2xx), to settle with
    :meth:`EventStore.mark_delivered_many`; the send's figures go to its attempt history."""

    event_id: str
    claim_token: str
    sent_at: float | None = None  # wall clock, when the request started (None: now - latency)
    latency: float | None = None  # seconds to the answer
    status: int | None = None  # the answer's HTTP status, when known


class DeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One send of an event to the upstream, as ``events show`` lists it."""

    number: int  # 1, 2, ... over the event's life (a replay goes on counting)
    at: float  # wall-clock time the send started
    outcome: AttemptOutcome
    status: int | None = None  # the HTTP status; None when no answer came (or a 2xx)
    error: str | None = None  # what went wrong (None when delivered)
    latency: float | None = None  # seconds from send to answer (or to giving up)


class StoreStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts for backpressure, /readyz and ``mfo_outbox_depth``, and whether writes work."""

    pending: int  # pending + claimed
    pending_bytes: int
    delivered: int
    dead: int
    # The outcome of the last write transaction (or of the probe write a backend runs while
    # its writes fail): /readyz is not ready while it failed. See :class:`WriteHealth`.
    writable: bool = True
    write_error: str | None = None


class WriteHealth:
    """Whether a backend's writes work, by the outcome of the last one: what ``/readyz``
    reports (``StoreStats.writable``), the same way for every backend.

    A backend calls :meth:`succeeded` after each committed write transaction and
    :meth:`failed` after one that could not be committed (disk full, file gone, database
    unreachable), not after an op that failed on its own (a constraint). While failed, it
    should retry a small write on its own every few seconds (:data:`PROBE_INTERVAL`), so
    readiness comes back without waiting for traffic a load balancer no longer sends.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def succeeded(self) -> None:
        self.error = None

    def failed(self, error: str) -> None:
        self.error = error


PROBE_INTERVAL = 5.0  # seconds between probe writes while writes fail (readiness probes: ~10 s)


class TaskRunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One task of one run."""

    run_id: str
    task_id: str
    state: TaskState
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    output: dict[str, Any] | None = None  # size-capped by the writer


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One run of a flow."""

    run_id: str
    flow: str
    status: RunStatus
    trigger: TriggerKind
    event_id: str | None = None
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    outputs: dict[str, Any] | None = None
    interrupted: int = 0  # how many times a crash interrupted this run
    schedule_key: str | None = None  # cron/interval runs: which trigger fired ...
    tick: float | None = None  # ... and for which tick


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One chat session: which MFO thread a key talks in, and how much it has said."""

    session_id: str
    key: str
    thread_id: str
    status: SessionStatus
    turns: int = 0  # messages answered in this session
    created_at: float
    last_activity: float
    closed_at: float | None = None
    close_reason: str | None = None  # expired | evicted | closed
    context: list[dict[str, Any]] = msgspec.field(default_factory=list)  # recent messages
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class SessionOpen(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`EventStore.open_session` did."""

    session: SessionRecord
    created: bool  # True: a new session (a new thread); False: an active one continued
    closed: list[SessionRecord] = msgspec.field(default_factory=list)  # closed to make way


@runtime_checkable
class EventStore(Protocol):
    """Durable events and run history. Open with ``async with open_store(cfg) as store``."""

    # -- events -------------------------------------------------------------------------
    async def append(self, event: Event, *, runs: Sequence[RunRequest] = ()) -> AppendResult:
        """Store *event* durably (and *runs* in the same transaction); return once on disk.

        When ``event.dedupe_key`` matches an event of the same source stored within the
        dedupe window, nothing is stored and the first event's id is returned as duplicate.

        Raises:
          StoreFullError: the configured bound is reached.
          StoreClosedError: the store is closing.
        """
        ...

    async def claim_due(
        self, *, limit: int, lease: float, ordered_by_source: bool = True, per_source: int = 1,
        within: float | None = None,
    ) -> list[StoredEvent]:
        """Claim up to *limit* pending events whose next attempt is due, oldest first.

        A claim expires after *lease* seconds and the event becomes due again. With
        *ordered_by_source*, an event is claimable only when no older event of its **lane**
        (``Event.lane``: its ordering key, else its source) is pending or claimed (one event
        per lane in flight at a time, in acceptance order), and *limit* counts lanes: for
        each, up to *per_source* consecutive due events are claimed together, oldest first,
        for one caller to send in that order. (The names predate ordering keys: a lane is a
        source when events carry no key.) An ordered claim costs the lanes it looks at, not
        the backlog, the delivered rows or the number of idle lanes.

        *within* (seconds; None: claim now): for a claimer whose last claim left nothing
        due, claim in the transaction of the store's next write instead of one of its own
        (after that write, so a new event is claimed in the commit that stores it); at once
        if a write that may make events due committed since the last claim; at the latest
        after *within*. Waiting for new events and claiming them then costs no commit of its
        own. Cancelled while it waits, it claims nothing (events it took while being
        cancelled are made due again).
        """
        ...

    async def mark_delivered(
        self, event_id: str, claim_token: str, *, sent_at: float | None = None,
        latency: float | None = None, status: int | None = None,
    ) -> None:
        """Settle a claimed event as delivered (clearing ``last_error``); records the attempt.

        *sent_at* (wall clock, default: now less *latency*), *latency* (seconds) and *status*
        (the answer's) describe the send, for the attempt history. A stale *claim_token*
        (the lease ran out and the event was claimed again) is ignored, and logged.
        """
        ...

    async def mark_delivered_many(self, deliveries: Sequence[Delivered]) -> None:
        """Settle several claimed events as delivered in one write, each exactly as
        :meth:`mark_delivered` would (the forwarder's hot path: one store op per claimed
        run instead of one per event).

        While other writes are coming, the write may wait up to ``SETTLE_LINGER`` (5 ms) for
        one (an append, a claim) to share its commit: settles are most of a busy store's
        writes, and one lost in a crash only means a resend under the same
        ``Idempotency-Key``.
        """
        ...

    async def reschedule(
        self, event_id: str, claim_token: str, *, next_attempt_at: float, error: str,
        count_attempt: bool = True, sent_at: float | None = None, status: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Settle a claimed event as pending again, due at *next_attempt_at*.

        Counts (and records) an attempt unless *count_attempt* is False (nothing was sent:
        the breaker was open), so a long outage never uses up an event's attempts.
        """
        ...

    async def release(self, claimed: Sequence[StoredEvent], *, reason: str) -> None:
        """Give claimed events back unsent: pending, due now, no attempt counted, *reason*
        as their ``last_error``; all queued at once, so they commit together. Raises the
        first StoreError after trying them all (the others' leases make them due again)."""
        ...

    async def dead_letter(
        self, event_id: str, claim_token: str, *, reason: str, sent_at: float | None = None,
        status: int | None = None, latency: float | None = None,
    ) -> None:
        """Settle a claimed event as dead, with the reason (status and error body); records
        the attempt."""
        ...

    async def list_attempts(self, event_id: str) -> list[DeliveryAttempt]:
        """The event's attempts, oldest first ([] for an unknown id)."""
        ...

    async def oldest_pending_at(self) -> float | None:
        """``received_at`` of the oldest pending or claimed event, or None (summary lines)."""
        ...

    async def recover_claims(self) -> int:
        """Make this node's claimed events due again (called once at start-up); return how
        many. Other nodes' claims are left to their leases."""
        ...

    async def get_event(self, event_id: str) -> StoredEvent | None:
        """One event with its state, or None."""
        ...

    async def list_events(
        self, *, status: EventStatus | None = None, source: str | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Events, newest first, filtered by status and source."""
        ...

    async def replay(self, event_ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Move dead events back to pending, due now, with a fresh retry budget (attempts go
        on counting: ``attempt_base = attempts``); return how many moved."""
        ...

    async def stats(self) -> StoreStats:
        """Current counts (cheap: kept up to date in memory where the backend can)."""
        ...

    async def wait_for_events(self, timeout: float) -> None:  # noqa: ASYNC109 (a wake-up, not a limit)
        """Return when an event may be due (an append or replay happened), or after *timeout*.

        A signal that arrives while nobody waits is kept for the next call, so a
        claim-then-wait loop never misses an append made between its two calls.
        """
        ...

    async def prune(self, *, delivered_older_than: float) -> int:
        """Delete delivered events delivered more than *delivered_older_than* seconds ago.

        Events received within the dedupe window are kept whatever their age, so a provider
        retry is still recognised. Pending, claimed and dead events are never pruned. The
        daemon calls this periodically (e.g. hourly); returns how many were deleted. Their
        attempt histories go with them.
        """
        ...

    # -- runs -----------------------------------------------------------------------------
    async def create_runs(self, runs: Sequence[RunRequest], *, claim: bool = False) -> list[str]:
        """Create runs with status ``new``; a (flow, schedule_key, tick) seen before is skipped.

        With *claim*, they are created ``active`` (started now) instead: for a caller that
        runs them itself (``flows run`` in the foreground), so no scheduler claims them.

        Returns the run ids actually created.
        """
        ...

    async def wait_for_runs(self, timeout: float) -> None:  # noqa: ASYNC109
        """Return when a ``new`` run may exist (created, or rerun by ``recover_runs``), or
        after *timeout*. A signal that arrives while nobody waits is kept for the next call."""
        ...

    async def claim_runs(self, *, limit: int) -> list[RunRecord]:
        """Mark up to *limit* ``new`` runs ``active`` (oldest first) and return them."""
        ...

    async def record_task(self, record: TaskRunRecord) -> None:
        """Insert or replace the record of one task of a run."""
        ...

    async def finish_run(
        self,
        run_id: str,
        *,
        status: Literal["done", "error"],
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Settle an active run."""
        ...

    async def recover_runs(
        self, *, rerun_flows: Sequence[str], orphaned: bool = False,
        run_ids: Sequence[str] | None = None,
    ) -> list[RunRecord]:
        """At start-up: this node's runs left ``active`` by a crash get ``interrupted += 1``;
        those of *rerun_flows* go back to ``new``, the others become ``error``
        ("interrupted"). With *orphaned* (called periodically): the same for other nodes'
        active runs whose lease ran out (a node that died). With *run_ids*: only those of
        this node's active runs (runs it stopped because it could not renew their lease).
        Returns the interrupted runs as they are after the change."""
        ...

    def runs_held_until(self, claimed_at: float) -> float:
        """Monotonic time (``time.monotonic``) until which a run this node claimed at
        monotonic *claimed_at* (taken before the claim was sent) surely stays this node's:
        its lease, as last renewed successfully. Past it another node may take the run over,
        so the scheduler stops it a margin before."""
        ...

    async def get_run(self, run_id: str) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        """One run and its task records, or None."""
        ...

    async def list_runs(
        self, *, flow: str | None = None, status: RunStatus | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Runs, newest first."""
        ...

    async def last_tick(self, flow: str, schedule_key: str) -> float | None:
        """The latest tick recorded for a cron/interval trigger, or None."""
        ...

    # -- chat sessions --------------------------------------------------------------------
    async def open_session(
        self, key: str, *, thread_id: str, ttl: float, max_active: int,
        metadata: dict[str, Any] | None = None,
    ) -> SessionOpen:
        """The active session of *key*, or a new one talking in *thread_id*, in one transaction.

        An active session idle for *ttl* seconds or more is closed (``expired``) and a new one
        started. Starting one when *max_active* are active first closes the one idle the
        longest (``evicted``). Two calls racing on a new key return the same session: the
        second sees the first's (``created`` False), so both talk in one thread.
        """
        ...

    async def record_turn(
        self, session_id: str, *, thread_id: str, messages: Sequence[dict[str, Any]] = (),
        context_limit: int = 20, metadata: dict[str, Any] | None = None,
    ) -> SessionRecord | None:
        """One exchange happened: ``turns + 1``, ``last_activity`` now, the thread the server
        answered in, *messages* appended to the context (the last *context_limit* kept),
        *metadata* merged. Returns the session after the change; None if unknown."""
        ...

    async def get_session(self, key: str) -> SessionRecord | None:
        """The active session of *key*, else its latest closed one, else None."""
        ...

    async def list_sessions(
        self, *, status: SessionStatus | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Sessions, most recently active first."""
        ...

    async def close_session(self, key: str, *, reason: str = "closed") -> SessionRecord | None:
        """Close the active session of *key*; the closed session, or None if none was active."""
        ...

    async def expire_sessions(self, *, ttl: float) -> list[SessionRecord]:
        """Close (``expired``) every active session idle for *ttl* seconds or more."""
        ...

    async def count_sessions(self) -> int:
        """How many sessions are active (for ``mfo_sessions_active``)."""
        ...

    async def prune_sessions(self, *, closed_older_than: float) -> int:
        """Delete sessions closed more than *closed_older_than* seconds ago (active ones are
        never deleted), in chunks so appends go on; returns how many. The retention actor
        calls it with ``store.retention``."""
        ...

    async def aclose(self) -> None:
        """Finish pending writes and close; later writes raise StoreClosedError."""
        ...
