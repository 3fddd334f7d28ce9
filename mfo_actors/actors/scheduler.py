"""The scheduler actor: turns triggers into durable run records and runs them, with history.

Triggers, and how each one survives a crash:

* **event**: :class:`RunMatcher` is called by the listener *before* ``store.append``; the
  run records it returns are written in the same transaction as the event, so an event
  answered 202 always has its runs, even after a ``kill -9``.
* **cron / interval**: one task per :class:`~mfo_actors.taskflow.ScheduleTrigger` sleeps
  (on the injected :class:`~mfo_actors.runtime.Clock`) until the next tick after the last
  tick recorded in the store, then creates a run keyed ``(flow, schedule_key, tick)``. That
  key is unique in the store, so a tick never fires twice, across restarts and even with
  two schedulers on one store. Ticks missed while the daemon was down (or stalled for a
  whole period) follow ``flows.catch_up``: ``none`` skips them, ``one`` fires exactly one
  run (for the latest missed tick) and goes on from now.
* **manual**: :meth:`SchedulerActor.run_now` creates a ``manual`` run (``flows run`` in the
  CLI runs in its own process instead, see ``commands/flows.py``).

Execution: a claim loop takes ``new`` runs from the store (``claim_runs``, never more than
free slots, so at most ``flows.concurrency`` runs are ``active`` at once and the rest wait
durably as ``new``), woken by ``store.wait_for_runs`` with a poll as fallback (runs created
by another process). Each run executes with the shared
:class:`~mfo_actors.taskflow.FlowExecutor` in the actor's task group; a recorder writes each
task's ``TaskRunRecord`` as it changes, then the run is settled ``done`` or ``error``
(``mfo_flow_runs_total``, ``mfo_task_duration_seconds``).

Start-up and shutdown: :meth:`SchedulerActor.run` first calls ``store.recover_runs``:
runs left ``active`` by a crash are counted as interrupted and go back to ``new`` (flows
with ``on_interrupt: rerun``, the default) or become ``error`` "interrupted" (``fail``).
:meth:`SchedulerActor.request_stop` stops claiming and firing ticks; runs in flight go on
and ``run`` returns when they end. If the supervisor's deadline cancels them first, the
engine records their unfinished tasks ``cancelled`` and the run record is deliberately left
``active``: the next start's ``recover_runs`` then treats it exactly like a crash, by the
flow's ``on_interrupt`` policy. Start-up recovery takes only this node's runs; every half
``store.node_lease`` the scheduler also takes the runs of nodes that stopped renewing theirs
(died) by the same policy.

Leases. A run this node claimed stays its own while the store renews its lease (every third
of ``store.node_lease``). A node cut off from the database (an outage longer than the lease)
cannot renew, and another node may take its runs over once their lease ran out. So the
scheduler stops a run (cancels it, tasks recorded ``cancelled`` where the store allows) once
its lease may have run out within LEASE_FENCE_MARGIN of ``node_lease``
(``store.runs_held_until``), and gives it back by its flow's ``on_interrupt`` once the store
answers (``recover_runs(run_ids=...)``; a no-op if another node took it meanwhile). What this
promises is at-least-once, as for events: a run is never executed by two nodes at once as
long as their clocks agree within the margin, but a run stopped (or finished, its result not
yet recorded when the lease ran out) may be executed again from the start; flows with side
effects must be idempotent, or ``on_interrupt: fail``.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import anyio
import anyio.abc
from croniter import croniter

from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.actors._runs import StoreRecorder, finish_run_retrying, retry_store
from mfo_actors.config import InstanceConfig
from mfo_actors.ids import new_id
from mfo_actors.messages import BreakerState, Event
from mfo_actors.metrics import FLOW_RUNS
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock, Watch
from mfo_actors.store import EventStore, RunRecord, RunRequest, StoreError
from mfo_actors.taskflow import (
    ChatSessions,
    EventTrigger,
    Flow,
    FlowExecutor,
    ScheduleTrigger,
    TaskRegistry,
    UnknownFlowError,
    default_registry,
    event_scope,
    load_flows,
)

if TYPE_CHECKING:
    from mfo_actors.client import MFOClient

__all__ = ["RunMatcher", "SchedulerActor", "latest_tick", "load_instance_flows"]

log = get_logger("mfo_actors.scheduler")

POLL_INTERVAL = 1.0  # seconds between claims without a wake-up (runs made by another process)
MAX_TICK_SLEEP = 60.0  # re-read the wall clock at least this often while waiting for a tick
FIRE_ATTEMPTS = 3  # tries to record a tick before it is given up (logged as an error)
SETTLE_TIMEOUT = 5.0  # seconds a shielded settle may take when a run failed unexpectedly
# A run is stopped this fraction of store.node_lease before its lease could run out (two
# renewals in a row failed), and the guard looks every LEASE_GUARD_FRACTION of it.
LEASE_FENCE_MARGIN = 0.2
LEASE_GUARD_FRACTION = 0.05


class _Held:
    """A run this node executes: when its claim was sent, and how to stop it."""

    __slots__ = ("claimed_at", "lost", "scope")

    def __init__(self, claimed_at: float) -> None:
        self.claimed_at = claimed_at  # time.monotonic() before the claim was sent
        self.scope = anyio.CancelScope()
        self.lost = False  # stopped: its lease may be gone


def load_instance_flows(cfg: InstanceConfig, registry: TaskRegistry | None = None
                        ) -> dict[str, Flow]:
    """The flows of an instance: ``flows.dir`` loaded with the default registry ({} when
    ``flows.enabled`` is false or the directory does not exist).

    Raises:
      ConfigError: a flow file is invalid (``FlowLoadError`` lists every problem).
    """
    if not cfg.flows.enabled:
        return {}
    return load_flows(cfg.flows.dir, registry if registry is not None else default_registry())


# -- event triggers -------------------------------------------------------------------------


def _glob(pattern: str) -> Callable[[str], object] | None:
    """A matcher for a source/type glob; None for ``*`` (matches everything)."""
    if pattern == "*":
        return None
    return re.compile(fnmatch.translate(pattern)).match


_DECODE: Any = object()  # RunMatcher's payload: not decoded yet


class RunMatcher:
    """``match_runs`` for the listener: the runs an event starts, to store with the event.

    ``matcher(event) -> list[RunRequest]``: one ``event`` run per flow with a matching
    trigger. Source and type globs are checked first; the JSON body is decoded only when a
    trigger that got that far has a ``when:`` expression, and at most once per event.
    """

    __slots__ = ("_entries", "_payload_sources")

    def __init__(self, flows: Mapping[str, Flow]) -> None:
        self._entries: list[tuple[str, list[tuple[Any, Any, EventTrigger]]]] = [
            (name, [(_glob(t.source), _glob(t.type), t) for t in flow.event_triggers])
            for name, flow in flows.items() if flow.event_triggers
        ]
        self._payload_sources: dict[str, bool] = {}

    def needs_payload(self, source: str) -> bool:
        """Whether events of *source* may need their decoded body (a ``when:`` trigger that
        matches the source), so the listener decodes it fully once and passes it on."""
        known = self._payload_sources.get(source)
        if known is None:
            known = any(t.when is not None and (match is None or match(source))
                        for _, triggers in self._entries for match, _, t in triggers)
            if len(self._payload_sources) < 4096:  # sources are the config's routes
                self._payload_sources[source] = known
        return known

    def __bool__(self) -> bool:
        """False when no flow has an event trigger (the listener may skip the call)."""
        return bool(self._entries)

    def __call__(self, event: Event, *, payload: Any = _DECODE) -> list[RunRequest]:
        """The runs *event* starts; *payload*: its body already decoded, if it was."""
        runs: list[RunRequest] = []
        if not self._entries:
            return runs
        source, etype = event.source, event.type
        scope: dict[str, Any] | None = None
        for name, triggers in self._entries:
            for match_source, match_type, trigger in triggers:
                if match_source is not None and not match_source(source):
                    continue
                if match_type is not None and not match_type(etype):
                    continue
                if trigger.when is not None:
                    if scope is None:
                        scope = (event_scope(event) if payload is _DECODE
                                 else event_scope(event, payload=payload))
                    if scope is None or not trigger.matches(scope):
                        continue
                runs.append(RunRequest(run_id=new_id(), flow=name, trigger="event",
                                       event_id=event.id))
                break
        return runs


# -- schedules ------------------------------------------------------------------------------


def latest_tick(trigger: ScheduleTrigger, t: float, *, default_timezone: str = "UTC") -> float:
    """The latest tick of *trigger* at or before the epoch time *t*."""
    if trigger.kind == "interval":
        assert trigger.interval is not None
        return math.floor(t / trigger.interval) * trigger.interval
    assert trigger.cron is not None
    tz = ZoneInfo(trigger.timezone or default_timezone)
    prev: datetime = croniter(trigger.cron, datetime.fromtimestamp(t, tz)).get_prev(datetime)
    tick = prev.timestamp()
    # get_prev is strictly before its start; a tick exactly at t counts as "at or before".
    following = trigger.next_after(tick, default_timezone=default_timezone)
    return following if following <= t else tick


# -- the actor ------------------------------------------------------------------------------


class SchedulerActor:
    """Triggers and runs flows, recording every run and task in the store.

    Args:
      cfg: The instance config (``flows.concurrency``, ``flows.timezone``,
        ``flows.catch_up``, ``instance`` for metric labels).
      store: Durable run history (and the events that triggered runs).
      flows: The loaded flows by name (see :func:`load_instance_flows`).
      client: The shared MFO client for ``mfo.*`` tasks (None: those tasks fail).
      sessions: Chat sessions for ``mfo.chat`` with ``session:`` (None: those tasks fail).
      clock: Time for cron/interval ticks (a ``FakeClock`` in tests).
      breaker_states: The breaker actor's state watch: read for :meth:`health`, changes
        logged. (Tasks wait for the breaker in the client's gate, bounded by their timeout.)
    """

    def __init__(
        self,
        cfg: InstanceConfig,
        store: EventStore,
        flows: Mapping[str, Flow],
        *,
        client: MFOClient | None,
        sessions: ChatSessions | None = None,
        clock: Clock | None = None,
        breaker_states: Watch[BreakerState] | None = None,
    ) -> None:
        self.name = "scheduler"
        self.restart = RestartPolicy("permanent")
        self._instance = cfg.instance
        self._timezone = cfg.flows.timezone
        self._catch_up_policy: Literal["none", "one"] = cfg.flows.catch_up
        self._concurrency = max(1, cfg.flows.concurrency)
        self._orphan_interval = float(cfg.store.node_lease) / 2
        self._node_lease = float(cfg.store.node_lease)
        self._held: dict[str, _Held] = {}  # run id -> the runs executing now
        self._store = store
        self._flows = dict(flows)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._client = client
        self._sessions = sessions
        self._executor = FlowExecutor(self._flows, client=client, sessions=sessions, logger=log)
        self._schedules_changed = anyio.Event()
        self._breaker_states = breaker_states
        self._in_flight = 0
        self._slot_freed = anyio.Event()
        self._stopping = False
        self._intake: anyio.CancelScope | None = None
        self._last_error: str | None = None
        self.runs_done = 0
        self.runs_failed = 0
        self.ticks_fired = 0

    # -- status ----------------------------------------------------------------------------

    @property
    def flows(self) -> dict[str, Flow]:
        return self._flows

    @property
    def in_flight(self) -> int:
        """Runs executing now."""
        return self._in_flight

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: the scheduler is ready while running."""
        return {
            "ok": True, "flows": len(self._flows), "running": self._in_flight,
            "done": self.runs_done, "failed": self.runs_failed,
            "breaker": (self._breaker_states.value.state if self._breaker_states is not None
                        else None),
            "last_error": self._last_error,
        }  # fmt: skip

    # -- the actor -------------------------------------------------------------------------

    async def run(self, ready: ReadySignal) -> None:
        """Recover interrupted runs, then trigger and run flows until asked to stop."""
        self._stopping = False
        rerun = [name for name, flow in self._flows.items() if flow.on_interrupt == "rerun"]
        for rec in await self._store.recover_runs(rerun_flows=rerun):
            log.warning("scheduler.run_recovered", run_id=rec.run_id, flow=rec.flow,
                        status=rec.status, interrupted=rec.interrupted)
        async with anyio.create_task_group() as guard:
            guard.start_soon(self._lease_guard)
            await self._serve(ready, rerun)
            guard.cancel_scope.cancel()
        log.info("scheduler.stopped", done=self.runs_done, failed=self.runs_failed)

    async def _serve(self, ready: ReadySignal, rerun: list[str]) -> None:
        """Claim and run until asked to stop, then wait for the runs in flight."""
        async with anyio.create_task_group() as runs:
            with anyio.CancelScope() as intake:
                self._intake = intake
                if self._stopping:
                    intake.cancel()
                async with anyio.create_task_group() as loops:
                    loops.start_soon(self._schedules)
                    if self._breaker_states is not None:
                        loops.start_soon(self._watch_breaker)
                    loops.start_soon(self._orphans_loop, rerun)
                    ready.set()
                    log.info("scheduler.started", flows=len(self._flows),
                             schedules=sum(len(f.schedules) for f in self._flows.values()),
                             concurrency=self._concurrency)
                    await self._claim_loop(runs)
            self._intake = None
            if self._in_flight:
                log.info("scheduler.draining", running=self._in_flight)

    def request_stop(self) -> None:
        """Stop claiming runs and firing ticks; runs in flight finish, then ``run`` returns."""
        self._stopping = True
        if self._intake is not None:
            self._intake.cancel()

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """New flows (and their triggers), ``flows.concurrency``, ``timezone``, ``catch_up``.

        Runs in flight finish with the flow they started with; runs claimed afterwards use
        the new definition. Schedules that are new start from the ticks recorded in the store
        (a tick is never fired twice); unchanged ones go on untouched.
        """
        flows = dict(update.flows)
        fcfg = update.cfg.flows
        executor = FlowExecutor(flows, client=self._client, sessions=self._sessions, logger=log)

        def apply() -> None:
            added = sorted(set(flows) - set(self._flows))
            removed = sorted(set(self._flows) - set(flows))
            self._flows = flows
            self._executor = executor
            self._timezone = fcfg.timezone
            self._catch_up_policy = fcfg.catch_up
            self._concurrency = max(1, fcfg.concurrency)
            self._schedules_changed.set()
            self._wake_claims()
            log.info("scheduler.reloaded", flows=len(flows), added=added, removed=removed,
                     schedules=sum(len(f.schedules) for f in flows.values()))

        return apply

    async def run_now(self, flow_name: str, input: Mapping[str, Any] | None = None) -> str:
        """Create a ``manual`` run of *flow_name* (run by the claim loop); return its id.

        Raises:
          UnknownFlowError: no flow of that name is loaded.
        """
        if flow_name not in self._flows:
            raise UnknownFlowError(flow_name, list(self._flows))
        req = RunRequest(run_id=new_id(), flow=flow_name, trigger="manual",
                         input=dict(input or {}))
        await self._store.create_runs([req])
        return req.run_id

    # -- claiming and running ----------------------------------------------------------------

    async def _claim_loop(self, runs: anyio.abc.TaskGroup) -> None:
        while not self._stopping:
            free = self._concurrency - self._in_flight
            if free <= 0:
                await self._slot_freed.wait()
                continue
            try:
                # Shielded: a claim committed but never started would sit active until restart.
                sent = time.monotonic()
                with anyio.CancelScope(shield=True):
                    claimed = await self._store.claim_runs(limit=free)
            except StoreError as exc:
                self._last_error = f"claim failed: {exc}"
                log.error("scheduler.claim_failed", error=str(exc))
                await anyio.sleep(POLL_INTERVAL)
                continue
            for record in claimed:
                self._in_flight += 1
                runs.start_soon(self._execute, record, sent, name=f"run-{record.run_id}")
            if not claimed:
                await self._store.wait_for_runs(POLL_INTERVAL)

    def _release(self) -> None:
        self._in_flight -= 1
        self._wake_claims()

    def _wake_claims(self) -> None:
        freed, self._slot_freed = self._slot_freed, anyio.Event()
        freed.set()

    async def _execute(self, record: RunRecord, claimed_at: float) -> None:
        run_log = log.bind(run_id=record.run_id, flow=record.flow)
        held = self._held[record.run_id] = _Held(claimed_at)
        try:
            flow = self._flows.get(record.flow)
            if flow is None:
                await self._settle(record, "error", f"flow {record.flow} is not loaded", None)
                return
            event: Event | None = None
            if record.event_id is not None:
                stored = await self._store.get_event(record.event_id)
                if stored is None:
                    await self._settle(record, "error",
                                       f"triggering event {record.event_id} is no longer stored",
                                       None)
                    return
                event = stored.event
            run_log.info("scheduler.run_started", trigger=record.trigger,
                         interrupted=record.interrupted)
            recorder = StoreRecorder(self._store, record.run_id, flow.name,
                                     instance=self._instance)
            with held.scope:
                outcome = await self._executor.run(flow, run_id=record.run_id, event=event,
                                                   input=record.input, recorder=recorder)
            if held.lost:
                await self._give_back(record)
                return
            await self._settle(record, outcome.status, outcome.error, outcome.outputs)
        except anyio.get_cancelled_exc_class():
            # Left active on purpose: recover_runs at the next start applies on_interrupt.
            run_log.warning("scheduler.run_interrupted")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._last_error = error
            run_log.error("scheduler.run_crashed", error=error)
            with anyio.move_on_after(SETTLE_TIMEOUT, shield=True):
                try:
                    await self._settle(record, "error", error, None)
                except StoreError as store_exc:
                    run_log.error("scheduler.settle_failed", error=str(store_exc))
        finally:
            self._held.pop(record.run_id, None)
            self._release()

    async def _lease_guard(self) -> None:
        """Stop the runs whose lease may run out within LEASE_FENCE_MARGIN (renewals fail:
        the store is away), before another node can take them over."""
        margin = self._node_lease * LEASE_FENCE_MARGIN
        while True:
            await anyio.sleep(self._node_lease * LEASE_GUARD_FRACTION)
            now = time.monotonic()
            for run_id, held in list(self._held.items()):
                held_until = self._store.runs_held_until(held.claimed_at)
                if held.lost or now < held_until - margin:
                    continue
                held.lost = True
                held.scope.cancel()
                self._last_error = f"run {run_id} stopped: its lease could not be renewed"
                log.error("scheduler.run_lease_lost", run_id=run_id,
                          lease_left_s=round(held_until - now, 3))

    async def _give_back(self, record: RunRecord) -> None:
        """A run stopped for its lease: once the store answers, by its flow's
        ``on_interrupt`` (rerun or fail), unless another node took it over meanwhile."""
        rerun = [name for name, f in self._flows.items() if f.on_interrupt == "rerun"]

        def note(exc: StoreError) -> None:
            self._last_error = f"give back failed: {exc}"

        given = await retry_store(
            lambda: self._store.recover_runs(rerun_flows=rerun, run_ids=[record.run_id]),
            what="give_back", run_id=record.run_id, on_retry=note)
        log.warning("scheduler.run_given_back", run_id=record.run_id, flow=record.flow,
                    status=given[0].status if given else "taken over by another node")

    async def _settle(self, record: RunRecord, status: Literal["done", "error"],
                      error: str | None, outputs: dict[str, Any] | None) -> None:
        def note(exc: StoreError) -> None:
            self._last_error = f"settle failed: {exc}"

        # Retried until the store takes it (or we are cancelled): the run did run, and its
        # result must not be lost, nor the run rerun, for a store that is briefly away.
        await finish_run_retrying(self._store, record.run_id, status=status, error=error,
                                  outputs=outputs, on_retry=note)
        FLOW_RUNS.labels(instance=self._instance, flow=record.flow, status=status).inc()
        if status == "done":
            self.runs_done += 1
        else:
            self.runs_failed += 1
        log.info("scheduler.run_finished", run_id=record.run_id, flow=record.flow,
                 status=status, error=error)

    async def _orphans_loop(self, rerun: list[str]) -> None:
        """Rerun (or fail, by ``on_interrupt``) the active runs of nodes that died."""
        while not self._stopping:
            # Real time, not self._clock: it paces database reads; the store's clock judges
            # the leases.
            await anyio.sleep(self._orphan_interval)
            try:
                recovered = await self._store.recover_runs(rerun_flows=rerun, orphaned=True)
            except StoreError as exc:
                log.error("scheduler.orphans_failed", error=str(exc))
                continue
            for rec in recovered:
                log.warning("scheduler.run_recovered", run_id=rec.run_id, flow=rec.flow,
                            status=rec.status, interrupted=rec.interrupted, orphaned=True)

    # -- schedules -------------------------------------------------------------------------

    async def _schedules(self) -> None:
        """One loop per schedule trigger of the current flows. A reload stops the loops of
        schedules that are gone and starts those that are new; the others go on as they were
        (a loop restarted at the moment its tick is due would count the tick as missed)."""
        running: dict[tuple[str, str, str], anyio.CancelScope] = {}
        async with anyio.create_task_group() as tg:
            while True:
                changed = self._schedules_changed = anyio.Event()
                wanted = {(flow.name, trigger.key, self._timezone): (flow, trigger)
                          for flow in self._flows.values() for trigger in flow.schedules}
                for key in set(running) - set(wanted):
                    running.pop(key).cancel()
                for key in wanted.keys() - running.keys():
                    flow, trigger = wanted[key]
                    scope = running[key] = anyio.CancelScope()
                    tg.start_soon(self._scoped, scope, flow, trigger,
                                  name=f"schedule-{flow.name}-{trigger.index}")
                await changed.wait()

    async def _scoped(self, scope: anyio.CancelScope, flow: Flow, trigger: ScheduleTrigger
                      ) -> None:
        with scope:
            await self._schedule_loop(flow, trigger)

    async def _schedule_loop(self, flow: Flow, trigger: ScheduleTrigger) -> None:
        tz = self._timezone
        while True:
            try:
                last = await self._store.last_tick(flow.name, trigger.key)
                break
            except StoreError as exc:
                log.error("scheduler.last_tick_failed", flow=flow.name, error=str(exc))
                await anyio.sleep(POLL_INTERVAL)
        now = self._clock.now()
        if last is None:
            nxt = trigger.next_after(now, default_timezone=tz)
        else:
            nxt = trigger.next_after(last, default_timezone=tz)
            if nxt <= now:
                nxt = await self._catch_up(flow, trigger, last, now)
        log.debug("scheduler.next_tick", flow=flow.name, schedule=trigger.key, tick=nxt)
        while not self._stopping:
            await self._sleep_until(nxt)
            await self._fire(flow, trigger, nxt)
            now = self._clock.now()
            following = trigger.next_after(nxt, default_timezone=tz)
            if following <= now:  # a whole period behind (stall, suspend): as after downtime
                following = await self._catch_up(flow, trigger, nxt, now)
            nxt = following

    async def _catch_up(self, flow: Flow, trigger: ScheduleTrigger, last: float, now: float
                        ) -> float:
        """Ticks after *last* up to *now* were missed: apply ``flows.catch_up``; return the
        next tick to wait for."""
        tz = self._timezone
        missed = latest_tick(trigger, now, default_timezone=tz)
        log.info("scheduler.ticks_missed", flow=flow.name, schedule=trigger.key,
                 last_tick=last, latest_missed=missed, catch_up=self._catch_up_policy)
        if self._catch_up_policy == "one" and missed > last:
            await self._fire(flow, trigger, missed)
        return trigger.next_after(now, default_timezone=tz)

    async def _sleep_until(self, tick: float) -> None:
        clock = self._clock
        while (remaining := tick - clock.now()) > 0:
            await clock.sleep(min(remaining, MAX_TICK_SLEEP))

    async def _fire(self, flow: Flow, trigger: ScheduleTrigger, tick: float) -> None:
        req = RunRequest(run_id=new_id(), flow=flow.name, trigger=trigger.kind,
                         schedule_key=trigger.key, tick=tick)
        for attempt in range(1, FIRE_ATTEMPTS + 1):
            try:
                # Shielded: a reload restarting the schedules must not lose a tick half-fired.
                with anyio.CancelScope(shield=True):
                    created = await self._store.create_runs([req])
            except StoreError as exc:
                log.error("scheduler.tick_failed", flow=flow.name, schedule=trigger.key,
                          tick=tick, attempt=attempt, error=str(exc))
                if attempt < FIRE_ATTEMPTS:
                    await anyio.sleep(POLL_INTERVAL)
                continue
            if created:
                self.ticks_fired += 1
                log.info("scheduler.tick_fired", flow=flow.name, schedule=trigger.key,
                         tick=tick, run_id=req.run_id)
            else:
                log.info("scheduler.tick_duplicate", flow=flow.name, schedule=trigger.key,
                         tick=tick)
            return
        self._last_error = f"tick {tick} of {flow.name} not recorded"

    async def _watch_breaker(self) -> None:
        states = self._breaker_states
        assert states is not None
        last = states.value.state
        while not states.closed:
            await states.wait_changed(states.version)
            state = states.value
            if state.state != last:
                log.info("scheduler.breaker_state", upstream=state.upstream, state=state.state)
                last = state.state
