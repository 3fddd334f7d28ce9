"""The summary actor: one info line per interval saying what the instance did, when it did
anything.

At the default level a running daemon is otherwise silent about its work (per-event lines
are debug). Every ``logging.summary_interval`` (10 s; 0 turns it off) it logs
``instance.summary`` with what happened since the last line (``received``, ``delivered``,
``retried``, ``dead``, ``rejected``) and the outbox now (``pending``, ``oldest_pending_s``),
only when one of those changed, so an idle daemon stays quiet. A backlog that does not move
(an outage with no new traffic: nothing is attempted while the breaker is open) is still
reported every :data:`STUCK_EVERY` intervals, so ``oldest_pending_s`` can be seen growing.
Counts come from the instance's metrics, the outbox from the store.
"""

from __future__ import annotations

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.config import InstanceConfig
from mfo_actors.metrics import instance_totals
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock
from mfo_actors.store import EventStore, StoreError

__all__ = ["STUCK_EVERY", "SummaryActor"]

log = get_logger(__name__)

STUCK_EVERY = 6  # intervals: a pending backlog is reported at least this often (1 min)

# Counter (metric family) -> field of the summary line.
_FIELDS = {
    "mfo_events_received": "received",
    "mfo_events_forwarded": "delivered",
    "mfo_events_retried": "retried",
    "mfo_events_dead": "dead",
}


class SummaryActor:
    """Logs ``instance.summary`` every ``logging.summary_interval`` when something changed."""

    name = "summary"
    restart = RestartPolicy("permanent")

    def __init__(self, cfg: InstanceConfig, store: EventStore, *,
                 clock: Clock | None = None) -> None:
        self._instance = cfg.instance
        self._interval = float(cfg.logging.summary_interval)
        self._store = store
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._stop = anyio.Event()
        self._last: dict[str, float] = {}
        self._last_pending = 0  # a backlog found at start is worth the first line
        self._quiet = 0  # intervals since the last line

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        if self._interval <= 0:
            await self._stop.wait()
            return
        self._last = self._totals()  # what happened before this run is not news
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
            while True:
                await self._clock.sleep(self._interval)
                await self.report()

    def request_stop(self) -> None:
        self._stop.set()

    async def report(self) -> None:
        """Log one summary line if anything changed since the last one, or a backlog has
        been there unchanged for :data:`STUCK_EVERY` intervals."""
        totals = self._totals()
        changes = {field: int(totals.get(field, 0) - self._last.get(field, 0))
                   for field in (*_FIELDS.values(), "rejected")}
        try:
            stats = await self._store.stats()
            oldest = await self._store.oldest_pending_at() if stats.pending else None
        except StoreError as exc:
            log.warning("instance.summary_failed", error=str(exc))
            return
        self._quiet += 1
        if not any(changes.values()) and stats.pending == self._last_pending and not (
                stats.pending and self._quiet >= STUCK_EVERY):
            return
        self._last, self._last_pending, self._quiet = totals, stats.pending, 0
        age = None if oldest is None else round(max(0.0, self._clock.now() - oldest), 1)
        log.info("instance.summary", interval_s=self._interval, **changes,
                 pending=stats.pending, oldest_pending_s=age)

    def _totals(self) -> dict[str, float]:
        counters = instance_totals(self._instance)
        totals = {field: counters.get(name, 0.0) for name, field in _FIELDS.items()}
        # Refusals, without provider retries answered 200 (those are not a problem).
        totals["rejected"] = (counters.get("mfo_events_rejected", 0.0)
                              - counters.get("mfo_events_rejected:duplicate", 0.0))
        return totals
