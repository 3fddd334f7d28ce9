"""``MFOClient``: the endpoint groups over one base client, built from an instance config."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import httpx

from mfo_actors.client._api import (
    ChatAPI,
    EventsAPI,
    JobsAPI,
    MemoryAPI,
    NotificationsAPI,
    PayAPI,
    ResourcesAPI,
    ToolsAPI,
)
from mfo_actors.client._auth import AuthProvider, LoginAuth, NoAuth, StaticTokenAuth
from mfo_actors.client._base import BaseClient
from mfo_actors.client._gate import Gate
from mfo_actors.client._hooks import Breaker, RateLimiter
from mfo_actors.client._observe import RequestMetrics
from mfo_actors.client._policy import (
    breaker_from_config,
    cache_from_config,
    rate_limiter_from_config,
    retry_from_config,
)
from mfo_actors.client._retry import RetryPolicy
from mfo_actors.client.models import Info
from mfo_actors.config import AuthConfig, ClientConfig, InstanceConfig

if TYPE_CHECKING:
    from mfo_actors.runtime import Clock

__all__ = ["MFOClient", "auth_from_config", "http_client_from_config"]

# Seconds an idle pooled connection is kept: below the 60 s+ idle timeouts of common servers,
# so we rarely reuse a connection the server is closing.
_KEEPALIVE_EXPIRY = 30.0


def http_client_from_config(
    cfg: ClientConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int | None = None,
) -> httpx.AsyncClient:
    """One pooled ``httpx.AsyncClient`` for one upstream: timeouts and pool size from config
    (*max_connections* overrides ``client.max_connections``)."""
    size = cfg.max_connections if max_connections is None else max_connections
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(float(cfg.timeout)),
        limits=httpx.Limits(max_connections=size,
                            max_keepalive_connections=size,
                            keepalive_expiry=_KEEPALIVE_EXPIRY),
        follow_redirects=False,
    )


def auth_from_config(auth: AuthConfig, client: ClientConfig, http: httpx.AsyncClient
                     ) -> AuthProvider:
    """The auth provider ``auth.mode`` asks for (login, token or none)."""
    if auth.mode == "login":
        if not auth.email or not auth.password:
            raise ValueError("auth.mode login needs auth.email and auth.password")
        return LoginAuth(client.effective_auth_base_url, auth.email, auth.password, http,
                         refresh_at=auth.refresh_at)
    if auth.mode == "token":
        if not auth.token:
            raise ValueError("auth.mode token needs auth.token")
        return StaticTokenAuth(auth.token)
    return NoAuth()


class MFOClient:
    """The MFO (SLOP) API: ``chat``, ``tools``, ``memory``, ``resources``, ``pay``, ``events``,
    ``jobs``, ``notifications`` and :meth:`info`, over one :class:`BaseClient` (``client.base``).

    Usage::

        async with MFOClient.from_config(cfg) as client:
            reply = await client.chat.send("hello")
            print(reply.content)

    Args:
      base: The base client every group calls through.
      owns_http: Close ``base.http`` in :meth:`aclose` (true when we created it).
    """

    def __init__(self, base: BaseClient, *, owns_http: bool = False) -> None:
        self.base = base
        self._owns_http = owns_http
        self.chat = ChatAPI(base)
        self.tools = ToolsAPI(base)
        self.memory = MemoryAPI(base)
        self.resources = ResourcesAPI(base)
        self.pay = PayAPI(base)
        self.events = EventsAPI(base)
        self.jobs = JobsAPI(base)
        self.notifications = NotificationsAPI(base)

    def __repr__(self) -> str:
        return f"MFOClient({self.base.base_url!r})"

    @classmethod
    def from_config(
        cls,
        cfg: InstanceConfig,
        *,
        auth: AuthProvider | None = None,
        breaker: Breaker | None = None,
        rate_limiter: RateLimiter | None = None,
        gate: Gate | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> MFOClient:
        """A client for ``cfg.client`` protected as the daemon protects its own.

        ``client.retry``, ``client.circuit_breaker``, ``client.rate_limit`` and
        ``client.cache`` are applied by the same functions the daemon uses
        (:mod:`mfo_actors.client._policy`); auth comes from ``cfg.auth``. Each given argument
        replaces what the config would build.

        Args:
          gate: Admits every attempt instead of the auth, breaker and rate limit built here
            (the daemon's gate over its breaker and auth actors, shared by every caller).
          transport: An httpx transport to use instead of the network (tests).
          clock: Time for the breaker, rate limit and cache (a ``FakeClock`` in tests).
        """
        http = http_client_from_config(cfg.client, transport=transport)
        if gate is not None:
            if (auth, breaker, rate_limiter) != (None, None, None):
                raise TypeError("give from_config a gate, or auth/breaker/rate_limiter")
            return cls(BaseClient(cfg.client.base_url, http=http, gate=gate,
                                  retry=retry_from_config(cfg.client),
                                  cache=cache_from_config(cfg.client, clock=clock),
                                  metrics=RequestMetrics(cfg.instance)),
                       owns_http=True)
        return cls(
            BaseClient(
                cfg.client.base_url,
                auth=auth if auth is not None else auth_from_config(cfg.auth, cfg.client, http),
                http=http,
                retry=retry_from_config(cfg.client),
                breaker=breaker if breaker is not None else breaker_from_config(cfg, clock=clock),
                rate_limiter=(rate_limiter if rate_limiter is not None
                              else rate_limiter_from_config(cfg.client, clock=clock)),
                cache=cache_from_config(cfg.client, clock=clock),
                metrics=RequestMetrics(cfg.instance),
            ),
            owns_http=True,
        )

    @classmethod
    def from_url(
        cls,
        base_url: str,
        *,
        auth: AuthProvider | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        breaker: Breaker | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> MFOClient:
        """A client for *base_url* without a config file (scripts, tests)."""
        http = http_client_from_config(ClientConfig(base_url=base_url,
                                                    timeout=timeout))  # type: ignore[arg-type]
        return cls(BaseClient(base_url, auth=auth or NoAuth(), http=http,
                              retry=retry if retry is not None else RetryPolicy(),
                              breaker=breaker, rate_limiter=rate_limiter),
                   owns_http=True)

    async def info(self) -> Info:
        """``GET /api/info``: the server's name, version, endpoints and capabilities."""
        return await self.base.get("/api/info", response_type=Info)

    async def aclose(self) -> None:
        """Close the connection pool (if this client created it)."""
        if self._owns_http:
            await self.base.http.aclose()

    async def __aenter__(self) -> MFOClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
