"""Client-side rate limit: one token bucket per upstream, shared by every caller.

The forwarder, the flows and library callers of one instance all draw from the same bucket, so
the upstream sees at most ``requests_per_second`` on average and ``burst`` at once, however the
work is split. Waiters are served first come, first served: an anyio Lock is fair (FIFO), and
the holder sleeps exactly as long as the next token needs, so nobody polls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from mfo_actors.runtime import SystemClock

if TYPE_CHECKING:
    from mfo_actors.runtime import Clock

__all__ = ["TokenBucket"]


class TokenBucket:
    """A token bucket: ``requests_per_second`` tokens a second, at most ``burst`` saved up.

    Implements the client's ``RateLimiter`` protocol (``await acquire()``).

    Args:
      requests_per_second: Refill rate; the long-run average rate of :meth:`acquire`.
      burst: Bucket size: how many calls may go at once after a quiet spell. ``None``
        means 1: calls are spaced ``1 / requests_per_second`` apart, so no window of one
        second ever holds more than ``requests_per_second`` calls.
      clock: Time source (a ``FakeClock`` in tests).

    Raises:
      ValueError: when the rate is not positive or the burst is below 1.
    """

    def __init__(
        self, requests_per_second: float, burst: int | None = None, *, clock: Clock | None = None
    ) -> None:
        if requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        size = burst if burst is not None else 1
        if size < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self._rate = float(requests_per_second)
        self._burst = float(size)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._tokens = self._burst  # start full: a fresh process may send a burst at once
        self._last: float | None = None  # SystemClock's monotonic needs a running loop
        self._lock = anyio.Lock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return int(self._burst)

    def _refill(self) -> None:
        now = self._clock.monotonic()
        if self._last is None:
            self._last = now
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last = now

    def available(self) -> float:
        """Tokens in the bucket now (for tests and statistics)."""
        self._refill()
        return self._tokens

    def try_acquire(self) -> bool:
        """Take a token if one is there without waiting; False otherwise (never blocks).

        Refuses while someone is waiting in :meth:`acquire`, so it cannot jump the queue.
        """
        if self._lock.locked():
            return False
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def acquire(self) -> None:
        """Wait until one more call may go out, then take its token.

        Callers are served in arrival order. A caller cancelled while waiting takes nothing.
        """
        async with self._lock:
            self._refill()
            while self._tokens < 1.0:
                # One computed sleep (more only if the clock jumped backwards or slept short).
                await self._clock.sleep((1.0 - self._tokens) / self._rate)
                self._refill()
            self._tokens -= 1.0
