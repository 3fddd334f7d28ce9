"""The store gauges actor: ``mfo_outbox_depth`` from the store, on its own schedule.

The gauge used to be refreshed by the forwarder's dispatch loop, which waits for a token and
for the breaker: while logins failed it froze, and an alert on the backlog never fired
during the very outage it was there for. Whatever the forwarder is waiting for, this actor
reads :meth:`EventStore.stats` every :data:`GAUGE_INTERVAL` seconds (from memory for SQLite;
a backend shared by several nodes counts for all of them).
"""

from __future__ import annotations

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.config import InstanceConfig
from mfo_actors.metrics import OUTBOX_DEPTH
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock
from mfo_actors.store import EventStore, StoreError

__all__ = ["GAUGE_INTERVAL", "StoreGaugesActor"]

log = get_logger(__name__)

GAUGE_INTERVAL = 1.0  # seconds; scrapes come every 10-60 s, so the gauge is never stale


class StoreGaugesActor:
    """Sets ``mfo_outbox_depth`` from ``store.stats()`` at start and every *interval*."""

    name = "gauges"
    restart = RestartPolicy("permanent")

    def __init__(self, cfg: InstanceConfig, store: EventStore, *, clock: Clock | None = None,
                 interval: float = GAUGE_INTERVAL) -> None:
        self._store = store
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._interval = interval
        self._depth = OUTBOX_DEPTH.labels(instance=cfg.instance)
        self._stop = anyio.Event()
        self._failing = False

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
            while True:
                await self.refresh()
                await self._clock.sleep(self._interval)

    async def refresh(self) -> None:
        """Read the store's counts once and set the gauges."""
        try:
            stats = await self._store.stats()
        except StoreError as exc:  # keep the last value; say so once per failure streak
            if not self._failing:
                log.warning("gauges.stats_failed", error=str(exc))
            self._failing = True
            return
        self._failing = False
        self._depth.set(stats.pending)

    def request_stop(self) -> None:
        self._stop.set()
