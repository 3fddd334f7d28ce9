"""The retention actor: deletes delivered events, and chat sessions closed, longer ago than
``store.retention``, hourly.

A daemon runs for months; without it, every delivered event (and every session closed by
expiry, with its context) would stay in the store for good. Pending and dead events, and
active sessions, are never pruned, nor events whose delivery id is still inside
the dedupe window (the store's ``prune`` keeps those so provider retries are recognised).
``store.retention: 0`` keeps everything.
"""

from __future__ import annotations

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.config import InstanceConfig
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock
from mfo_actors.store import EventStore, StoreError

__all__ = ["PRUNE_INTERVAL", "RetentionActor"]

log = get_logger(__name__)

PRUNE_INTERVAL = 3600.0  # seconds between prunes; deletes are chunked, so appends go on


class RetentionActor:
    """Prunes delivered events and closed sessions past ``store.retention`` at start and
    every *interval*."""

    name = "retention"
    restart = RestartPolicy("permanent")

    def __init__(self, cfg: InstanceConfig, store: EventStore, *, clock: Clock | None = None,
                 interval: float = PRUNE_INTERVAL) -> None:
        self._retention = float(cfg.store.retention)
        self._store = store
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._interval = interval
        self._stop = anyio.Event()
        self.pruned = 0
        self.pruned_sessions = 0

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        if self._retention <= 0:
            await self._stop.wait()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
            while True:
                await self._prune()
                await self._clock.sleep(self._interval)

    async def _prune(self) -> None:
        try:
            n = await self._store.prune(delivered_older_than=self._retention)
            sessions = await self._store.prune_sessions(closed_older_than=self._retention)
        except StoreError as exc:  # try again next interval; nothing is lost by waiting
            log.error("retention.prune_failed", error=str(exc))
            return
        self.pruned += n
        self.pruned_sessions += sessions
        if n or sessions:
            log.info("retention.pruned", events=n, sessions=sessions,
                     retention_s=self._retention)

    def request_stop(self) -> None:
        self._stop.set()
