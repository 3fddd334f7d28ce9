"""The reference MFO server: SLOP endpoints with in-memory state, login, and fault injection.

A real HTTP server (on the shared HTTP core, httptools) for local development, the demo, the
tests and the benchmarks. It is one handler ``MockMFOServer.handle(Request) -> Response``, put
together from one part per job: ``_tokens.py`` (login, bearer tokens), ``_faults.py`` (fault
injection), and the routes ``_chat.py``, ``_tools.py``, ``_resources.py`` (resources,
memory), ``_jobs.py`` and ``_intake.py`` (events, payments, notifications), over
``_base.py`` (options, counters, JSON answers). This module routes and serves the control
endpoints.

Routes (all JSON; errors are SLOP's ``{"error": {"code", "message", "status"}}``):

* ``POST /auth/login`` ``{"email","password"}`` -> ``{"token","expires_in"}``. Tokens are
  JWT-shaped (``header.payload.signature``, base64url, HMAC-SHA256, claims ``sub``, ``iat``,
  ``exp``, ``jti``); an unknown, forged, revoked or expired token is answered 401.
* ``/api/...``: chat (+ SSE stream), tools, memory, resources, events, jobs, notifications,
  info; see :mod:`mfo_actors.client.models` for the shapes. Bearer auth unless
  ``require_auth=False``.
* ``POST /api/events`` records each event and dedupes by ``Idempotency-Key`` (falling back
  to the body's ``id``): 202 the first time, 200 ``"duplicate": true`` after.
* Chat threads: a ``thread_id`` the server has not seen starts that thread (SLOP's reference
  implementations echo the client's id), so a client may choose it. Answers carry ``usage``
  (words counted as tokens). ``POST /api/chat/stream`` sends one SSE chunk per word,
  ``stream_delay`` seconds apart, the first naming the thread, the last the usage; a client
  that goes away mid-stream is counted in ``streams_disconnected``.
* Jobs move through seed 001's states over time: ``new`` for the first quarter of
  ``job_duration``, ``active`` until it has passed, then ``done`` (result: type and params)
  or ``error`` for a job of type ``fail``. ``POST /api/jobs/{id}/cancel`` ends a job not yet
  finished in ``error`` "cancelled" (409 once finished). Job answers are ``Cache-Control:
  no-store``.
* ``POST /api/resources`` creates a resource; ``POST /api/pay`` records a payment (deduped by
  ``Idempotency-Key``), ``GET /api/pay/{id}`` reads it back.
* Control (never faulted, never authenticated): ``GET|POST /_mock/faults`` (read / change
  faults at run time), ``GET /_mock/stats``, ``GET /_mock/events``, ``GET /_mock/threads``
  (message counts per thread), ``POST /_mock/reset``.

Faults (constructor :class:`MockOptions` or ``POST /_mock/faults`` with the same keys):
``fail_rate`` (fraction of ``/api`` requests answered ``fail_status``, default 503),
``retry_after`` (seconds sent as ``Retry-After`` with injected failures and outages),
``fail_next`` (the next N ``/api`` requests fail, whatever the rate),
``latency`` (seconds added to every ``/api`` and ``/auth`` request), ``outage_for`` (seconds,
from now, of a full outage of ``/api`` and ``/auth``: ``outage_mode`` ``"503"``, or
``"close"``: the response is cut off after its head, which a client sees as a dropped
connection), ``token_lifetime`` (for tokens issued from then on), ``expire_tokens`` (revoke
every token issued so far), ``malformed`` (path prefixes whose JSON answers get their
top-level string values replaced by numbers, to exercise response validation).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import anyio

from mfo_actors import __version__
from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.mock_server._base import (
    HTTPError,
    MockOptions,
    MockStats,
    allow,
    decode_json,
    error_response,
    json_response,
)
from mfo_actors.mock_server._chat import ChatRoutes
from mfo_actors.mock_server._faults import BrokenStream, FaultInjection, corrupt
from mfo_actors.mock_server._intake import IntakeRoutes
from mfo_actors.mock_server._jobs import JobRoutes
from mfo_actors.mock_server._resources import ResourceRoutes
from mfo_actors.mock_server._tokens import TokenAuth
from mfo_actors.mock_server._tools import ToolRoutes
from mfo_actors.observability import get_logger

__all__ = ["MockMFOServer", "MockOptions", "MockStats"]

log = get_logger("mfo_actors.mock_server")

EVENTS_PATH = "/api/events"
EVENTS_LOG_INTERVAL = 1.0  # seconds: at most one mock.events line per interval
_STATUS_KEYS = {status: str(status) for status in range(100, 600)}


def _status_key(status: int) -> str:
    return _STATUS_KEYS.get(status) or str(status)


class _EventsLog:
    """Accepted events are logged as a count, at most once per :data:`EVENTS_LOG_INTERVAL`
    (``mock.events``: ``accepted`` 202s and ``duplicates`` 200s since the last line): a
    structlog line per request cost as much as the route itself, and a benchmark posts
    10,000 a second. Other requests, and refused events, still get a line each."""

    __slots__ = ("_accepted", "_duplicates", "_since")

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._accepted = 0
        self._duplicates = 0

    def count(self, status: int) -> None:
        if status == 202:
            self._accepted += 1
        else:
            self._duplicates += 1
        now = time.monotonic()
        if now - self._since >= EVENTS_LOG_INTERVAL:
            log.info("mock.events", accepted=self._accepted, duplicates=self._duplicates,
                     seconds=round(now - self._since, 1))
            self._since, self._accepted, self._duplicates = now, 0, 0


class MockMFOServer(TokenAuth, FaultInjection, ChatRoutes, ToolRoutes, ResourceRoutes,
                    JobRoutes, IntakeRoutes):
    """The reference MFO server application: ``await server.handle(request)``.

    Args:
      options: Credentials, token lifetime and the initial faults.
      clock: Wall-clock seconds (token expiry, outages, timestamps); tests may pass a fake.
    """

    def __init__(self, options: MockOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.options = options or MockOptions()
        self._clock = clock
        self._start_faults()
        self._start_tokens()
        self._events_log = _EventsLog()
        self._routes: dict[str, Callable[[str, list[str], Request], Awaitable[Response]]] = {
            "info": self._api_info, "chat": self._api_chat, "tools": self._api_tools,
            "memory": self._api_memory, "resources": self._api_resources,
            "events": self._api_events, "jobs": self._api_jobs,
            "notifications": self._api_notifications, "pay": self._api_pay,
        }
        self.reset()

    # --- entry point --------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request, counting its status and logging it (an accepted event is
        counted in the once-a-second ``mock.events`` line instead: see :class:`_EventsLog`)."""
        started = time.perf_counter()
        try:
            response = await self._dispatch(request)
        except HTTPError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        stats = self.stats
        stats.requests += 1
        status = response.status
        key = "dropped" if isinstance(response.stream, BrokenStream) else _status_key(status)
        by_status = stats.requests_by_status
        by_status[key] = by_status.get(key, 0) + 1
        if status < 300 and request.head.path == EVENTS_PATH and key != "dropped":
            self._events_log.count(status)
        else:
            log.info("mock.request", method=request.method, path=request.path,
                     status=status,
                     elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
        return response

    async def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_mock/"):
            return self._control(request)
        if not (path.startswith("/api/") or path == "/api" or path.startswith("/auth/")):
            raise HTTPError(404, "not_found", f"no route for {path}")
        faults = self.faults
        if faults.latency > 0:
            await anyio.sleep(faults.latency)
        outage = self._outage(path)
        if outage is not None:
            return outage
        if path.startswith("/auth/"):
            return self._auth(request)
        failure = self._injected_failure()
        if failure is not None:
            return failure
        if faults.require_auth:
            self._check_token(request)
        response = await self._api(request)
        if faults.malformed and response.stream is None and response.status < 400 and any(
                path.startswith(prefix) for prefix in faults.malformed):
            response.body = corrupt(response.body)
        return response

    # --- control ------------------------------------------------------------------------------

    def _control(self, request: Request) -> Response:
        path, method = request.path.rstrip("/"), request.method
        if path == "/_mock/stats" and method == "GET":
            return json_response(self.stats)
        if path == "/_mock/events" and method == "GET":
            return json_response({"events": [
                {"id": e.id, "idempotency_key": e.key, "received_at": e.received_at,
                 "count": e.count, "headers": e.headers, "body": e.body}
                for e in self._event_log]})
        if path == "/_mock/threads" and method == "GET":
            return json_response({"threads": self.threads})
        if path == "/_mock/faults" and method == "GET":
            return json_response(self._fault_view())
        if path == "/_mock/faults" and method == "POST":
            body = decode_json(request)
            if not isinstance(body, dict):
                raise HTTPError(400, "invalid_request", "faults must be a JSON object")
            self.set_faults(**body)
            return json_response(self._fault_view())
        if path == "/_mock/reset" and method == "POST":
            self.reset()
            return json_response({"status": "reset"})
        raise HTTPError(404, "not_found", f"no route for {method} {request.path}")

    def reset(self) -> None:
        """Forget every event, chat, memory entry, job and counter (tokens stay valid)."""
        self.stats = MockStats()
        self._start_chat()
        self._start_resources()
        self._start_jobs()
        self._start_intake()

    # --- the SLOP API -------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        path = request.path
        if path == EVENTS_PATH:  # the hot route: no split, no unquoting, no await
            return self._post_event(request.method, request)
        parts = [unquote(p) for p in path.removeprefix("/api").strip("/").split("/")]
        handler = self._routes.get(parts[0])
        if handler is None:
            raise HTTPError(404, "not_found", f"no endpoint /api/{parts[0]}")
        return await handler(request.method, parts[1:], request)

    async def _api_info(self, method: str, rest: list[str], request: Request) -> Response:
        allow(method, "GET")
        if rest:
            raise HTTPError(404, "not_found", "no such endpoint")
        endpoints = [
            m.InfoEndpoint(path="/api/chat", methods=["GET", "POST"], description="Chat"),
            m.InfoEndpoint(path="/api/chat/stream", methods=["POST"],
                           description="Chat, streamed over SSE"),
            m.InfoEndpoint(path="/api/tools", methods=["GET", "POST"], description="Tools"),
            m.InfoEndpoint(path="/api/memory", methods=["GET", "POST", "PUT", "DELETE"],
                           description="Key-value memory"),
            m.InfoEndpoint(path="/api/resources", methods=["GET", "POST"],
                           description="Resources"),
            m.InfoEndpoint(path="/api/pay", methods=["GET", "POST"], description="Payments"),
            m.InfoEndpoint(path="/api/events", methods=["POST"],
                           description="Event intake, deduplicated by Idempotency-Key"),
            m.InfoEndpoint(path="/api/jobs", methods=["GET", "POST"], description="Jobs"),
            m.InfoEndpoint(path="/api/notifications", methods=["GET", "POST"],
                           description="Notifications"),
        ]
        return json_response(m.Info(
            name="mfo-mock", version=__version__,
            description="Reference MFO (SLOP) server of mfo-actors, with fault injection",
            endpoints=endpoints,
            capabilities={"streaming": True, "websockets": False, "events": True,
                          "auth": self.faults.require_auth, "models": ["echo"]},
            links={"slop": "https://github.com/agnt-gg/slop"},
        ))
