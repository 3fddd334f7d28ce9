"""Inbound rate limits of the listener: token buckets per route and per client address.

A request over a limit is answered ``429`` with ``Retry-After`` before its body is read, and
nothing is stored. The check runs in the connection's task and never waits: a bucket is a
refill time and a token count, updated on each request (no timer, no task).

Client buckets live in a dict bounded by ``max_clients_tracked``: when it is full, the client
seen least recently is forgotten (it comes back with a full bucket), so a flood of addresses
costs bounded memory. The address is the TCP peer's (an IPv6 peer's /64): behind a proxy
every client is the proxy, and only a per-route limit makes sense there.

A request takes a token from its route's bucket and its client's only when both have one:
one refused by either limit spends nothing of the other.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable

from mfo_actors.config import RateLimitConfig

__all__ = ["ClientLimiter", "RateLimiter", "client_key", "take_both"]


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

    def wait(self) -> float:
        """0.0 if a token is there now, else the seconds until one is (nothing is taken)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        wait = self.wait()
        if not wait:
            self._tokens -= 1.0
        return wait


def take_both(first: RateLimiter | None, second: RateLimiter | None) -> float:
    """Take a token from each bucket given, only if both have one: a request refused by one
    limit spends nothing of the other (a client over its own limit cannot drain its route's
    bucket for everyone else). Returns 0.0, or the seconds until both have a token."""
    wait = max(first.wait() if first is not None else 0.0,
               second.wait() if second is not None else 0.0)
    if not wait:
        if first is not None:
            first.take()
        if second is not None:
            second.take()
    return wait


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

    def bucket(self, client: str) -> RateLimiter:
        """*client*'s bucket (an IPv6 client's is its /64's), marked as seen now."""
        key = client_key(client)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = RateLimiter(self.cfg, clock=self._clock)
            if len(self._buckets) >= self.max_clients:
                del self._buckets[next(iter(self._buckets))]  # dicts keep insertion order
        self._buckets[key] = bucket  # (re)inserted last: the most recently seen
        return bucket

    def take(self, client: str) -> float:
        """Take a token from *client*'s bucket: 0.0, or the seconds until one is there."""
        return self.bucket(client).take()


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """The address a client is limited by: an IPv4 address as it is, an IPv6 one by its /64
    (one host usually holds a whole /64: keyed by full address, it would get a fresh bucket
    per address and could flush everyone else's out of the table)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
