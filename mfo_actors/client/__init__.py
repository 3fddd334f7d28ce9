"""The MFO (SLOP) API client: transport, auth providers, typed models, errors and retry.

Usable as a library without the daemon::

    from mfo_actors.client import MFOClient
    async with MFOClient.from_config(cfg) as client:
        reply = await client.chat.send("hello")
"""

from mfo_actors.client._api import ChatAPI as ChatAPI
from mfo_actors.client._api import ChatStream as ChatStream
from mfo_actors.client._api import EventsAPI as EventsAPI
from mfo_actors.client._api import JobsAPI as JobsAPI
from mfo_actors.client._api import MemoryAPI as MemoryAPI
from mfo_actors.client._api import NotificationsAPI as NotificationsAPI
from mfo_actors.client._api import ResourcesAPI as ResourcesAPI
from mfo_actors.client._api import ToolsAPI as ToolsAPI
from mfo_actors.client._auth import AuthProvider as AuthProvider
from mfo_actors.client._auth import LoginAuth as LoginAuth
from mfo_actors.client._auth import NoAuth as NoAuth
from mfo_actors.client._auth import StaticTokenAuth as StaticTokenAuth
from mfo_actors.client._auth import jwt_expiry as jwt_expiry
from mfo_actors.client._base import BaseClient as BaseClient
from mfo_actors.client._breaker import CircuitBreaker as CircuitBreaker
from mfo_actors.client._client import MFOClient as MFOClient
from mfo_actors.client._client import auth_from_config as auth_from_config
from mfo_actors.client._client import http_client_from_config as http_client_from_config
from mfo_actors.client._hooks import Breaker as Breaker
from mfo_actors.client._hooks import RateLimiter as RateLimiter
from mfo_actors.client._ratelimit import TokenBucket as TokenBucket
from mfo_actors.client._retry import RetryPolicy as RetryPolicy
from mfo_actors.client._retry import compute_backoff as compute_backoff
from mfo_actors.client._retry import is_idempotent as is_idempotent
from mfo_actors.client._sse import SSEEvent as SSEEvent
from mfo_actors.client._sse import SSEParser as SSEParser
from mfo_actors.client._sse import iter_sse as iter_sse
from mfo_actors.client.errors import APIError as APIError
from mfo_actors.client.errors import AuthError as AuthError
from mfo_actors.client.errors import CircuitBreakerError as CircuitBreakerError
from mfo_actors.client.errors import ClientError as ClientError
from mfo_actors.client.errors import RetryableError as RetryableError
from mfo_actors.client.errors import ValidationError as ValidationError
from mfo_actors.client.errors import classify_response as classify_response
from mfo_actors.client.errors import classify_transport_error as classify_transport_error
from mfo_actors.client.errors import parse_retry_after as parse_retry_after

__all__ = [
    "APIError",
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
    "JobsAPI",
    "LoginAuth",
    "MFOClient",
    "MemoryAPI",
    "NoAuth",
    "NotificationsAPI",
    "RateLimiter",
    "ResourcesAPI",
    "RetryPolicy",
    "RetryableError",
    "SSEEvent",
    "SSEParser",
    "StaticTokenAuth",
    "TokenBucket",
    "ToolsAPI",
    "ValidationError",
    "auth_from_config",
    "classify_response",
    "classify_transport_error",
    "compute_backoff",
    "http_client_from_config",
    "is_idempotent",
    "iter_sse",
    "jwt_expiry",
    "parse_retry_after",
]
