"""The MFO (SLOP) API client: transport, auth providers, typed models, errors and retry.

Usable as a library without the daemon::

    from mfo_actors.client import MFOClient
    async with MFOClient.from_config(cfg) as client:
        reply = await client.chat.send("hello")

``from_config`` protects the calls as the daemon does, with the same code
(:mod:`~mfo_actors.client._policy`): ``client.retry``, ``client.circuit_breaker``,
``client.rate_limit`` and, when configured, ``client.cache`` (GET answers, never errors,
never ``Cache-Control: no-store``). Every exchange is counted in the ``mfo_upstream_*``
metrics (by endpoint and status, latency, errors by kind, response sizes, tokens).

Coverage of SLOP (spec.md of github.com/agnt-gg/slop: its six core endpoints, under ``/api``)
and of the seed's additions; "-" where no flow task type calls it:

==============================  ======  =================================  ======================
endpoint                        method  client call                        flow task type
==============================  ======  =================================  ======================
``/api/chat``                   POST    ``chat.send(msg, thread_id=)``     ``mfo.chat``
``/api/chat/stream`` (SSE)      POST    ``chat.stream(msg, thread_id=)``   ``mfo.chat`` stream
``/api/chat``                   GET     ``chat.list()``                    -
``/api/chat/{id}``              GET     ``chat.get(id)``                   -
``/api/chat/thread_{id}``       GET     ``chat.thread(thread_id)``         -
``/api/tools``                  GET     ``tools.list()``                   -
``/api/tools/{id}``             GET     ``tools.get(id)``                  -
``/api/tools/{id}``             POST    ``tools.execute(id, params)``      ``mfo.tool``
``/api/memory``                 POST    ``memory.set(key, value)``         ``mfo.memory.set``
``/api/memory``                 GET     ``memory.list()``                  -
``/api/memory/{key}``           GET     ``memory.get(key)``                ``mfo.memory.get``
``/api/memory/{key}``           PUT     ``memory.update(key, value)``      -
``/api/memory/{key}``           DELETE  ``memory.delete(key)``             ``mfo.memory.delete``
``/api/memory/query``           POST    ``memory.query(text)``             -
``/api/resources``              GET     ``resources.list()``               -
``/api/resources/{id}``         GET     ``resources.get(id)``              ``mfo.resource.get``
``/api/resources/search``       GET     ``resources.search(q)``            -
``/api/resources``              POST    ``resources.create(title, ...)``   ``mfo.resource.create``
``/api/pay``                    POST    ``pay.create(amount, currency)``   ``mfo.pay``
``/api/pay/{id}``               GET     ``pay.get(transaction_id)``        -
``/api/info``                   GET     ``info()``                         -
``/api/events`` (seed)          POST    ``events.send(body, key)``         ``mfo.event``
``/api/jobs`` (seed 001)        POST    ``jobs.create(type, params)``      ``mfo.job.create``
``/api/jobs/{id}``              GET     ``jobs.get(id)``, ``jobs.wait(id)``  ``mfo.job.create`` wait
``/api/jobs``                   GET     ``jobs.list()``                    -
``/api/jobs/{id}/cancel``       POST    ``jobs.cancel(id)``                ``mfo.job.cancel``
``/api/notifications``          GET     ``notifications.list()``           -
``/api/notifications``          POST    ``notifications.send(title)``      -
``{auth_base_url}/login``       POST    ``login()`` (LoginAuth, auth actor) -
==============================  ======  =================================  ======================

Not covered: SLOP's WebSocket variants (``/chat/ws``: section 6.3 makes them optional; SSE
covers streaming) and its ``X-SLOP-Scope`` header (the server decides scopes from the token).
"""

from mfo_actors.client._api import ChatAPI as ChatAPI
from mfo_actors.client._api import ChatStream as ChatStream
from mfo_actors.client._api import EventsAPI as EventsAPI
from mfo_actors.client._api import JobsAPI as JobsAPI
from mfo_actors.client._api import MemoryAPI as MemoryAPI
from mfo_actors.client._api import NotificationsAPI as NotificationsAPI
from mfo_actors.client._api import PayAPI as PayAPI
from mfo_actors.client._api import ResourcesAPI as ResourcesAPI
from mfo_actors.client._api import ToolsAPI as ToolsAPI
from mfo_actors.client._auth import AuthProvider as AuthProvider
from mfo_actors.client._auth import Login as Login
from mfo_actors.client._auth import LoginAuth as LoginAuth
from mfo_actors.client._auth import NoAuth as NoAuth
from mfo_actors.client._auth import StaticTokenAuth as StaticTokenAuth
from mfo_actors.client._auth import jwt_expiry as jwt_expiry
from mfo_actors.client._auth import login as login
from mfo_actors.client._base import BaseClient as BaseClient
from mfo_actors.client._breaker import CircuitBreaker as CircuitBreaker
from mfo_actors.client._cache import ResponseCache as ResponseCache
from mfo_actors.client._client import MFOClient as MFOClient
from mfo_actors.client._client import auth_from_config as auth_from_config
from mfo_actors.client._client import http_client_from_config as http_client_from_config
from mfo_actors.client._gate import Admission as Admission
from mfo_actors.client._gate import Gate as Gate
from mfo_actors.client._gate import PolicyGate as PolicyGate
from mfo_actors.client._gate import bare_token as bare_token
from mfo_actors.client._hooks import Breaker as Breaker
from mfo_actors.client._hooks import RateLimiter as RateLimiter
from mfo_actors.client._observe import RequestMetrics as RequestMetrics
from mfo_actors.client._observe import endpoint_label as endpoint_label
from mfo_actors.client._policy import breaker_from_config as breaker_from_config
from mfo_actors.client._policy import cache_from_config as cache_from_config
from mfo_actors.client._policy import rate_limiter_from_config as rate_limiter_from_config
from mfo_actors.client._policy import retry_from_config as retry_from_config
from mfo_actors.client._ratelimit import TokenBucket as TokenBucket
from mfo_actors.client._retry import RetryPolicy as RetryPolicy
from mfo_actors.client._retry import compute_backoff as compute_backoff
from mfo_actors.client._retry import is_idempotent as is_idempotent
from mfo_actors.client._sse import SSEEvent as SSEEvent
from mfo_actors.client._sse import SSEParser as SSEParser
from mfo_actors.client._sse import iter_sse as iter_sse
from mfo_actors.client._transport import ERROR_BODY_CAP as ERROR_BODY_CAP
from mfo_actors.client._transport import exchange as exchange
from mfo_actors.client._transport import upstream_ssl_context as upstream_ssl_context
from mfo_actors.client.errors import APIError as APIError
from mfo_actors.client.errors import AuthError as AuthError
from mfo_actors.client.errors import CircuitBreakerError as CircuitBreakerError
from mfo_actors.client.errors import ClientError as ClientError
from mfo_actors.client.errors import RetryableError as RetryableError
from mfo_actors.client.errors import ValidationError as ValidationError
from mfo_actors.client.errors import classify_response as classify_response
from mfo_actors.client.errors import classify_transport_error as classify_transport_error
from mfo_actors.client.errors import is_upstream_failure as is_upstream_failure
from mfo_actors.client.errors import parse_retry_after as parse_retry_after

__all__ = [
    "ERROR_BODY_CAP",
    "APIError",
    "Admission",
    "AuthError",
    "AuthProvider",
    "BaseClient",
    "Breaker",
    "ChatAPI",
    "ChatStream",
    "CircuitBreaker",
    "CircuitBreakerError",
    "ClientError",
    "EventsAPI",
    "Gate",
    "JobsAPI",
    "Login",
    "LoginAuth",
    "MFOClient",
    "MemoryAPI",
    "NoAuth",
    "NotificationsAPI",
    "PayAPI",
    "PolicyGate",
    "RateLimiter",
    "RequestMetrics",
    "ResourcesAPI",
    "ResponseCache",
    "RetryPolicy",
    "RetryableError",
    "SSEEvent",
    "SSEParser",
    "StaticTokenAuth",
    "TokenBucket",
    "ToolsAPI",
    "ValidationError",
    "auth_from_config",
    "bare_token",
    "breaker_from_config",
    "cache_from_config",
    "classify_response",
    "classify_transport_error",
    "compute_backoff",
    "endpoint_label",
    "exchange",
    "http_client_from_config",
    "is_idempotent",
    "is_upstream_failure",
    "iter_sse",
    "jwt_expiry",
    "login",
    "parse_retry_after",
    "rate_limiter_from_config",
    "retry_from_config",
    "upstream_ssl_context",
]
