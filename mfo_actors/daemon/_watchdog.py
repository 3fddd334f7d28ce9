"""The watchdog actor: pings systemd (``WATCHDOG=1``) while the event loop is healthy.

It runs under the supervisor like any actor, so a stuck event loop, or a daemon whose
supervisor stopped scheduling work, stops the pings and systemd restarts the unit. Without
``$WATCHDOG_USEC`` it only waits for the stop request, which also keeps an instance with no
other actor alive until SIGTERM.
"""

from __future__ import annotations

import anyio

from mfo_actors.daemon._notify import SystemdNotifier
from mfo_actors.observability import get_logger
from mfo_actors.runtime import ReadySignal, RestartPolicy

__all__ = ["WatchdogActor"]

log = get_logger(__name__)


class WatchdogActor:
    """Sends ``WATCHDOG=1`` every *interval* seconds (None: never) until asked to stop."""

    name = "watchdog"
    restart = RestartPolicy("permanent")

    def __init__(self, notifier: SystemdNotifier, interval: float | None) -> None:
        self.notifier = notifier
        self.interval = interval
        self._stop = anyio.Event()

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        if self.interval is None:
            await self._stop.wait()
            return
        log.info("watchdog.started", interval_s=round(self.interval, 3))
        while not self._stop.is_set():
            await self.notifier.watchdog()
            with anyio.move_on_after(self.interval):
                await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()
