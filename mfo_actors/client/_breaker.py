"""The circuit breaker of one upstream: stop calling a server that is down, probe it now and then.

States (``BreakerState.state``)::

    closed --failure_threshold consecutive failures--> open
    open   --reset_timeout elapsed, next before_call--> half_open (half_open_max_calls probes)
    half_open --a probe succeeds--> closed
    half_open --a probe fails-----> open (for another reset_timeout)

A *failure* is what the upstream is to blame for: network errors, timeouts, 5xx and 429. A
4xx answer proves the server is up, so it counts as a success here (the caller's request was
wrong, not the server).

The object is a plain synchronous state machine, so every caller sees the same state at once:
:meth:`before_call` raises :class:`CircuitBreakerError` immediately while open (and while
half-open with every probe slot taken). The forwarder additionally awaits
:meth:`wait_until_callable`, which sleeps (no polling) until a call would be let through, and
which in the closed state keeps a window on the calls in flight (a slow start): at most
``failure_threshold + consecutive successes - consecutive failures`` calls in flight, with no
limit once ``failure_threshold`` calls in a row succeeded. So a fresh start (or a recovery)
against a dead upstream costs ``failure_threshold`` requests, not ``forwarder.concurrency``;
only an outage that strikes while a healthy stream is at full concurrency costs up to
``concurrency`` requests before the breaker opens. ``before_call`` ignores the window:
library callers are never refused while closed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from mfo_actors.client.errors import CircuitBreakerError
from mfo_actors.messages import BreakerState, BreakerStateName
from mfo_actors.metrics import BREAKER_STATE, BREAKER_STATE_VALUES
from mfo_actors.observability import get_logger
from mfo_actors.runtime import SystemClock, wait_any

if TYPE_CHECKING:
    from mfo_actors.config import CircuitBreakerConfig
    from mfo_actors.runtime import Clock

__all__ = ["CircuitBreaker"]

_STREAK_CAP = 1 << 30

log = get_logger(__name__)


class CircuitBreaker:
    """One upstream's breaker (implements the client's ``Breaker`` protocol).

    Args:
      upstream: Name of the upstream in logs, errors and the ``mfo_breaker_state`` gauge.
      cfg: ``failure_threshold``, ``reset_timeout``, ``half_open_max_calls``.
      clock: Monotonic time source (a ``FakeClock`` in tests).
      on_change: Called synchronously with the new :class:`BreakerState` on every change;
        must be quick and must not raise (the breaker actor pushes it to a channel).
      instance: The ``instance`` label of the gauge.

    Usage::

        breaker.before_call()            # raises CircuitBreakerError while open
        try:
            response = await send()
        except NetworkError:
            breaker.record(ok=False, failure=True, status=None)
            raise
        breaker.record(ok=response.ok, failure=response.status >= 500, status=response.status)
    """

    def __init__(
        self,
        upstream: str,
        cfg: CircuitBreakerConfig,
        *,
        clock: Clock | None = None,
        on_change: Callable[[BreakerState], None] | None = None,
        instance: str = "default",
    ) -> None:
        self.upstream = upstream
        self._threshold = max(1, cfg.failure_threshold)
        self._reset_timeout = float(cfg.reset_timeout)
        self._max_probes = max(1, cfg.half_open_max_calls)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._on_change = on_change
        self._instance = instance
        self._state: BreakerStateName = "closed"
        self._failures = 0  # consecutive failures while closed
        self._in_flight = 0  # calls let through while closed and not yet recorded
        self._streak = 0  # consecutive successes while closed (widens the in-flight window)
        self._opened_at = 0.0  # monotonic
        self._since_wall = self._clock.now()
        # Monotonic start times of half-open probes not yet recorded. A probe whose caller
        # never reports (cancelled mid-call) is given up after reset_timeout, so a lost
        # record cannot wedge the breaker half-open forever.
        self._probes: list[float] = []
        self._changed: anyio.Event | None = None  # made on first wait: needs a running loop
        self._set_gauge()

    # -- inspection --------------------------------------------------------------------

    @property
    def state(self) -> BreakerStateName:
        """The current state; an open breaker whose timeout passed still reads ``open``
        until the next :meth:`before_call` moves it to half-open."""
        return self._state

    @property
    def failure_threshold(self) -> int:
        return self._threshold

    @property
    def half_open_max_calls(self) -> int:
        return self._max_probes

    def retry_in(self) -> float:
        """Seconds until a call may be let through (0 when one may go now)."""
        if self._state == "open":
            return max(0.0, self._opened_at + self._reset_timeout - self._clock.monotonic())
        if self._state == "half_open":
            self._expire_probes()
            if len(self._probes) >= self._max_probes:
                oldest = min(self._probes)
                return max(0.0, oldest + self._reset_timeout - self._clock.monotonic())
        return 0.0

    def snapshot(self) -> BreakerState:
        """The current state as the message subscribers get."""
        retry_at = None
        if self._state == "open":
            retry_at = self._since_wall + self._reset_timeout
        return BreakerState(
            upstream=self.upstream, state=self._state, since=self._since_wall, retry_at=retry_at
        )

    def allowance(self) -> int | None:
        """How many calls :meth:`wait_until_callable` would let start now; ``None``: no limit.

        0 while open (timeout not yet passed) or while every half-open probe slot is taken.
        """
        if self._state == "open":
            return 1 if self.retry_in() <= 0 else 0
        if self._state == "half_open":
            self._expire_probes()
            return max(0, self._max_probes - len(self._probes))
        if self._failures == 0 and self._streak >= self._threshold:
            return None
        return max(0, self._threshold + self._streak - self._failures - self._in_flight)

    # -- the Breaker protocol ----------------------------------------------------------

    def before_call(self) -> None:
        """Let one call through, or raise at once.

        Raises:
          CircuitBreakerError: the breaker is open (``retry_in`` says for how long), or it is
            half-open and every probe slot is taken.
        """
        if self._state == "closed":
            self._in_flight += 1
            return
        now = self._clock.monotonic()
        if self._state == "open":
            wait = self._opened_at + self._reset_timeout - now
            if wait > 0:
                raise CircuitBreakerError(self.upstream, "open", wait)
            self._transition("half_open")
        self._expire_probes()
        if len(self._probes) >= self._max_probes:
            raise CircuitBreakerError(self.upstream, "half_open", self.retry_in())
        self._probes.append(now)

    def record(self, *, ok: bool, failure: bool, status: int | None = None) -> None:
        """Report the outcome of a call that :meth:`before_call` let through.

        Args:
          ok: The call succeeded.
          failure: The upstream is to blame (network error, timeout, 5xx, 429).
          status: The HTTP status, if an answer arrived (for the log only).
        """
        if self._state == "closed":
            self._in_flight = max(0, self._in_flight - 1)
            if failure:
                self._streak = 0
                self._failures += 1
                if self._failures >= self._threshold:
                    self._open(status)
                    return
            else:
                self._failures = 0
                self._streak = min(self._streak + 1, _STREAK_CAP)
            self._notify_waiters()  # the in-flight window changed (no-op when nobody waits)
            return
        if self._state == "half_open":
            if self._probes:
                self._probes.pop(0)
            if failure:
                self._open(status)
            else:
                self._transition("closed")
            return
        # open: the outcome of a call that started before the breaker opened; the breaker
        # already knows the upstream is failing and its timeout must not be extended.

    def release(self) -> None:
        """Give back the slot of a call :meth:`before_call` let through that ends without an
        outcome (cancelled mid-call, or a local error before any answer): nothing is counted.

        Without this a cancelled call would hold a closed-state in-flight slot for ever, and
        enough of them would make :meth:`wait_until_callable` wait for ever.
        """
        if self._state == "closed":
            if self._in_flight > 0:
                self._in_flight -= 1
                self._notify_waiters()
        elif self._state == "half_open" and self._probes:
            self._probes.pop()
            self._notify_waiters()

    # -- waiting -----------------------------------------------------------------------

    async def wait_until_callable(self) -> None:
        """Sleep until a call would be let through (without taking the slot).

        Returns at once while closed and healthy. While open, sleeps until the reset timeout
        passes; while half-open with every probe out, until a probe reports; while closed with
        recent failures, until fewer calls are in flight than could still open the breaker.
        The caller should call :meth:`before_call` right after (no await in between), and must
        still handle :class:`CircuitBreakerError`: another task may have taken the slot.
        """
        while True:
            allowed = self.allowance()
            if allowed is None or allowed > 0:
                return
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            delay = self.retry_in()
            if self._state == "closed" or delay <= 0:
                await changed.wait()
                continue
            async with anyio.create_task_group() as tg:

                tg.start_soon(_cancel_when_set, changed, tg.cancel_scope)
                await self._clock.sleep(delay)
                tg.cancel_scope.cancel()

    async def wait_callable(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        """:meth:`wait_until_callable` for at most *timeout* seconds (on the breaker's clock);
        True when a call would be let through now."""
        if timeout == math.inf:
            await self.wait_until_callable()
            return True
        await wait_any(self._clock, timeout, self.wait_until_callable)
        allowed = self.allowance()
        return allowed is None or allowed > 0

    def reconfigure(self, cfg: CircuitBreakerConfig) -> None:
        """New thresholds (a reload of ``client.circuit_breaker``), from the next outcome on;
        the state, and an open breaker's timeout already running, are kept."""
        self._threshold = max(1, cfg.failure_threshold)
        self._reset_timeout = float(cfg.reset_timeout)
        self._max_probes = max(1, cfg.half_open_max_calls)
        self._notify_waiters()

    # -- internals ---------------------------------------------------------------------

    def _expire_probes(self) -> None:
        if not self._probes:
            return
        horizon = self._clock.monotonic() - self._reset_timeout
        expired = [t for t in self._probes if t <= horizon]
        if expired:
            self._probes = [t for t in self._probes if t > horizon]
            log.warning("breaker.probe_lost", upstream=self.upstream, count=len(expired))

    def _open(self, status: int | None) -> None:
        self._opened_at = self._clock.monotonic()
        self._probes.clear()
        self._in_flight = 0
        self._failures = 0
        self._transition("open", status=status)

    def _transition(self, state: BreakerStateName, *, status: int | None = None) -> None:
        previous = self._state
        self._state = state
        self._since_wall = self._clock.now()
        if state == "closed":
            self._failures = 0
            self._in_flight = 0
            self._streak = 0
        self._set_gauge()
        log.info(
            "breaker.state_changed",
            upstream=self.upstream,
            state=state,
            previous=previous,
            retry_in=round(self._reset_timeout, 3) if state == "open" else None,
            status=status,
        )
        self._notify_waiters()
        if self._on_change is not None:
            self._on_change(self.snapshot())

    def _set_gauge(self) -> None:
        BREAKER_STATE.labels(instance=self._instance, upstream=self.upstream).set(
            BREAKER_STATE_VALUES[self._state]
        )

    def _notify_waiters(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.upstream!r}, state={self._state!r})"


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
