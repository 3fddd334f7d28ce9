"""Time as a dependency: the real clock for the daemon, a fake one that tests move by hand.

Code that waits (backoff, refresh before expiry, cron) takes a :class:`Clock` so its tests
run in microseconds and never race the wall clock.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Where time comes from.

    ``monotonic`` is for durations and deadlines (never jumps); ``now`` is wall-clock Unix
    seconds, for timestamps people read and for expiry times sent by servers.
    """

    def monotonic(self) -> float:
        """Seconds on a clock that only moves forward (arbitrary origin)."""
        ...

    def now(self) -> float:
        """Wall-clock time in Unix seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait *seconds* on this clock (a checkpoint even for 0)."""
        ...

    async def sleep_until(self, deadline_monotonic: float) -> None:
        """Wait until :meth:`monotonic` reaches *deadline_monotonic*."""
        ...


class SystemClock:
    """The real clock: the event loop's clock for monotonic time, ``time.time`` for wall time."""

    def monotonic(self) -> float:
        """``anyio.current_time()``: only valid inside a running event loop."""
        return anyio.current_time()

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    async def sleep_until(self, deadline_monotonic: float) -> None:
        await anyio.sleep_until(deadline_monotonic)

    def __repr__(self) -> str:
        return "SystemClock()"


class _Sleeper:
    __slots__ = ("deadline", "resumed", "seq", "wake")

    def __init__(self, deadline: float, seq: int) -> None:
        self.deadline = deadline
        self.seq = seq
        self.wake = anyio.Event()
        self.resumed = anyio.Event()  # set once the sleeper's task ran again


class FakeClock:
    """A clock that moves only when the test says so.

    ``monotonic()`` starts at 0.0 and ``now()`` at *start*; both move together. Sleepers
    wait until :meth:`advance` or :meth:`advance_to` moves time past their deadline.

    Args:
      start: Wall-clock time (Unix seconds) that ``now()`` returns before any advance.

    Example::

        clock = FakeClock()
        tg.start_soon(thing_that_backs_off, clock)
        await clock.wait_for_sleepers(1)   # it is waiting now
        await clock.advance_to(clock.monotonic() + 5)
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall_start = float(start)
        self._elapsed = 0.0
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._changed = anyio.Event()

    def monotonic(self) -> float:
        return self._elapsed

    def now(self) -> float:
        return self._wall_start + self._elapsed

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock now."""
        return len(self._sleepers)

    @property
    def next_deadline(self) -> float | None:
        """The earliest sleeper's deadline (monotonic), or None when nobody sleeps."""
        return min((s.deadline for s in self._sleepers), default=None)

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._elapsed + max(seconds, 0.0))

    async def sleep_until(self, deadline_monotonic: float) -> None:
        if math.isnan(deadline_monotonic):
            raise ValueError("deadline must not be NaN")
        if deadline_monotonic <= self._elapsed:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(deadline_monotonic, next(self._seq))
        self._sleepers.append(sleeper)
        self._notify()
        try:
            await sleeper.wake.wait()
        finally:
            if sleeper in self._sleepers:  # cancelled before its time came
                self._sleepers.remove(sleeper)
                self._notify()
            sleeper.resumed.set()

    def advance(self, seconds: float) -> None:
        """Move time forward by *seconds* and wake every sleeper whose deadline has passed.

        The woken tasks all become runnable at once; the order they then run in is the
        scheduler's. Use :meth:`advance_to` when the order matters.

        Raises:
          ValueError: *seconds* is negative.
        """
        if seconds < 0:
            raise ValueError(f"time only moves forward, got {seconds!r}")
        self._elapsed += seconds
        for sleeper in self._pop_due(self._elapsed):
            sleeper.wake.set()

    async def advance_to(self, deadline_monotonic: float) -> None:
        """Move time to *deadline_monotonic*, waking sleepers one by one in deadline order.

        Each sleeper wakes with ``monotonic()`` equal to its own deadline and runs until its
        next checkpoint before the next one is woken; a sleeper that goes back to sleep with
        a deadline still before the target is woken again in turn.

        Raises:
          ValueError: *deadline_monotonic* is in the past.
        """
        if deadline_monotonic < self._elapsed:
            raise ValueError(
                f"time only moves forward: {deadline_monotonic!r} < {self._elapsed!r}"
            )
        while True:
            due = self._pop_due(deadline_monotonic, limit=1)
            if not due:
                break
            sleeper = due[0]
            self._elapsed = max(self._elapsed, sleeper.deadline)
            sleeper.wake.set()
            await sleeper.resumed.wait()
        self._elapsed = deadline_monotonic
        await anyio.lowlevel.checkpoint()

    async def wait_for_sleepers(self, n: int) -> None:
        """Wait until at least *n* tasks are sleeping on this clock (wrap in a timeout)."""
        while len(self._sleepers) < n:
            await self._changed.wait()

    def _pop_due(self, until: float, limit: int | None = None) -> list[_Sleeper]:
        due = sorted(
            (s for s in self._sleepers if s.deadline <= until),
            key=lambda s: (s.deadline, s.seq),
        )
        if limit is not None:
            due = due[:limit]
        if due:
            for sleeper in due:
                self._sleepers.remove(sleeper)
            self._notify()
        return due

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._elapsed!r}, sleepers={len(self._sleepers)})"
