"""Request metrics of the client: every exchange with the MFO server counted in one place.

:class:`RequestMetrics` labels each call by *endpoint*, the request path with its variable
segments written ``{id}`` (``/api/memory/user-42`` -> ``/api/memory/{id}``), so the number of
series stays small whatever keys and ids the calls carry. It feeds the ``mfo_upstream_*``
metrics of :mod:`mfo_actors.metrics`; label children are cached, so a call costs a dict
lookup per metric instead of prometheus-client's label resolution.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client import Counter, Histogram

from mfo_actors.client.errors import (
    APIError,
    AuthError,
    CircuitBreakerError,
    RetryableError,
    ValidationError,
)
from mfo_actors.metrics import (
    UPSTREAM_CACHE,
    UPSTREAM_ERRORS,
    UPSTREAM_REQUEST_SECONDS,
    UPSTREAM_REQUESTS,
    UPSTREAM_RESPONSE_BYTES,
    UPSTREAM_TOKENS,
)

__all__ = ["RequestMetrics", "endpoint_label", "error_kind"]

# Path segments that name an action, not an object: kept as they are in the label.
_LITERAL_SEGMENTS = frozenset({"stream", "search", "query", "cancel", "login", "thread"})
_TOKEN_KINDS = (("prompt_tokens", "prompt"), ("completion_tokens", "completion"))


def endpoint_label(path: str) -> str:
    """``/api/<group>`` plus ``{id}`` for each variable segment after it."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    out = [p if i < 2 or p in _LITERAL_SEGMENTS else "{id}" for i, p in enumerate(parts)]
    return "/" + "/".join(out)


def error_kind(exc: BaseException) -> str:
    """The ``kind`` label of a failed call (see ``mfo_upstream_errors_total``)."""
    if isinstance(exc, CircuitBreakerError):
        return "circuit_open"
    if isinstance(exc, ValidationError):
        return "validation"
    if isinstance(exc, RetryableError):
        if exc.status is None:
            return "timeout" if isinstance(exc.__cause__, httpx.TimeoutException) else "network"
        if exc.status == 429:
            return "rate_limited"
        if exc.status == 408:
            return "timeout"
        return "server_error"
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, APIError):
        return "client_error"
    return "other"


class RequestMetrics:
    """The ``mfo_upstream_*`` series of one instance (one per client; cheap to share)."""

    __slots__ = ("_children", "instance")

    def __init__(self, instance: str = "default") -> None:
        self.instance = instance
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.instance, *labels)
        return child

    def exchange(self, endpoint: str, status: int | None, seconds: float,
                 size: int | None = None) -> None:
        """One HTTP exchange ended: its status (None: no answer), time and body size."""
        self._child(UPSTREAM_REQUESTS, endpoint,
                    "error" if status is None else str(status)).inc()
        self._child(UPSTREAM_REQUEST_SECONDS, endpoint).observe(seconds)
        if size is not None:
            self._child(UPSTREAM_RESPONSE_BYTES, endpoint).observe(size)

    def error(self, endpoint: str, exc: BaseException) -> None:
        """One call (attempt) failed with *exc*."""
        self._child(UPSTREAM_ERRORS, endpoint, error_kind(exc)).inc()

    def tokens(self, usage: Any) -> None:
        """Count the tokens of a server's ``usage`` object (OpenAI's field names)."""
        if not isinstance(usage, dict):
            return
        for field, kind in _TOKEN_KINDS:
            value = usage.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                self._child(UPSTREAM_TOKENS, kind).inc(value)

    def cache(self, hit: bool) -> None:
        self._child(UPSTREAM_CACHE, "hit" if hit else "miss").inc()
