"""The reference MFO server: SLOP endpoints with in-memory state, login, and fault injection.

A real HTTP server (on the shared HTTP core, httptools) for local development, the demo, the
tests and the benchmarks. It is one handler ``MockMFOServer.handle(Request) -> Response``.

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

import ast
import base64
import hashlib
import hmac
import json
import math
import operator
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, unquote

import anyio
import msgspec

from mfo_actors import __version__
from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.observability import get_logger

__all__ = ["MockMFOServer", "MockOptions", "MockStats"]

log = get_logger("mfo_actors.mock_server")

_JSON_HEADERS = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode


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


_FAULT_KEYS = frozenset({
    "fail_rate", "fail_status", "retry_after", "latency", "outage_mode", "malformed",
    "token_lifetime", "stream_delay", "job_duration", "require_auth",
})


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


@dataclass(slots=True)
class _Event:
    key: str
    id: str
    received_at: float
    body: Any
    headers: dict[str, str]
    count: int = 1


@dataclass(slots=True)
class _Thread:
    id: str
    created_at: str
    updated_at: str
    messages: list[m.ChatMessage] = field(default_factory=list)
    title: str | None = None


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def error_response(status: int, code: str, message: str,
                   headers: list[tuple[str, str]] | None = None) -> Response:
    """A SLOP error answer."""
    body = _encode(m.ErrorBody(error=m.ErrorDetail(code=code, message=message, status=status)))
    return Response(status, [*_JSON_HEADERS, *(headers or [])], body)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, list(_JSON_HEADERS), _encode(value))


_RESOURCES: tuple[m.Resource, ...] = (
    m.Resource(id="mars-101", title="Mars: The Red Planet", type="article",
               content="Mars is the fourth planet from the Sun.",
               metadata={"source": "astronomy-db"}, created_at="2025-05-13T10:30:00.000Z"),
    m.Resource(id="solar-system", title="Our Solar System", type="article",
               content="The Solar System is the Sun and the objects that orbit it, Mars too.",
               metadata={"source": "astronomy-db"}, created_at="2025-05-13T10:30:00.000Z"),
    m.Resource(id="weather-api", title="Weather API Documentation", type="document",
               content="The Weather API provides current weather data.",
               created_at="2025-05-13T10:30:00.000Z"),
)

_TOOLS: tuple[m.Tool, ...] = (
    m.Tool(id="echo", description="Returns its parameters unchanged",
           parameters={"text": {"type": "string", "description": "Anything"}}),
    m.Tool(id="calculator", description="Evaluates an arithmetic expression",
           parameters={"expression": {"type": "string", "description": "e.g. 15 * 7"}},
           example="15 * 7"),
    m.Tool(id="uppercase", description="Upper-cases a text",
           parameters={"text": {"type": "string", "description": "The text"}}),
)

_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _calculate(expression: str) -> float | int:
    """Arithmetic on numbers only (no names, no calls): safe to run on any input."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** are allowed")

    if len(expression) > 200:
        raise ValueError("expression too long")
    result = ev(ast.parse(expression, mode="eval"))
    if isinstance(result, float) and result.is_integer():
        return int(result)
    return result  # type: ignore[no-any-return]


def _corrupt(body: bytes) -> bytes:
    """Replace the top-level string values of a JSON object by numbers (the malformed fault)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if isinstance(data, dict):
        data = {k: (12345 if isinstance(v, str) else v) for k, v in data.items()}
    return _encode(data)


class MockMFOServer:
    """The reference MFO server application: ``await server.handle(request)``.

    Args:
      options: Credentials, token lifetime and the initial faults.
      clock: Wall-clock seconds (token expiry, outages, timestamps); tests may pass a fake.
    """

    def __init__(self, options: MockOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.options = options or MockOptions()
        self._clock = clock
        self._rng = random.Random(self.options.seed)
        self._secret = secrets.token_bytes(32)
        self.faults = self.options
        self._outage_until = clock() + self.options.outage_for if self.options.outage_for else 0.0
        self._fail_next = 0  # the next N /api requests fail (deterministic, for tests)
        self.stats = MockStats()
        self._tokens: dict[str, float] = {}  # jti -> exp
        self._events: dict[str, _Event] = {}
        self._event_log: list[_Event] = []
        self._threads: dict[str, _Thread] = {}
        self._chats: dict[str, m.Chat] = {}
        self._memory: dict[str, m.MemoryItem] = {}
        self._jobs: dict[str, tuple[m.Job, float]] = {}
        self._cancelled: dict[str, float] = {}  # job id -> when it was cancelled
        self._notifications: list[m.Notification] = []
        self._resources: dict[str, m.Resource] = {r.id: r for r in _RESOURCES}
        self._payments: dict[str, m.Payment] = {}
        self._payment_keys: dict[str, str] = {}  # Idempotency-Key -> transaction id

    # --- entry point --------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request, logging it and counting its status."""
        started = time.perf_counter()
        try:
            response = await self._dispatch(request)
        except _HTTPError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        self.stats.requests += 1
        key = "dropped" if isinstance(response.stream, _BrokenStream) else str(response.status)
        self.stats.requests_by_status[key] = self.stats.requests_by_status.get(key, 0) + 1
        log.info("mock.request", method=request.method, path=request.path,
                 status=response.status,
                 elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
        return response

    async def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_mock/"):
            return self._control(request)
        if not (path.startswith("/api/") or path == "/api" or path.startswith("/auth/")):
            raise _HTTPError(404, "not_found", f"no route for {path}")
        faults = self.faults
        if faults.latency > 0:
            await anyio.sleep(faults.latency)
        outage = self._outage(path)
        if outage is not None:
            return outage
        if path.startswith("/auth/"):
            return self._auth(request)
        if self._fail_next > 0 or (faults.fail_rate > 0 and self._rng.random() < faults.fail_rate):
            self._fail_next = max(0, self._fail_next - 1)
            self.stats.faults_injected += 1
            return error_response(faults.fail_status, "injected_failure",
                                  "failure injected by the mock server", self._retry_after())
        if faults.require_auth:
            self._check_token(request)
        response = await self._api(request)
        if faults.malformed and response.stream is None and response.status < 400 and any(
                path.startswith(prefix) for prefix in faults.malformed):
            response.body = _corrupt(response.body)
        return response

    def _retry_after(self, seconds: float | None = None) -> list[tuple[str, str]]:
        value = self.faults.retry_after if seconds is None else seconds
        if value is None:
            return []
        return [("retry-after", str(max(0, math.ceil(value))))]

    def _outage(self, path: str) -> Response | None:
        now = self._clock()
        if now >= self._outage_until:
            return None
        self.stats.faults_injected += 1
        if self.faults.outage_mode == "close":
            return Response(200, list(_JSON_HEADERS), stream=_BrokenStream())
        # Retry-After only when configured, so tests control the client's waits exactly.
        return error_response(503, "outage", "the server is down (injected outage)",
                              self._retry_after())

    # --- auth ---------------------------------------------------------------------------------

    def _auth(self, request: Request) -> Response:
        if request.path.rstrip("/") != "/auth/login":
            raise _HTTPError(404, "not_found", f"no route for {request.path}")
        if request.method != "POST":
            raise _HTTPError(405, "method_not_allowed", "use POST")
        try:
            login = msgspec.json.decode(request.body, type=m.LoginRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _HTTPError(400, "invalid_request", f"invalid login body: {exc}") from None
        if not (hmac.compare_digest(login.email, self.options.email)
                and hmac.compare_digest(login.password, self.options.password)):
            self.stats.failed_logins += 1
            raise _HTTPError(401, "invalid_credentials", "wrong email or password")
        self.stats.logins += 1
        token, lifetime = self.issue_token(login.email)
        return _json(m.LoginResponse(token=token, expires_in=lifetime))

    def issue_token(self, subject: str) -> tuple[str, float]:
        """A signed JWT-shaped token for *subject*, valid for the current ``token_lifetime``."""
        now = self._clock()
        lifetime = float(self.faults.token_lifetime)
        jti = new_id()
        exp = round(now + lifetime, 3)
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64(_encode({"sub": subject, "iat": round(now, 3), "exp": exp, "jti": jti}))
        signing_input = f"{header}.{payload}".encode("ascii")
        sig = _b64(hmac.new(self._secret, signing_input, hashlib.sha256).digest())
        self._tokens[jti] = exp
        return f"{header}.{payload}.{sig}", lifetime

    def _check_token(self, request: Request) -> None:
        value = request.header("authorization")
        if not value:
            self.stats.unauthorized_requests += 1
            raise _HTTPError(401, "unauthorized", "missing bearer token",
                             [("www-authenticate", "Bearer")])
        scheme, _, token = value.partition(" ")
        parts = token.strip().split(".")
        claims: Any = None
        if scheme.lower() == "bearer" and len(parts) == 3:
            expected = _b64(hmac.new(self._secret, f"{parts[0]}.{parts[1]}".encode("ascii"),
                                     hashlib.sha256).digest())
            if hmac.compare_digest(expected, parts[2]):
                try:
                    claims = msgspec.json.decode(_unb64(parts[1]))
                except (ValueError, msgspec.DecodeError):
                    claims = None
        jti = claims.get("jti") if isinstance(claims, dict) else None
        if not isinstance(jti, str) or jti not in self._tokens:
            self.stats.unauthorized_requests += 1
            raise _HTTPError(401, "invalid_token", "unknown or invalid token",
                             [("www-authenticate", 'Bearer error="invalid_token"')])
        if self._clock() >= self._tokens[jti]:
            self.stats.expired_token_requests += 1
            self.stats.unauthorized_requests += 1
            raise _HTTPError(401, "token_expired", "the token has expired",
                             [("www-authenticate", 'Bearer error="invalid_token"')])

    # --- control ------------------------------------------------------------------------------

    def _control(self, request: Request) -> Response:
        path, method = request.path.rstrip("/"), request.method
        if path == "/_mock/stats" and method == "GET":
            return _json(self.stats)
        if path == "/_mock/events" and method == "GET":
            return _json({"events": [
                {"id": e.id, "idempotency_key": e.key, "received_at": e.received_at,
                 "count": e.count, "headers": e.headers, "body": e.body}
                for e in self._event_log]})
        if path == "/_mock/threads" and method == "GET":
            return _json({"threads": self.threads})
        if path == "/_mock/faults" and method == "GET":
            return _json(self._fault_view())
        if path == "/_mock/faults" and method == "POST":
            body = self._body(request)
            if not isinstance(body, dict):
                raise _HTTPError(400, "invalid_request", "faults must be a JSON object")
            self.set_faults(**body)
            return _json(self._fault_view())
        if path == "/_mock/reset" and method == "POST":
            self.reset()
            return _json({"status": "reset"})
        raise _HTTPError(404, "not_found", f"no route for {method} {request.path}")

    def _fault_view(self) -> dict[str, Any]:
        view = {f.name: getattr(self.faults, f.name) for f in fields(MockOptions)
                if f.name in _FAULT_KEYS}
        view["malformed"] = list(self.faults.malformed)
        view["fail_next"] = self._fail_next
        view["outage_remaining"] = round(max(0.0, self._outage_until - self._clock()), 3)
        return view

    def set_faults(self, **changes: Any) -> None:
        """Change faults at run time (the keys of ``POST /_mock/faults``).

        Also ``fail_next`` (the next N ``/api`` requests fail with ``fail_status``),
        ``outage_for`` (seconds of outage from now; 0 ends one), ``expire_tokens``
        (revoke every token issued so far) and ``reset`` (back to the start-up options).
        """
        if changes.pop("reset", False):
            self.faults = self.options
            self._outage_until = 0.0
            self._fail_next = 0
        if changes.pop("expire_tokens", False):
            now = self._clock()
            self._tokens = dict.fromkeys(self._tokens, now)
        if "fail_next" in changes:
            count = changes.pop("fail_next")
            if not isinstance(count, int) or count < 0:
                raise _HTTPError(400, "invalid_request", "fail_next must be an integer >= 0")
            self._fail_next = count
        if "outage_for" in changes:
            seconds = changes.pop("outage_for")
            if not isinstance(seconds, int | float) or seconds < 0:
                raise _HTTPError(400, "invalid_request", "outage_for must be seconds >= 0")
            self._outage_until = self._clock() + float(seconds)
        unknown = set(changes) - _FAULT_KEYS
        if unknown:
            raise _HTTPError(400, "invalid_request", f"unknown fault keys: {sorted(unknown)}")
        if "outage_mode" in changes:
            changes["outage_mode"] = str(changes["outage_mode"])
        if "malformed" in changes:
            value = changes["malformed"]
            changes["malformed"] = (value,) if isinstance(value, str) else tuple(value or ())
        try:
            updated = replace(self.faults, **changes)
            _check_faults(updated)
        except (TypeError, ValueError) as exc:
            raise _HTTPError(400, "invalid_request", str(exc)) from None
        self.faults = updated
        log.info("mock.faults_changed", **{k: v for k, v in changes.items()})

    def reset(self) -> None:
        """Forget every event, chat, memory entry, job and counter (tokens stay valid)."""
        self.stats = MockStats()
        self._events.clear()
        self._event_log.clear()
        self._threads.clear()
        self._chats.clear()
        self._memory.clear()
        self._jobs.clear()
        self._cancelled.clear()
        self._notifications.clear()
        self._resources = {r.id: r for r in _RESOURCES}
        self._payments.clear()
        self._payment_keys.clear()

    @property
    def threads(self) -> dict[str, dict[str, int]]:
        """Per thread: how many messages, and how many from the user (for tests)."""
        return {t.id: {"messages": len(t.messages),
                       "user_messages": sum(1 for msg in t.messages if msg.role == "user")}
                for t in self._threads.values()}

    @property
    def events(self) -> list[dict[str, Any]]:
        """The unique events received, in arrival order (for in-process tests)."""
        return [{"id": e.id, "idempotency_key": e.key, "count": e.count, "body": e.body}
                for e in self._event_log]

    # --- the SLOP API -------------------------------------------------------------------------

    @staticmethod
    def _body(request: Request) -> Any:
        if not request.body.strip():
            return None
        try:
            return msgspec.json.decode(request.body)
        except msgspec.DecodeError:
            raise _HTTPError(400, "invalid_request", "body is not valid JSON") from None

    @staticmethod
    def _typed(request: Request, tp: type[Any]) -> Any:
        try:
            return msgspec.json.decode(request.body or b"null", type=tp)
        except msgspec.DecodeError:
            raise _HTTPError(400, "invalid_request", "body is not valid JSON") from None
        except msgspec.ValidationError as exc:
            raise _HTTPError(400, "invalid_request", str(exc)) from None

    async def _api(self, request: Request) -> Response:
        parts = [unquote(p) for p in request.path.removeprefix("/api").strip("/").split("/")]
        method = request.method
        group, rest = parts[0], parts[1:]
        handler = {
            "info": self._api_info, "chat": self._api_chat, "tools": self._api_tools,
            "memory": self._api_memory, "resources": self._api_resources,
            "events": self._api_events, "jobs": self._api_jobs,
            "notifications": self._api_notifications, "pay": self._api_pay,
        }.get(group)
        if handler is None:
            raise _HTTPError(404, "not_found", f"no endpoint /api/{group}")
        return await handler(method, rest, request)

    async def _api_info(self, method: str, rest: list[str], request: Request) -> Response:
        _allow(method, "GET")
        if rest:
            raise _HTTPError(404, "not_found", "no such endpoint")
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
        return _json(m.Info(
            name="mfo-mock", version=__version__,
            description="Reference MFO (SLOP) server of mfo-actors, with fault injection",
            endpoints=endpoints,
            capabilities={"streaming": True, "websockets": False, "events": True,
                          "auth": self.faults.require_auth, "models": ["echo"]},
            links={"slop": "https://github.com/agnt-gg/slop"},
        ))

    # chat ---------------------------------------------------------------------------------

    def _reply_to(self, chat: m.ChatRequest) -> tuple[_Thread, str, m.ChatMessage, str]:
        if not chat.messages:
            raise _HTTPError(400, "invalid_request", "Missing required field: messages")
        now = self._clock()
        stamp = _iso(now)
        if chat.thread_id:
            thread = self._threads.get(chat.thread_id)
            if thread is None:
                thread = self._threads[chat.thread_id] = _Thread(chat.thread_id, stamp, stamp)
        else:
            tid = f"thread_{new_id()}"
            thread = self._threads[tid] = _Thread(tid, stamp, stamp)
        users = [msg for msg in chat.messages if msg.role == "user"]
        said = users[-1].content if users else chat.messages[-1].content
        if thread.title is None:
            thread.title = said[:40]
        for msg in chat.messages:
            thread.messages.append(m.ChatMessage(role=msg.role, content=msg.content,
                                                 id=f"msg_{new_id()}", created_at=stamp))
        reply = m.ChatMessage(role="assistant", content=f"You said: {said}",
                              id=f"msg_{new_id()}", created_at=stamp)
        thread.messages.append(reply)
        thread.updated_at = stamp
        chat_id = f"chat_{new_id()}"
        self._chats[chat_id] = m.Chat(id=chat_id, messages=[*chat.messages, reply],
                                      thread_id=thread.id, model=chat.model or "echo",
                                      created_at=stamp)
        return thread, chat_id, reply, said

    async def _api_chat(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            if method == "GET":
                chats = [m.ChatSummary(id=c.id, snippet=c.messages[0].content[:80],
                                       created_at=c.created_at) for c in self._chats.values()]
                return _json(m.ChatList(chats=chats[::-1]))
            _allow(method, "POST")
            chat = self._typed(request, m.ChatRequest)
            thread, chat_id, reply, said = self._reply_to(chat)
            return _json({"id": chat_id, "message": reply, "thread_id": thread.id,
                          "message_id": reply.id, "model": chat.model or "echo",
                          "usage": _usage(said, reply.content)})
        if rest == ["stream"]:
            _allow(method, "POST")
            chat = self._typed(request, m.ChatRequest)
            thread, _, reply, said = self._reply_to(chat)
            return Response(200, [("content-type", "text/event-stream"),
                                  ("cache-control", "no-cache")],
                            stream=self._sse(reply.content, thread.id,
                                             _usage(said, reply.content)))
        if len(rest) == 1:
            _allow(method, "GET")
            key = rest[0]
            if key.startswith("thread_"):
                t = self._threads.get(key)
                if t is None:
                    raise _HTTPError(404, "not_found", f"no thread {key}")
                return _json(m.Thread(thread_id=t.id, messages=t.messages, title=t.title,
                                      created_at=t.created_at, updated_at=t.updated_at))
            found = self._chats.get(key)
            if found is None:
                raise _HTTPError(404, "not_found", f"no chat {key}")
            return _json(found)
        raise _HTTPError(404, "not_found", "no such chat endpoint")

    async def _sse(self, text: str, thread_id: str, usage: dict[str, int]
                   ) -> AsyncIterator[bytes]:
        delay = self.faults.stream_delay
        self.stats.streams_started += 1
        finished = False
        try:
            yield b": mfo-mock stream\n\n"  # a comment, as keep-alives are sent
            words = text.split(" ")
            for i, word in enumerate(words):
                chunk: dict[str, Any] = {"content": word if i == 0 else " " + word}
                if i == 0:
                    chunk["thread_id"] = thread_id
                yield b"event: message\ndata: " + _encode(chunk) + b"\n\n"
                if delay:
                    await anyio.sleep(delay)
            yield b"data: " + _encode({"usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            # The HTTP core closes this generator early when the client goes away.
            if finished:
                self.stats.streams_completed += 1
            else:
                self.stats.streams_disconnected += 1
                log.info("mock.stream_disconnected", thread_id=thread_id)

    # tools --------------------------------------------------------------------------------

    async def _api_tools(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            _allow(method, "GET")
            return _json(m.ToolList(tools=list(_TOOLS)))
        if len(rest) != 1:
            raise _HTTPError(404, "not_found", "no such tools endpoint")
        tool = next((t for t in _TOOLS if t.id == rest[0]), None)
        if tool is None:
            raise _HTTPError(404, "not_found", f"no tool {rest[0]}")
        if method == "GET":
            return _json(tool)
        _allow(method, "POST")
        params = self._body(request) or {}
        if not isinstance(params, dict):
            raise _HTTPError(400, "invalid_request", "tool parameters must be a JSON object")
        if tool.id == "echo":
            return _json(m.ToolResult(result=params))
        if tool.id == "uppercase":
            return _json(m.ToolResult(result=str(params.get("text", "")).upper()))
        expression = params.get("expression")
        if not isinstance(expression, str):
            raise _HTTPError(400, "invalid_request", "Missing required field: expression")
        try:
            return _json(m.ToolResult(result=_calculate(expression)))
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
            raise _HTTPError(400, "invalid_expression", str(exc)) from None

    # memory -------------------------------------------------------------------------------

    async def _api_memory(self, method: str, rest: list[str], request: Request) -> Response:
        stamp = _iso(self._clock())
        if not rest:
            if method == "GET":
                return _json(m.MemoryList(keys=[m.MemoryKey(key=i.key, created_at=i.created_at)
                                                for i in self._memory.values()]))
            _allow(method, "POST")
            write = self._typed(request, m.MemoryWrite)
            old = self._memory.get(write.key)
            self._memory[write.key] = m.MemoryItem(
                key=write.key, value=write.value,
                created_at=old.created_at if old else stamp, updated_at=stamp)
            return _json(m.MemoryStatus(status="stored"))
        if rest == ["query"]:
            _allow(method, "POST")
            query = self._typed(request, m.MemoryQuery)
            return _json(m.MemoryQueryResults(results=self._query_memory(query)))
        if len(rest) != 1:
            raise _HTTPError(404, "not_found", "no such memory endpoint")
        key = rest[0]
        item = self._memory.get(key)
        if item is None:
            raise _HTTPError(404, "not_found", f"no memory key {key!r}")
        if method == "GET":
            return _json(item)
        if method == "PUT":
            update = self._typed(request, m.MemoryUpdate)
            self._memory[key] = m.MemoryItem(key=key, value=update.value,
                                             created_at=item.created_at, updated_at=stamp)
            return _json(m.MemoryStatus(status="updated", previous_value=item.value))
        _allow(method, "DELETE")
        del self._memory[key]
        return _json(m.MemoryStatus(status="deleted"))

    def _query_memory(self, query: m.MemoryQuery) -> list[m.MemoryQueryResult]:
        words = [w for w in query.query.lower().split() if w]
        prefix = (query.filter or {}).get("key_prefix") or ""
        results = []
        for item in self._memory.values():
            if not item.key.startswith(prefix):
                continue
            text = (item.key + " " + json.dumps(item.value, default=str)).lower()
            hits = sum(1 for w in words if w in text)
            if hits or not words:
                score = round(hits / len(words), 3) if words else 1.0
                results.append(m.MemoryQueryResult(key=item.key, value=item.value, score=score))
        results.sort(key=lambda r: -r.score)
        return results[: query.limit] if query.limit else results

    # resources ----------------------------------------------------------------------------

    async def _api_resources(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest and method == "POST":
            create = self._typed(request, m.ResourceCreate)
            resource_id = create.id or f"res_{new_id()}"
            if resource_id in self._resources:
                raise _HTTPError(409, "conflict", f"resource {resource_id} exists")
            resource = m.Resource(id=resource_id, title=create.title, type=create.type,
                                  content=create.content, metadata=create.metadata or {},
                                  created_at=_iso(self._clock()))
            self._resources[resource_id] = resource
            return _json(resource, status=201)
        _allow(method, "GET")
        if not rest:
            return _json(m.ResourceList(resources=[
                m.ResourceSummary(id=r.id, title=r.title, type=r.type)
                for r in self._resources.values()]))
        if rest == ["search"]:
            q = " ".join(parse_qs(request.query).get("q", [""])).lower().strip()
            if not q:
                raise _HTTPError(400, "invalid_request", "Missing required parameter: q")
            results = []
            for r in self._resources.values():
                title = (r.title or "").lower()
                if q in title or q in str(r.content).lower():
                    results.append(m.ResourceSummary(id=r.id, title=r.title, type=r.type,
                                                     score=0.98 if q in title else 0.75))
            results.sort(key=lambda s: -(s.score or 0))
            return _json(m.ResourceSearchResults(results=results))
        found = self._resources.get(rest[0]) if len(rest) == 1 else None
        if found is None:
            raise _HTTPError(404, "not_found", f"no resource {'/'.join(rest)}")
        return _json(found)

    # events -------------------------------------------------------------------------------

    async def _api_events(self, method: str, rest: list[str], request: Request) -> Response:
        _allow(method, "POST")
        if rest:
            raise _HTTPError(404, "not_found", "no such events endpoint")
        body = self._body(request)
        if not isinstance(body, dict):
            raise _HTTPError(400, "invalid_request", "the event must be a JSON object")
        key = request.header("idempotency-key") or body.get("id")
        if not isinstance(key, str) or not key:
            raise _HTTPError(400, "invalid_request",
                             "an Idempotency-Key header (or an event id) is required")
        self.stats.events_received += 1
        raw_id = body.get("id")
        event_id: str = raw_id if isinstance(raw_id, str) and raw_id else key
        seen = self._events.get(key)
        if seen is not None:
            seen.count += 1
            self.stats.duplicates += 1
            return _json(m.EventAck(id=seen.id, status="duplicate", duplicate=True))
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        event = _Event(key=key, id=event_id, received_at=self._clock(), body=body,
                       headers=headers)
        self._events[key] = event
        self._event_log.append(event)
        self.stats.unique_event_ids += 1
        return _json(m.EventAck(id=event_id, status="accepted"), status=202)

    # jobs ---------------------------------------------------------------------------------

    async def _api_jobs(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            if method == "GET":
                return _no_store(_json(m.JobList(jobs=[self._job_now(j) for j in self._jobs])))
            _allow(method, "POST")
            create = self._typed(request, m.JobCreate)
            now = self._clock()
            job = m.Job(id=f"job_{new_id()}", type=create.type, status="new",
                        params=create.params, created_at=_iso(now), updated_at=_iso(now))
            self._jobs[job.id] = (job, now)
            self.stats.jobs_created += 1
            return _no_store(_json(job, status=201))
        if rest[0] not in self._jobs or len(rest) > 2 or (len(rest) == 2 and rest[1] != "cancel"):
            raise _HTTPError(404, "not_found", f"no job {'/'.join(rest)}")
        job_id = rest[0]
        if len(rest) == 2:
            _allow(method, "POST")
            current = self._job_now(job_id)
            if current.status not in ("new", "active"):
                if job_id in self._cancelled:
                    return _no_store(_json(current))  # cancelling twice is cancelling once
                raise _HTTPError(409, "conflict", f"job {job_id} already ended ({current.status})")
            self._cancelled[job_id] = self._clock()
            self.stats.jobs_cancelled += 1
            return _no_store(_json(self._job_now(job_id)))
        _allow(method, "GET")
        return _no_store(_json(self._job_now(job_id)))

    def _job_now(self, job_id: str) -> m.Job:
        """A job's state now: ``new`` for the first quarter of ``job_duration``, ``active``
        until it has passed, then done (or error); ``error`` "cancelled" once cancelled."""
        job, created = self._jobs[job_id]
        duration = self.faults.job_duration
        cancelled = self._cancelled.get(job_id)
        if cancelled is not None:
            return msgspec.structs.replace(job, status="error", error="cancelled",
                                           updated_at=_iso(cancelled))
        now = self._clock()
        if now < created + duration / 4:
            return job
        if now < created + duration:
            return msgspec.structs.replace(job, status="active",
                                           updated_at=_iso(created + duration / 4))
        stamp = _iso(created + duration)
        if job.type == "fail":
            return msgspec.structs.replace(job, status="error", error="the job failed",
                                           updated_at=stamp)
        return msgspec.structs.replace(job, status="done", updated_at=stamp,
                                       result={"type": job.type, "params": job.params})

    # pay ----------------------------------------------------------------------------------

    async def _api_pay(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            _allow(method, "POST")
            key = request.header("idempotency-key")
            if key and key in self._payment_keys:
                return _json(self._payments[self._payment_keys[key]])
            create = self._typed(request, m.PaymentCreate)
            if not create.amount > 0 or not create.currency:
                raise _HTTPError(400, "invalid_request", "amount must be > 0, with a currency")
            payment = m.Payment(transaction_id=f"tx_{new_id()}", status="success",
                                amount=create.amount, currency=create.currency,
                                description=create.description, created_at=_iso(self._clock()))
            self._payments[payment.transaction_id] = payment
            if key:
                self._payment_keys[key] = payment.transaction_id
            self.stats.payments += 1
            return _json(payment)
        _allow(method, "GET")
        found = self._payments.get(rest[0]) if len(rest) == 1 else None
        if found is None:
            raise _HTTPError(404, "not_found", f"no payment {'/'.join(rest)}")
        return _json(found)

    # notifications ------------------------------------------------------------------------

    async def _api_notifications(self, method: str, rest: list[str], request: Request
                                 ) -> Response:
        if rest:
            raise _HTTPError(404, "not_found", "no such notifications endpoint")
        if method == "GET":
            return _json(m.NotificationList(notifications=self._notifications[::-1]))
        _allow(method, "POST")
        create = self._typed(request, m.NotificationCreate)
        note = m.Notification(id=f"ntf_{new_id()}", title=create.title, body=create.body,
                              level=create.level, channel=create.channel,
                              created_at=_iso(self._clock()))
        self._notifications.append(note)
        return _json(note, status=201)


def _usage(said: str, reply: str) -> dict[str, int]:
    """Token counts as a model server reports them (here: words)."""
    prompt, completion = len(said.split()), len(reply.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _no_store(response: Response) -> Response:
    """Mark an answer that changes on its own (a job) as not to be cached."""
    response.headers.append(("cache-control", "no-store"))
    return response


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _HTTPError(405, "method_not_allowed", f"use {' or '.join(allowed)}",
                         [("allow", ", ".join(allowed))])


def _check_faults(faults: MockOptions) -> None:
    if not 0.0 <= faults.fail_rate <= 1.0:
        raise ValueError("fail_rate must be between 0 and 1")
    if not 300 <= faults.fail_status <= 599:  # 3xx: a redirect at a load balancer
        raise ValueError("fail_status must be a redirect or error status (300-599)")
    if faults.latency < 0 or faults.token_lifetime < 0 or faults.stream_delay < 0 \
            or faults.job_duration < 0:
        raise ValueError("latency, token_lifetime, stream_delay and job_duration must be >= 0")
    if faults.retry_after is not None and faults.retry_after < 0:
        raise ValueError("retry_after must be >= 0")
    if faults.outage_mode not in ("503", "close"):
        raise ValueError("outage_mode must be '503' or 'close'")


class _BrokenStream:
    """A body that fails at once: the head goes out, then the connection is dropped
    (the ``close`` outage mode; a client sees an incomplete response)."""

    def __aiter__(self) -> _BrokenStream:
        return self

    async def __anext__(self) -> bytes:
        raise anyio.BrokenResourceError("injected outage: connection dropped")
