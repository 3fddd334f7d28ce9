"""What every part of the reference server shares: its options and counters, the state the
parts read, SLOP's JSON answers and errors, and request decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response

__all__ = [
    "JSON_HEADERS",
    "HTTPError",
    "MockOptions",
    "MockPart",
    "MockStats",
    "allow",
    "decode_json",
    "decode_typed",
    "encode",
    "error_response",
    "iso",
    "json_response",
    "no_store",
]

JSON_HEADERS = [("content-type", "application/json")]
encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class MockOptions:
    """How the reference server behaves; every fault can also be changed at run time."""

    email: str = "demo@example.com"
    password: str = "demo"
    require_auth: bool = True
    token_lifetime: float = 3600.0  # seconds
    fail_rate: float = 0.0  # fraction of /api requests answered fail_status
    fail_status: int = 503
    retry_after: float | None = None  # Retry-After (seconds) on injected failures and outages
    latency: float = 0.0  # seconds added to every /api and /auth request
    outage_for: float = 0.0  # seconds of full outage from start-up
    outage_mode: Literal["503", "close"] = "503"
    malformed: tuple[str, ...] = ()  # path prefixes whose JSON answers are corrupted
    stream_delay: float = 0.0  # seconds between SSE chunks
    job_duration: float = 0.0  # seconds a job stays "active" before "done"
    seed: int | None = None  # for the fail_rate coin (reproducible runs)


class MockStats(msgspec.Struct, kw_only=True):
    """Counters served by ``GET /_mock/stats`` (``requests_by_status`` counts a connection
    dropped by the ``close`` outage mode under ``"dropped"``)."""

    requests: int = 0
    requests_by_status: dict[str, int] = msgspec.field(default_factory=dict)
    events_received: int = 0
    unique_event_ids: int = 0
    duplicates: int = 0
    logins: int = 0
    failed_logins: int = 0
    expired_token_requests: int = 0
    unauthorized_requests: int = 0
    faults_injected: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_disconnected: int = 0  # the client closed the connection before [DONE]
    jobs_created: int = 0
    jobs_cancelled: int = 0
    payments: int = 0


class MockPart:
    """The state every part of :class:`~mfo_actors.mock_server.MockMFOServer` reads; the
    server sets it. Each part keeps its own state, made afresh by its ``_start_*`` method."""

    options: MockOptions  # as constructed
    faults: MockOptions  # as changed at run time
    stats: MockStats
    _clock: Callable[[], float]

    def _revoke_tokens(self) -> None:  # pragma: no cover (abstract)
        """Revoke every token issued so far (the tokens part implements it)."""
        raise NotImplementedError


class HTTPError(Exception):
    """Raised by a route: answered as a SLOP error."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def iso(ts: float) -> str:
    """*ts* as SLOP writes times: ISO 8601, milliseconds, ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def error_response(status: int, code: str, message: str,
                   headers: list[tuple[str, str]] | None = None) -> Response:
    """A SLOP error answer."""
    body = encode(m.ErrorBody(error=m.ErrorDetail(code=code, message=message, status=status)))
    return Response(status, [*JSON_HEADERS, *(headers or [])], body)


def json_response(value: Any, status: int = 200) -> Response:
    """*value* as a JSON answer."""
    return Response(status, list(JSON_HEADERS), encode(value))


def decode_json(request: Request) -> Any:
    """The request's JSON body (None when empty), or 400."""
    if not request.body.strip():
        return None
    try:
        return msgspec.json.decode(request.body)
    except msgspec.DecodeError:
        raise HTTPError(400, "invalid_request", "body is not valid JSON") from None


def decode_typed(request: Request, tp: type[Any]) -> Any:
    """The request's JSON body as *tp*, or 400."""
    try:
        return msgspec.json.decode(request.body or b"null", type=tp)
    except msgspec.DecodeError:
        raise HTTPError(400, "invalid_request", "body is not valid JSON") from None
    except msgspec.ValidationError as exc:
        raise HTTPError(400, "invalid_request", str(exc)) from None


def no_store(response: Response) -> Response:
    """Mark an answer that changes on its own (a job) as not to be cached."""
    response.headers.append(("cache-control", "no-store"))
    return response


def allow(method: str, *allowed: str) -> None:
    """405 unless *method* is one of *allowed*."""
    if method not in allowed:
        raise HTTPError(405, "method_not_allowed", f"use {' or '.join(allowed)}",
                        [("allow", ", ".join(allowed))])
