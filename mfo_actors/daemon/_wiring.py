"""Which actors make up an instance, and in what order: the one place the daemon is wired.

:func:`open_instance` opens what the actors share (the store, the MFO client, the flows) and
yields the actors in start order; everything it opened is closed when the block exits, after
the supervisor has stopped every actor. The supervisor starts the list in order (each once the
previous is ready) and stops it in reverse, so an actor comes after everything it depends on:

    watchdog, statedir, admin, summary, retention, gauges, sessions, breaker, auth, forwarder,
    scheduler, listener

On SIGTERM the listener stops first (new webhooks get 503 + Retry-After, in-flight ones finish
their store commit), then the scheduler and forwarder drain, and the admin port answers
until the end.

The messages between them (``daemon/_graph.py`` declares each channel; ``mfo-actors check
--graph`` prints them as Mermaid)::

    listener --Event--> [store] --Event--> forwarder        (the durable mailbox)
    listener, scheduler --RunRequest--> [store] --> scheduler
    forwarder, scheduler --DeliveryOutcome--> breaker       (one per attempt, via the gate)
    breaker ==BreakerState==> forwarder, scheduler          (watch: latest value)
    auth ==TokenIssued==> forwarder, scheduler              (watch, read by the gate)
    forwarder, scheduler --TokenRejected--> auth            (a 401, via the gate)

Nothing else is shared: the forwarder and the flows' client reach the breaker and auth
actors only through one :class:`~mfo_actors.actors.UpstreamGate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from mfo_actors.actors._gate import UpstreamGate
from mfo_actors.actors._lean_sender import lean_senders
from mfo_actors.actors.admin import AdminActor
from mfo_actors.actors.auth import AuthRefresherActor
from mfo_actors.actors.breaker import BreakerActor
from mfo_actors.actors.forwarder import ForwarderActor
from mfo_actors.actors.listener import ListenerActor
from mfo_actors.actors.retention import RetentionActor
from mfo_actors.actors.scheduler import RunMatcher, SchedulerActor, load_instance_flows
from mfo_actors.actors.sessions import SessionsActor, StoreSessions
from mfo_actors.actors.store_gauges import StoreGaugesActor
from mfo_actors.actors.summary import SummaryActor
from mfo_actors.client import MFOClient
from mfo_actors.config import InstanceConfig
from mfo_actors.daemon._graph import check_channels, declare_channels
from mfo_actors.daemon._lock import StateDirLock
from mfo_actors.daemon._notify import SystemdNotifier, watchdog_interval
from mfo_actors.daemon._statedir import StateDirGuard
from mfo_actors.daemon._watchdog import WatchdogActor
from mfo_actors.errors import UserError
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Actor, Clock, Supervisor, SystemClock
from mfo_actors.store import EventStore, StoreError, open_store, sqlite_path

__all__ = ["DaemonContext", "open_instance"]

log = get_logger(__name__)

READINESS_STORE_TIMEOUT = 2.0  # seconds; probes (systemd, k8s, load balancers) wait ~1-10 s


@dataclass(eq=False)
class DaemonContext:
    """What the daemon hands to the wiring besides the config: process-wide resources."""

    state_dir: Path
    """The instance's state dir, created and locked by the daemon."""
    notifier: SystemdNotifier
    """sd_notify to systemd (a no-op outside systemd)."""
    environ: Mapping[str, str]
    """The process environment the daemon was started with."""
    clock: Clock = field(default_factory=SystemClock)
    supervisor: Supervisor | None = None
    """Set right after the actors are built, before any starts; ``/readyz`` reads
    ``supervisor.statuses()`` from it at request time."""
    lock: StateDirLock | None = None
    """The held state-dir lock (the state-dir guard watches its file)."""
    failure: str | None = None
    """Why the daemon must stop and exit non-zero (set by :meth:`fail`)."""
    failed: anyio.Event = field(default_factory=anyio.Event)

    def fail(self, reason: str) -> None:
        """Stop the daemon with exit code 1 (the first reason wins)."""
        if self.failure is None:
            self.failure = reason
            self.failed.set()


@contextlib.asynccontextmanager
async def open_instance(cfg: InstanceConfig, ctx: DaemonContext) -> AsyncIterator[list[Actor]]:
    """Open the shared resources and yield the instance's actors, in start order.

    Args:
      cfg: The loaded instance config.
      ctx: Process-wide resources (state dir, notifier, clock; the supervisor once built).

    Raises:
      ConfigError: a flow file is invalid.
      UserError: the store cannot be opened (corrupt, not a store, server out of reach).
    """
    flows = load_instance_flows(cfg)
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(open_store(cfg))
        except StoreError as exc:  # whichever backend: the user's file or server, not a bug
            raise UserError(f"{cfg.source_file or '<config>'}: store: {exc}") from None
        recovered = await store.recover_claims()
        if recovered:
            log.info("daemon.claims_recovered", events=recovered)

        breaker = BreakerActor(cfg, clock=ctx.clock)
        stack.callback(breaker.close)  # its inbox, however the instance ends
        auth = AuthRefresherActor(cfg, clock=ctx.clock)
        stack.callback(auth.close)
        check_channels(declare_channels(cfg), {
            "outcomes": breaker.outcomes, "breaker_state": breaker.states,
            "token": auth.tokens, "token_rejections": auth.rejections})
        # One gate for every caller of the MFO server: the breaker and auth actors' state,
        # the rate limit. Flow tasks wait at it for the breaker (bounded by their timeout).
        gate = UpstreamGate(breaker, auth, clock=ctx.clock)
        client = await stack.enter_async_context(
            MFOClient.from_config(cfg, gate=gate.waiting(), clock=ctx.clock))
        matcher = RunMatcher(flows)
        listener = ListenerActor(cfg, store, match_runs=matcher if matcher else None)

        actors: list[Actor] = [
            # First in, last out: keeps systemd's watchdog fed through the whole drain.
            WatchdogActor(ctx.notifier, watchdog_interval(ctx.environ)),
        ]
        health: dict[str, Any] = {"breaker": breaker.health, "auth": auth.health}
        if ctx.lock is not None:
            files = [sqlite_path(cfg)] if cfg.store.backend == "sqlite" else []
            guard = StateDirGuard(ctx.lock, files=files, fail=ctx.fail, clock=ctx.clock)
            health["statedir"] = guard.health
            actors.append(guard)
        if cfg.admin.enabled:
            actors.append(AdminActor(cfg.admin, instance=cfg.instance,
                                     readiness=_readiness(cfg, ctx, store, health),
                                     config_file=cfg.source_file))
        actors += [SummaryActor(cfg, store, clock=ctx.clock),
                   RetentionActor(cfg, store, clock=ctx.clock),
                   StoreGaugesActor(cfg, store, clock=ctx.clock),
                   SessionsActor(cfg, store, clock=ctx.clock), breaker, auth]
        if cfg.forwarder.enabled:
            # Events go out on the lean client (one kept-alive connection per worker), not
            # httpx: same gate, same outcomes, a fraction of the CPU per event.
            events_client = client.base.with_gate(gate)
            forwarder = ForwarderActor(
                cfg, store, events_client, clock=ctx.clock,
                senders=lean_senders(events_client, ctx.clock,
                                     timeout=float(cfg.client.timeout)),
            )
            health["forwarder"] = forwarder.health
            actors.append(forwarder)
        if cfg.flows.enabled:  # even with no flows yet: a reload may bring some
            scheduler = SchedulerActor(
                cfg, store, flows, client=client, clock=ctx.clock,
                sessions=StoreSessions(store, cfg.sessions, instance=cfg.instance),
                breaker_states=breaker.states)
            health["scheduler"] = scheduler.health
            actors.append(scheduler)
        if cfg.webhook_listener.enabled:
            actors.append(listener)
        yield actors


def _readiness(
    cfg: InstanceConfig, ctx: DaemonContext, store: EventStore, health: Mapping[str, Any]
) -> Any:
    """``/readyz``: 200 only when every actor is ready, the state dir is there, and the
    store's last write succeeded and it is below its bound."""

    async def readiness() -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ok = True
        statuses = ctx.supervisor.statuses() if ctx.supervisor is not None else {}
        for name, status in statuses.items():
            actor_ok = status.state == "ready"
            check: dict[str, Any] = {"ok": actor_ok, "state": status.state,
                                     "restarts": status.restarts}
            if status.last_error:
                check["last_error"] = status.last_error
            if name in health:
                check["detail"] = health[name]()
            checks[name] = check
            ok = ok and actor_ok
        if "statedir" in health:
            state_dir = health["statedir"]()
            checks["state_dir"] = state_dir
            ok = ok and bool(state_dir["ok"])
        try:
            # A stuck store must not hang the probe (and pile up admin connections).
            with anyio.fail_after(READINESS_STORE_TIMEOUT):
                stats = await store.stats()
        except Exception as exc:  # the store is what readiness is about: report, don't raise
            checks["store"] = {"ok": False, "error": repr(exc)}
            ok = False
        else:
            full = (stats.pending >= cfg.store.max_pending
                    or stats.pending_bytes >= cfg.store.max_bytes)
            store_ok = stats.writable and not full
            checks["store"] = {"ok": store_ok, "pending": stats.pending,
                               "pending_bytes": stats.pending_bytes, "dead": stats.dead,
                               "writable": stats.writable, "write_error": stats.write_error}
            ok = ok and store_ok
        return ok, checks

    return readiness
