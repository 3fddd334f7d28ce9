"""Optional hooks the base client calls around every attempt: a circuit breaker, a rate limiter.

They are protocols so the client does not depend on their implementations (the breaker actor
and the token bucket live elsewhere); ``None`` means "no breaker" / "no limit".
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

__all__ = ["Breaker", "RateLimiter"]


@runtime_checkable
class Breaker(Protocol):
    """One upstream's circuit breaker, as the client sees it."""

    def before_call(self) -> None:
        """Let the call through, or raise :class:`~mfo_actors.client.errors.CircuitBreakerError`."""
        ...

    def record(self, *, ok: bool, failure: bool, status: int | None) -> None:
        """Report an attempt's outcome.

        Args:
          ok: The call succeeded (2xx/3xx).
          failure: The call counts against the upstream: network error, timeout, 5xx, 429.
            A 4xx other than 429 is the caller's fault: ``ok=False, failure=False``.
          status: The HTTP status, ``None`` when no answer arrived.
        """
        ...

    def release(self) -> None:
        """Give back the slot of a call that ends without an outcome (cancelled)."""
        ...

    def allowance(self) -> int | None:
        """Calls that would be let through now (None: no limit)."""
        ...

    async def wait_callable(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        """Wait up to *timeout* seconds until a call would be let through."""
        ...


@runtime_checkable
class RateLimiter(Protocol):
    """Client-side rate limit shared by every caller of one upstream."""

    async def acquire(self) -> None:
        """Wait until one more request may be sent."""
        ...
