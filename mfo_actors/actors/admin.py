"""The admin actor: ``/healthz``, ``/readyz`` and ``/metrics`` on their own port.

* ``GET /healthz``: 200 ``{"status":"ok"}`` while the process serves HTTP at all (liveness).
* ``GET /readyz``: 200 when ``readiness()`` says ready, else 503; the body is
  ``{"status": "ready"|"not_ready", "checks": {...}}`` with the checks dict it returned (one
  entry per actor, and the store).
* ``GET /metrics``: the Prometheus text exposition of :mod:`mfo_actors.metrics`.

Other paths are 404, other methods 405. ``readiness`` errors make ``/readyz`` answer 503
(and are logged) rather than 500, so an orchestrator sees "not ready", not "broken".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from mfo_actors.actors._server_actor import ServerActor
from mfo_actors.config import AdminConfig
from mfo_actors.http import HttpLimits, HttpServer, Request, Response
from mfo_actors.metrics import render_metrics
from mfo_actors.observability import get_logger

__all__ = ["AdminActor"]

log = get_logger("mfo_actors.actors.admin")

ADMIN_LIMITS = HttpLimits(max_body_size=64 * 1024, max_connections=64)  # probes and scrapers
DRAIN_TIMEOUT = 5.0  # seconds; admin requests are quick
_JSON = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode
_HEALTHY = b'{"status":"ok"}'

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class AdminActor(ServerActor):
    """Serves the admin endpoints of one instance.

    Args:
      cfg: The ``admin`` section (host, port).
      instance: The instance name (in the admin port's log lines).
      readiness: Returns ``(ready, checks)``; called on every ``/readyz``.
      config_file: Named in a start-up error (port in use).
    """

    name = "admin"

    def __init__(self, cfg: AdminConfig, *, instance: str, readiness: Readiness,
                 config_file: str | None = None) -> None:
        super().__init__(host=cfg.host, port=int(cfg.port), drain_timeout=DRAIN_TIMEOUT,
                         where=f"{config_file}: admin" if config_file else "admin")
        self._cfg = cfg
        self._instance = instance
        self._readiness = readiness

    def _make_server(self) -> HttpServer:
        return HttpServer(self._handle, limits=ADMIN_LIMITS)

    def _started(self, port: int) -> None:
        log.info("admin.started", instance=self._instance, host=self._cfg.host, port=port)

    async def _handle(self, request: Request) -> Response:
        path = request.path
        if path not in ("/healthz", "/readyz", "/metrics"):
            return Response(404, _JSON, _encode({"error": f"no admin endpoint at {path}"}))
        if request.method not in ("GET", "HEAD"):
            return Response(405, [*_JSON, ("allow", "GET, HEAD")],
                            _encode({"error": "only GET is allowed"}))
        if path == "/healthz":
            return Response(200, _JSON, _HEALTHY)
        if path == "/metrics":
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)], render_metrics())
        try:
            ok, checks = await self._readiness()
        except Exception as exc:
            log.error("admin.readiness_failed", error=repr(exc))
            ok, checks = False, {"readiness": f"check failed: {exc!r}"}
        body = {"status": "ready" if ok else "not_ready", "checks": checks}
        return Response(200 if ok else 503, _JSON, _encode(body))
