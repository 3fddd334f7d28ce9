"""Inbound rate limits of the listener: token buckets per route and per client address.

A request over a limit is answered ``429`` with ``Retry-After`` before its body is read, and
nothing is stored. The check runs in the connection's task and never waits: a bucket is a
refill time and a token count, updated on each request (no timer, no task).

Client buckets live in a dict bounded by ``max_clients_tracked``: when it is full, the client
seen least recently is forgotten (it comes back with a full bucket), so a flood of addresses
costs bounded memory. The address is the TCP peer's: behind a proxy every client is the
proxy, and only a per-route limit makes sense there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mfo_actors.config import RateLimitConfig

__all__ = ["ClientLimiter", "RateLimiter"]


class RateLimiter:
    """One token bucket: ``requests_per_second`` refill, ``burst`` (default one second's worth)
    saved up, starting full.

    Args:
      cfg: The rate and burst.
      clock: Monotonic seconds (``time.monotonic``; tests pass a fake).
    """

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens", "cfg")

    def __init__(self, cfg: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.cfg = cfg
        self._rate = float(cfg.requests_per_second)
        self._burst = float(cfg.burst if cfg.burst is not None
                            else max(1, int(cfg.requests_per_second)))
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        now = self._clock()
        tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate


class ClientLimiter:
    """One :class:`RateLimiter` per client address, at most *max_clients* remembered.

    Args:
      cfg: The limit each client gets.
      max_clients: Addresses whose buckets are kept; the least recently seen goes first.
      clock: Monotonic seconds.
    """

    def __init__(
        self, cfg: RateLimitConfig, *, max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, RateLimiter] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take a token from *client*'s bucket: 0.0, or the seconds until one is there."""
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = RateLimiter(self.cfg, clock=self._clock)
            if len(self._buckets) >= self.max_clients:
                del self._buckets[next(iter(self._buckets))]  # dicts keep insertion order
        self._buckets[client] = bucket  # (re)inserted last: the most recently seen
        return bucket.take()
