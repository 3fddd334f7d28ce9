"""The protections of ``client:`` built from config: one implementation for the daemon and
for :meth:`MFOClient.from_config`, so a library caller gets what the daemon gets.

* ``client.rate_limit`` -> a :class:`TokenBucket` (None when not configured);
* ``client.circuit_breaker`` -> a :class:`CircuitBreaker` named after ``client.base_url``;
* ``client.retry`` -> a :class:`RetryPolicy`;
* ``client.cache`` -> a :class:`ResponseCache` (None when not configured: off by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mfo_actors.client._breaker import CircuitBreaker
from mfo_actors.client._cache import ResponseCache
from mfo_actors.client._ratelimit import TokenBucket
from mfo_actors.client._retry import RetryPolicy
from mfo_actors.config import ClientConfig, InstanceConfig
from mfo_actors.messages import BreakerState

if TYPE_CHECKING:
    from mfo_actors.runtime import Clock

__all__ = ["breaker_from_config", "cache_from_config", "rate_limiter_from_config",
           "retry_from_config"]


def rate_limiter_from_config(cfg: ClientConfig, *, clock: Clock | None = None
                             ) -> TokenBucket | None:
    """The token bucket of ``client.rate_limit``, shared by every caller of the upstream."""
    rate = cfg.rate_limit
    if rate is None:
        return None
    return TokenBucket(rate.requests_per_second, rate.burst, clock=clock)


def breaker_from_config(
    cfg: InstanceConfig,
    *,
    clock: Clock | None = None,
    upstream: str | None = None,
    on_change: Callable[[BreakerState], None] | None = None,
) -> CircuitBreaker:
    """The circuit breaker of ``client.circuit_breaker`` for ``client.base_url``."""
    return CircuitBreaker(upstream or cfg.client.base_url, cfg.client.circuit_breaker,
                          clock=clock, on_change=on_change, instance=cfg.instance)


def retry_from_config(cfg: ClientConfig) -> RetryPolicy:
    """The retry policy of ``client.retry`` for direct calls (flows, library callers)."""
    return RetryPolicy.from_config(cfg.retry)


def cache_from_config(cfg: ClientConfig, *, clock: Clock | None = None) -> ResponseCache | None:
    """The GET response cache of ``client.cache``; None (no cache) when not configured."""
    if cfg.cache is None:
        return None
    return ResponseCache.from_config(cfg.cache,
                                     monotonic=clock.monotonic if clock is not None else None)
