"""The client's error tree, and the one place that turns HTTP outcomes into it.

::

    MFOError                      (mfo_actors.errors: root of everything we raise on purpose)
    └── ClientError               anything the MFO client raises
        ├── APIError              the server answered with an error status (4xx): our request
        │   │                     was wrong; parsed from SLOP's {"error": {code, message, status}}
        │   └── AuthError         401/403 (after the one re-login): credentials are wrong/expired
        ├── ValidationError       a request or response does not match its model: names the field
        ├── RetryableError        the server or network failed (timeouts, 408, 429, 5xx); trying
        │                         again later may work; carries the server's Retry-After
        └── CircuitBreakerError   the breaker for this upstream is open: we did not even try

:func:`classify_response` and :func:`classify_transport_error` are the only places that
decide which of these an outcome is, so the base client, the login provider and the
forwarder all agree.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from mfo_actors.errors import MFOError

__all__ = [
    "APIError",
    "AuthError",
    "CircuitBreakerError",
    "ClientError",
    "RetryableError",
    "ValidationError",
    "classify_response",
    "classify_transport_error",
    "is_upstream_failure",
    "parse_retry_after",
]

RETRYABLE_STATUSES = frozenset({408, 429})  # plus every 5xx
_BODY_SNIPPET = 200  # characters of a non-JSON error body kept in the message


class ClientError(MFOError):
    """Root of the errors raised by the MFO API client."""


class APIError(ClientError):
    """The MFO server rejected the request (an error status that retrying will not fix).

    Args:
      status: The HTTP status code.
      code: SLOP's machine-readable error code (``invalid_request``, ``not_found`` ...);
        ``http_<status>`` when the body was not a SLOP error.
      message: The server's human-readable message.
      details: Anything else the error object carried.
    """

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(f"{status} {code}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.code, self.message, self.details))


class AuthError(APIError):
    """401 or 403: the credentials are wrong, or a fresh login did not help."""


class ValidationError(ClientError):
    """A request or response body does not match its model.

    Args:
      message: What did not match (msgspec's words).
      field: The dotted path of the offending field (``message.content``), or ``None``
        when the whole body is wrong (not JSON, not an object).
      direction: ``"response"`` (the server sent it) or ``"request"`` (we were about to).
    """

    def __init__(self, message: str, *, field: str | None, direction: str = "response") -> None:
        self.message = message
        self.field = field
        self.direction = direction
        where = f" (field {field!r})" if field else ""
        super().__init__(f"invalid {direction} body{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_validation_error, (self.message, self.field, self.direction))

    @classmethod
    def from_msgspec(
        cls, exc: msgspec.ValidationError | msgspec.DecodeError, *, direction: str = "response"
    ) -> ValidationError:
        """Convert msgspec's error, whose text ends in ``- at `$.a.b[0]```, naming the field."""
        text = str(exc)
        field: str | None = None
        marker = " - at `$"
        if marker in text:
            text, _, path = text.rpartition(marker)
            field = path.rstrip("`").lstrip(".") or None
        missing = "Object missing required field `"
        if text.startswith(missing):
            name = text[len(missing):].rstrip("`")
            field = f"{field}.{name}" if field else name
        return cls(text, field=field, direction=direction)


def _rebuild_validation_error(message: str, field: str | None, direction: str) -> ValidationError:
    return ValidationError(message, field=field, direction=direction)


class RetryableError(ClientError):
    """The call failed in a way that may pass later: network error, timeout, 408, 429, 5xx.

    Args:
      message: What happened.
      status: The HTTP status, or ``None`` for a network error or timeout.
      retry_after: Seconds the server asked us to wait (``Retry-After``), if it said.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.message = message
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_retryable, (self.message, self.status, self.retry_after))


def _rebuild_retryable(message: str, status: int | None, retry_after: float | None
                       ) -> RetryableError:
    return RetryableError(message, status=status, retry_after=retry_after)


class CircuitBreakerError(ClientError):
    """The breaker of *upstream* is not letting calls through; nothing was sent.

    Args:
      upstream: The upstream's name (its base URL or configured name).
      state: The breaker state (``open`` or ``half_open`` when the probe slot is taken).
      retry_in: Seconds until the breaker lets a probe call through.
    """

    def __init__(self, upstream: str, state: str, retry_in: float) -> None:
        self.upstream = upstream
        self.state = state
        self.retry_in = retry_in
        super().__init__(f"circuit breaker for {upstream} is {state}; "
                         f"next probe in {retry_in:.1f}s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.upstream, self.state, self.retry_in))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    Returns ``None`` when the header is absent or unreadable, and never a negative number
    (a date in the past means "now").
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            return None  # NaN or inf is unreadable (inf would park an event for ever)
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is taken as such
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, val in headers.items():
        if key.lower() == lower:
            return val
    return None


def _parse_error_body(status: int, body: bytes) -> tuple[str, str, dict[str, Any]]:
    """(code, message, details) from a SLOP error body, or a fallback for anything else."""
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = err.get("message")
            details = {k: v for k, v in err.items() if k not in ("code", "message", "status")}
            if isinstance(err.get("details"), dict):
                details = {**details, **err["details"]}
                details.pop("details", None)
            return (
                str(code) if code else f"http_{status}",
                str(message) if message else _reason(status),
                details,
            )
        if isinstance(err, str):  # some servers send {"error": "text"}
            rest = {k: v for k, v in data.items() if k != "error"}
            return f"http_{status}", err, rest
    text = body.decode("utf-8", "replace").strip()
    if len(text) > _BODY_SNIPPET:
        text = text[:_BODY_SNIPPET] + "..."
    return f"http_{status}", text or _reason(status), {}


def _reason(status: int) -> str:
    try:
        return httpx.codes.get_reason_phrase(status) or f"HTTP {status}"
    except ValueError:
        return f"HTTP {status}"


def classify_response(status: int, headers: Mapping[str, str], body: bytes) -> MFOError | None:
    """Decide what an HTTP answer means: ``None`` for success, else the error to raise.

    * 2xx: ``None``. Only a 2xx is a success (a delivery, for the forwarder).
    * 1xx, 3xx: :class:`RetryableError` naming the status and the ``Location``. A redirect
      (an http->https one at a load balancer, say) is never followed to another host, and
      never taken for a delivery: the event is retried, and dead-lettered with the status
      and the Location in its error once its attempts run out.
    * 401, 403: :class:`AuthError` (the caller decides whether a re-login is worth it).
    * 408, 429, 5xx: :class:`RetryableError` with the ``Retry-After`` delay when sent.
    * any other 4xx: :class:`APIError`.
    """
    if 200 <= status < 300:
        return None
    if status < 400:
        location = _header(headers, "location")
        where = f" to {location[:_BODY_SNIPPET]}" if location else ""
        return RetryableError(
            f"{status} {_reason(status)}{where} (Location: {location or '-'}; redirects are "
            "not followed, only a 2xx is a success: check client.base_url)",
            status=status)
    code, message, details = _parse_error_body(status, body)
    if status in RETRYABLE_STATUSES or status >= 500:
        retry_after = parse_retry_after(_header(headers, "retry-after"))
        return RetryableError(f"{status} {code}: {message}", status=status,
                              retry_after=retry_after)
    if status in (401, 403):
        return AuthError(status, code, message, details)
    return APIError(status, code, message, details)


def is_upstream_failure(error: BaseException | None) -> bool:
    """Whether *error* is the upstream's fault (no answer, timeout, 408, 429, 5xx): what the
    circuit breaker counts. An answer that says the request was wrong (4xx) or elsewhere
    (3xx) proves the upstream is up."""
    if not isinstance(error, RetryableError):
        return False
    status = error.status
    return status is None or status >= 500 or status in RETRYABLE_STATUSES


def classify_transport_error(exc: BaseException) -> RetryableError:
    """Turn a network failure (httpx transport error, OSError) into a :class:`RetryableError`."""
    if isinstance(exc, httpx.TimeoutException):
        kind = "timeout"
    elif isinstance(exc, httpx.ConnectError):
        kind = "connection failed"
    elif isinstance(exc, httpx.RemoteProtocolError):
        kind = "connection closed by server"
    elif isinstance(exc, httpx.TransportError | OSError):
        kind = "network error"
    else:
        kind = "transport error"
    detail = str(exc) or type(exc).__name__
    err = RetryableError(f"{kind}: {detail}", status=None, retry_after=None)
    err.__cause__ = exc
    return err
