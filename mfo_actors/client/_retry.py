"""The retry policy for direct library calls: what is retried, how long to wait, how often.

One policy object (:class:`RetryPolicy`) holds every rule; the loop itself is stamina's
(works on asyncio and trio, logs ``stamina.retry_scheduled``), driven by a backoff hook that
returns our own wait: full jitter (AWS architecture blog, "Exponential Backoff and Jitter":
spreads retries of many clients better than added jitter), at least the server's
``Retry-After``. :func:`compute_backoff` is public because the forwarder reuses it for its
durable reschedules.

Rules:

* only :class:`~mfo_actors.client.errors.RetryableError` is retried (network errors,
  timeouts, 408, 429, 5xx); every other 4xx is final;
* POST and PATCH are not idempotent: retried only when they carry an ``Idempotency-Key``;
* at most ``max_attempts`` attempts in all (the first one included).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import stamina

from mfo_actors.client.errors import RetryableError
from mfo_actors.config import RetryConfig
from mfo_actors.observability import get_logger

__all__ = ["IDEMPOTENT_METHODS", "RetryPolicy", "compute_backoff", "is_idempotent"]

T = TypeVar("T")

# RFC 9110 section 9.2.2: these methods may be repeated without changing the outcome.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

log = get_logger(__name__)


def compute_backoff(
    attempt: int,
    cfg: RetryConfig,
    retry_after: float | None = None,
    *,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number *attempt* (1 = the first try failed).

    Full jitter: a uniform draw in ``[0, min(max_backoff, initial * multiplier**(attempt-1))]``.
    A server's ``Retry-After`` is a floor: we never come back sooner than it asked, even if
    that is longer than ``max_backoff``.

    Args:
      attempt: The number of the attempt that just failed, from 1.
      cfg: ``initial_backoff``, ``max_backoff``, ``backoff_multiplier``.
      retry_after: The server's ``Retry-After`` in seconds, if it sent one.
      rng: Source of uniform [0, 1) numbers (tests pass a constant).
    """
    exponent = max(0, attempt - 1)
    try:
        ceiling = cfg.initial_backoff * (cfg.backoff_multiplier ** exponent)
    except OverflowError:
        ceiling = float(cfg.max_backoff)
    ceiling = min(float(cfg.max_backoff), ceiling)
    wait = rng() * ceiling
    if retry_after is not None:
        wait = max(wait, retry_after)
    return wait


def is_idempotent(method: str, *, idempotency_key: str | None = None) -> bool:
    """True when repeating *method* is safe: an idempotent method, or any with a key."""
    return method.upper() in IDEMPOTENT_METHODS or bool(idempotency_key)


class RetryPolicy:
    """When and how long to retry a call to the MFO server.

    Args:
      max_attempts: Attempts in all, the first included (1 = never retry).
      initial_backoff: Ceiling of the first wait, seconds.
      max_backoff: Ceiling of any wait, seconds (``Retry-After`` may exceed it).
      backoff_multiplier: Growth of the ceiling per attempt.
      rng: Uniform [0, 1) source for the jitter.
    """

    def __init__(
        self,
        max_attempts: int = 8,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        backoff_multiplier: float = 2.0,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.config = RetryConfig(
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,  # type: ignore[arg-type]
            max_backoff=max_backoff,  # type: ignore[arg-type]
            backoff_multiplier=backoff_multiplier,
        )
        self._rng = rng

    @classmethod
    def from_config(cls, cfg: RetryConfig, *, rng: Callable[[], float] = random.random
                    ) -> RetryPolicy:
        """The policy an instance config asks for (``client.retry``)."""
        return cls(cfg.max_attempts, cfg.initial_backoff, cfg.max_backoff,
                   cfg.backoff_multiplier, rng=rng)

    @property
    def max_attempts(self) -> int:
        return self.config.max_attempts

    def __repr__(self) -> str:
        c = self.config
        return (f"RetryPolicy(max_attempts={c.max_attempts}, initial_backoff={c.initial_backoff},"
                f" max_backoff={c.max_backoff}, backoff_multiplier={c.backoff_multiplier})")

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait after failed attempt *attempt* (see :func:`compute_backoff`)."""
        return compute_backoff(attempt, self.config, retry_after, rng=self._rng)

    def should_retry(self, exc: BaseException, *, method: str,
                     idempotency_key: str | None = None) -> bool:
        """Whether *exc* from a call with *method* may be retried (attempt budget aside)."""
        return isinstance(exc, RetryableError) and is_idempotent(
            method, idempotency_key=idempotency_key)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        method: str,
        idempotency_key: str | None = None,
        name: str = "mfo",
    ) -> T:
        """Run *fn* until it succeeds, fails for good, or the attempts are spent.

        The last error is re-raised unchanged (a :class:`RetryableError` still carries the
        server's ``retry_after``).
        """
        if self.max_attempts == 1 or not is_idempotent(method, idempotency_key=idempotency_key):
            return await fn()
        failures = 0

        def hook(exc: Exception) -> bool | float:
            nonlocal failures
            if not self.should_retry(exc, method=method, idempotency_key=idempotency_key):
                return False
            failures += 1
            retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
            return self.backoff(failures, retry_after)

        async for attempt in stamina.retry_context(
            on=hook, attempts=self.max_attempts, timeout=None,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover
