"""The listener actor: the webhook front door, answering 202 only once an event is on disk.

Per request, in the connection's task (no queue in memory, so backpressure is the store's):

1. before the body is read (the HTTP core's head check): unknown path 404, a method other
   than POST 405 (with ``Allow: POST``), a JSON route sent a non-JSON content type 415, a
   ``Content-Length`` above ``max_body_size`` 413, shutting down 503;
2. the signature (``verify`` of the route): 401 ``{"error": "invalid signature: ..."}``, the
   body is not stored;
3. JSON routes: the body must be UTF-8 JSON and parse (msgspec, fast); otherwise 400 naming
   the problem. The raw bytes are kept as ``Event.body`` (forwarded without re-encoding);
4. ``store.append`` (group commit, fsync'd): 202 ``{"id": ...}``; a provider retry of a
   delivery already stored 200 ``{"id": <first id>, "duplicate": true}``; store over its bound
   or closing 503 with ``Retry-After``; any other store error 503 too, logged.

Decisions (documented here because users see them):

* **Content types.** A JSON route (``body: json``, the default) accepts ``application/json``,
  any ``*/*+json`` type, and a request without ``Content-Type`` (some providers omit it; the
  body must still parse). ``body: raw`` accepts anything and stores the bytes as they came.
* **Event type.** ``type_from: header:NAME`` takes that header; ``type_from: json:/pointer``
  takes the value at that JSON pointer (RFC 6901; numbers and booleans become text). Without
  ``type_from``: the ``X-Event-Type`` header, else ``X-GitHub-Event``, else the top-level JSON
  field ``"type"`` when it is a string; whatever is not found is ``"unknown"``.
* **Ordering key** (``forwarder.ordering: key``): the route's ``ordering_key``, else
  ``forwarder.ordering_key``: ``json:/pointer`` (the value at that pointer of the body, read
  from the one decode of the body; strings, numbers and booleans, as for ``type_from``) or
  ``header:NAME``. Computed once here and stored with the event (``Event.ordering_key``):
  the forwarder delivers events of one key one at a time, in acceptance order. When it cannot
  be read (field or header missing or empty, an object or a list, a body that is not a JSON
  object) the event is ordered with its **source** instead (``ordering_key`` None: the lane
  of ``ordering: source``), counted in ``mfo_ordering_key_missing_total{source}`` and logged
  (``listener.ordering_key_missing``: the first, then every 1000th per route). A key longer
  than :data:`MAX_KEY_LENGTH` is stored as ``sha256:`` and its hex digest. A route without
  a key (or a raw route with a ``json:`` default) is ordered by source.
* **Dedupe key.** The route's ``dedupe_header`` if configured and present, else
  ``webhook-id`` (Standard Webhooks), else ``X-GitHub-Delivery``. The store scopes it by
  source and the dedupe window.
* **Stored headers.** Every request header except hop-by-hop ones and ``content-length``
  (they describe this TCP hop, not the event). Signature and auth headers are kept, so the
  MFO server can verify them again; redaction happens when headers are shown or logged
  (``mfo_actors.observability.redact``), never in the store.
* **Rate limits.** A route's ``rate_limit`` and the listener's ``client_rate_limit`` (per
  client address) are token buckets checked before the body is read: over either, ``429``
  with ``Retry-After`` (seconds until the next token, at least 1), nothing stored. A request
  takes a token from both or from neither, so a client over its own limit cannot empty its
  route's bucket for every other client.
* **Reload** (:meth:`ListenerActor.prepare_reload`): routes, secrets, rate limits, size and
  time limits, the TLS certificate and the flows' event triggers change without closing a
  connection (turning TLS on or off needs a restart: the daemon keeps the running choice); a
  request already past its head check finishes under the config it started with. A route
  whose ``verify.secret`` changed keeps accepting the previous secret for
  ``verify.rotation_grace`` (in memory: a restart ends the grace period).
* **Metrics.** ``mfo_events_received_total{source}`` counts stored events;
  ``mfo_events_rejected_total{source,reason}`` counts refusals with reasons ``not_found``,
  ``method``, ``media_type``, ``size``, ``rate_limited``, ``signature``, ``json``,
  ``duplicate``, ``full``, ``stopping`` and ``store_error`` (a 413 for a chunked body found too
  large while streaming is answered by the HTTP core and not counted).
"""

from __future__ import annotations

import hashlib
import math
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from mfo_actors.actors._admission import ClientLimiter, RateLimiter, take_both
from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.actors._server_actor import ServerActor
from mfo_actors.actors._verify import SignatureError, verify
from mfo_actors.actors.scheduler import RunMatcher
from mfo_actors.config import (
    ForwarderConfig,
    InstanceConfig,
    RouteConfig,
    VerifyConfig,
    WebhookListenerConfig,
    parse_ordering_key,
)
from mfo_actors.errors import ConfigError
from mfo_actors.http import HttpLimits, HttpServer, Request, RequestHead, Response
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.metrics import EVENTS_RECEIVED, EVENTS_REJECTED, ORDERING_KEY_MISSING
from mfo_actors.observability import get_logger
from mfo_actors.store import (
    EventStore,
    RunRequest,
    StoreClosedError,
    StoreError,
    StoreFullError,
)

__all__ = ["ListenerActor", "limits_from_config"]

log = get_logger("mfo_actors.actors.listener")

# Headers of the TCP hop, not of the event (RFC 9110 section 7.6.1), plus the framing ones.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length", "expect",
})
DEFAULT_TYPE_HEADERS = ("x-event-type", "x-github-event")
DELIVERY_ID_HEADERS = ("webhook-id", "x-github-delivery")
UNKNOWN_TYPE = "unknown"
# Keys are indexed in the store: a longer one is replaced by its digest (same key, same lane).
MAX_KEY_LENGTH = 128
MISSING_KEY_LOG_EVERY = 1000  # a route whose events lack their key logs the 1st, 1001st, ...

_JSON_HEADERS = [("content-type", "application/json")]  # shared: never mutated


class _TypeProbe(msgspec.Struct):
    """Only the top-level "type" of a JSON object: validating a body this way builds no dicts
    for the rest of the document (about 5x faster than a full decode of a 1 KiB body)."""

    type: Any = None


_decode_json = msgspec.json.Decoder().decode
_probe_json = msgspec.json.Decoder(_TypeProbe).decode
_validate_json = msgspec.json.Decoder(msgspec.Raw).decode
_encode_json = msgspec.json.Encoder().encode


def limits_from_config(cfg: WebhookListenerConfig) -> HttpLimits:
    """The HTTP core's limits from the ``webhook_listener`` section."""
    return HttpLimits(
        max_header_size=int(cfg.max_header_size),
        max_headers=cfg.max_headers,
        max_body_size=int(cfg.max_body_size),
        header_timeout=float(cfg.header_timeout),
        body_timeout=float(cfg.body_timeout),
        keepalive_timeout=float(cfg.keepalive_timeout),
        max_connections=cfg.max_connections,
    )


def _json_response(status: int, value: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, [*_JSON_HEADERS, *headers], _encode_json(value))


def _is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _json_pointer(doc: Any, pointer: str) -> Any:
    """The value at RFC 6901 *pointer* in *doc*, or None."""
    if pointer == "":
        return doc
    for raw in pointer.lstrip("/").split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            if token not in doc:
                return None
            doc = doc[token]
        elif isinstance(doc, list):
            if not token.isdigit() or int(token) >= len(doc):
                return None
            doc = doc[int(token)]
        else:
            return None
    return doc


def _type_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _key_text(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_KEY_LENGTH:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _route_ordering_key(fwd: ForwarderConfig, route: RouteConfig) -> str | None:
    """The ``ordering_key`` spec that applies to *route*: its own, else the forwarder's
    default; None when events are ordered by source (not ``ordering: key``, no key, or a
    ``json:`` default on a raw route)."""
    if fwd.ordering != "key":
        return None
    if route.ordering_key is not None:
        return route.ordering_key
    spec = fwd.ordering_key
    if spec is not None and route.body == "raw" and spec.startswith("json:"):
        return None
    return spec


def _parse_for_type(route: _Route, body: bytes, *, full: bool) -> Any:
    """Validate a JSON body and return what ``event_type`` needs of it (*full*: the whole
    document, decoded once for the type and the flow triggers).

    Raises:
      msgspec.DecodeError: the body is not valid JSON (the message names the position), is
        not UTF-8, or is nested deeper than the decoder goes (a ``RecursionError`` would
        otherwise be a 500).
    """
    if not body.isascii():
        # The type probe skips the fields it does not read without checking their bytes, so
        # a string holding invalid UTF-8 would pass and be refused later by the upstream.
        # isascii() is a fast scan; only bodies with non-ASCII bytes pay for the decode.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise msgspec.DecodeError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        if full:
            return _decode_json(body)
        try:
            return {"type": _probe_json(body).type}
        except msgspec.ValidationError:  # valid JSON, but not an object at the top
            _validate_json(body)
            return None
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None


_REJECT_REASONS = ("method", "media_type", "size", "rate_limited", "signature", "json",
                   "duplicate", "full", "stopping", "store_error")


class _Route:
    """A route with everything precomputed that a request would otherwise recompute.

    ``previous`` holds secrets replaced by a reload, each with the monotonic time its grace
    period ends; ``limiter`` is the route's bucket (kept across reloads that keep the limit).
    """

    __slots__ = (
        "cfg", "dedupe_headers", "is_json", "key_header", "key_missing", "key_pointer",
        "key_spec", "limiter", "missing", "points_in_body", "previous", "received", "rejected",
        "source", "type_header", "type_pointer",
    )

    def __init__(self, cfg: RouteConfig, instance: str, *, before: _Route | None = None,
                 now: float = 0.0, ordering_key: str | None = None) -> None:
        self.cfg = cfg
        self.key_spec = ordering_key
        self.key_header: str | None = None
        self.key_pointer: str | None = None
        if ordering_key is not None:
            key_kind, key_arg = parse_ordering_key(ordering_key)  # check validated it
            if key_kind == "header":
                self.key_header = key_arg
            else:
                self.key_pointer = key_arg
        self.key_missing = ORDERING_KEY_MISSING.labels(instance, cfg.source)
        self.missing: int = before.missing if before is not None else 0  # keys not found
        self.limiter: RateLimiter | None = None
        if cfg.rate_limit is not None:
            same = before is not None and before.limiter is not None \
                and before.limiter.cfg == cfg.rate_limit
            self.limiter = before.limiter if same and before else RateLimiter(cfg.rate_limit)
        self.previous: list[tuple[VerifyConfig, float]] = []
        old, new = (before.cfg.verify if before else None), cfg.verify
        if before is not None and old is not None and new is not None:
            self.previous = [(v, until) for v, until in before.previous
                             if until > now and v.secret != new.secret]
            if old.secret != new.secret and new.rotation_grace > 0:
                self.previous.insert(0, (old, now + float(new.rotation_grace)))
        self.source = cfg.source
        self.is_json = cfg.body == "json"
        self.type_header: str | None = None
        self.type_pointer: str | None = None
        if cfg.type_from is not None:
            kind, _, arg = cfg.type_from.partition(":")
            if kind == "header":
                self.type_header = arg.strip().lower()
            else:
                self.type_pointer = arg
        # A JSON body is decoded fully for the type or the key pointer (else only as needed).
        self.points_in_body = self.is_json and (
            self.type_pointer is not None or self.key_pointer is not None)
        extra = (cfg.dedupe_header.lower(),) if cfg.dedupe_header else ()
        self.dedupe_headers = (*extra, *DELIVERY_ID_HEADERS)
        self.received = EVENTS_RECEIVED.labels(instance, cfg.source)
        self.rejected = {
            reason: EVENTS_REJECTED.labels(instance, cfg.source, reason)
            for reason in _REJECT_REASONS
        }

    def verify(self, headers: dict[str, str], body: bytes) -> None:
        """Check the signature with the route's secret, then with previous ones in grace.

        Raises:
          SignatureError: no secret in use verifies it (the reason is the current secret's).
        """
        assert self.cfg.verify is not None
        try:
            verify(self.cfg.verify, headers, body, now=time.time())
        except SignatureError:
            now = time.monotonic()
            for previous, until in self.previous:
                if until > now:
                    try:
                        verify(previous, headers, body, now=time.time())
                    except SignatureError:
                        continue
                    return
            raise

    def event_type(self, headers: dict[str, str], doc: Any) -> str:
        if self.type_header is not None:
            return headers.get(self.type_header) or UNKNOWN_TYPE
        if self.type_pointer is not None:
            return _type_text(_json_pointer(doc, self.type_pointer)) or UNKNOWN_TYPE
        for name in DEFAULT_TYPE_HEADERS:
            value = headers.get(name)
            if value:
                return value
        if isinstance(doc, dict):
            return _type_text(doc.get("type")) or UNKNOWN_TYPE
        return UNKNOWN_TYPE

    def ordering_key(self, headers: dict[str, str], doc: Any) -> str | None:
        """The event's ordering key, or None (ordered by source; counted when the route has
        a key that could not be read)."""
        if self.key_header is not None:
            key = headers.get(self.key_header) or None
        elif self.key_pointer is not None:
            key = _type_text(_json_pointer(doc, self.key_pointer))
        else:
            return None
        if key is None:
            self.key_missing.inc()
            self.missing += 1
            if self.missing % MISSING_KEY_LOG_EVERY == 1:
                log.warning("listener.ordering_key_missing", source=self.source,
                            ordering_key=self.key_spec, count=self.missing, fallback="source")
        return _key_text(key)

    def dedupe_key(self, headers: dict[str, str]) -> str | None:
        for name in self.dedupe_headers:
            value = headers.get(name)
            if value:
                return value
        return None


class ListenerActor(ServerActor):
    """Serves the webhook routes of ``cfg.webhook_listener``; see the module docstring.

    Args:
      cfg: The instance config (routes, limits, ``retry_after``, ``shutdown_timeout``).
      store: Where events go; ``append`` returns only once the event is durable.
      match_runs: Flow runs to create with the event, in the same transaction.
    """

    name = "listener"

    def __init__(
        self,
        cfg: InstanceConfig,
        store: EventStore,
        *,
        match_runs: Callable[[Event], Sequence[RunRequest]] | None = None,
    ) -> None:
        super().__init__(host=cfg.webhook_listener.host, port=int(cfg.webhook_listener.port),
                         drain_timeout=float(cfg.shutdown_timeout),
                         where=f"{cfg.source_file or '<config>'}: webhook_listener")
        self._cfg = cfg
        self._lcfg = cfg.webhook_listener
        self._store = store
        self._match_runs = match_runs
        instance = cfg.instance
        self._routes = {r.path: _Route(r, instance,
                                       ordering_key=_route_ordering_key(cfg.forwarder, r))
                        for r in self._lcfg.effective_routes()}
        self._not_found = EVENTS_REJECTED.labels(instance, "", "not_found")
        self._limits = limits_from_config(self._lcfg)
        self._retry_after = [("retry-after", str(max(1, math.ceil(self._lcfg.retry_after))))]
        self._clients = _client_limiter(self._lcfg, None)
        self._tls = _tls_context(self._lcfg)

    def _make_server(self) -> HttpServer:
        return HttpServer(self._handle, limits=self._limits, head_check=self._check_head,
                          tls=self._current_tls)

    def _current_tls(self) -> ssl.SSLContext | None:
        return self._tls

    @property
    def scheme(self) -> str:
        """``https`` when the listener serves TLS, else ``http``."""
        return "http" if self._tls is None else "https"

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """Build the new routes, limits and TLS context (see the module docstring).

        Raises:
          ConfigError: the TLS certificate or key cannot be loaded.
        """
        lcfg = update.cfg.webhook_listener
        tls = _tls_context(lcfg)
        now = time.monotonic()
        # forwarder.* keeps its running values on a reload (the mode needs a restart).
        routes = {r.path: _Route(r, self._cfg.instance, before=self._routes.get(r.path), now=now,
                                 ordering_key=_route_ordering_key(update.cfg.forwarder, r))
                  for r in lcfg.effective_routes()}
        rotated = sorted(path for path, route in routes.items()
                         if _secret(route) != _secret(self._routes.get(path)))
        limits = limits_from_config(lcfg)
        clients = _client_limiter(lcfg, self._clients)
        matcher = RunMatcher(update.flows)

        def apply() -> None:
            self._lcfg = lcfg
            self._routes = routes
            self._limits = limits
            self._retry_after = [("retry-after", str(max(1, math.ceil(lcfg.retry_after))))]
            self._clients = clients
            self._tls = tls
            self._match_runs = matcher if matcher else None
            if self._server is not None:
                self._server.update_limits(limits)
            log.info("listener.reloaded", routes=sorted(routes), secrets_changed=rotated,
                     tls=tls is not None)

        return apply

    def _started(self, port: int) -> None:
        log.info("listener.started", host=self._lcfg.host, port=port, scheme=self.scheme,
                 routes=sorted(self._routes))

    def _stopped(self, server: HttpServer, drained: bool) -> None:
        log.info("listener.stopped", drained=drained, in_flight=server.in_flight)

    # -- per request -------------------------------------------------------------------------
    def _unavailable(self, route: _Route, reason: str, message: str) -> Response:
        route.rejected[reason].inc()
        return _json_response(503, {"error": message}, self._retry_after)

    def _check_head(self, head: RequestHead) -> Response | int:
        """Refuse what can be refused before reading the body; else return the size limit."""
        route = self._routes.get(head.path)
        if route is None:
            self._not_found.inc()
            return _json_response(404, {"error": f"no webhook route at {head.path}"})
        if head.method != "POST":
            route.rejected["method"].inc()
            return _json_response(405, {"error": "only POST is allowed"}, [("allow", "POST")])
        if self._stopping:
            return self._unavailable(route, "stopping", "shutting down")
        if route.limiter is not None or self._clients is not None:
            client = (self._clients.bucket(head.client[0])
                      if self._clients is not None and head.client is not None else None)
            wait = take_both(route.limiter, client)  # a token from each, or from neither
            if wait:
                route.rejected["rate_limited"].inc()
                return _json_response(429, {"error": "rate limit exceeded, retry later"},
                                      [("retry-after", str(max(1, math.ceil(wait))))])
        if route.is_json and not _is_json_type(head.headers.get("content-type")):
            route.rejected["media_type"].inc()
            return _json_response(
                415, {"error": "this route takes application/json (configure body: raw "
                               "to accept other content types)"})
        limit = self._limits.max_body_size
        length = head.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            route.rejected["size"].inc()
            return _json_response(413, {"error": f"body larger than {limit} bytes"})
        return limit

    async def _handle(self, request: Request) -> Response:
        route = self._routes[request.head.path]  # _check_head answered unknown paths
        if self._stopping:
            return self._unavailable(route, "stopping", "shutting down")
        headers = request.head.headers
        body = request.body
        if route.cfg.verify is not None:
            try:
                route.verify(headers, body)
            except SignatureError as exc:
                route.rejected["signature"].inc()
                log.info("listener.signature_rejected", source=route.source, reason=exc.reason,
                         client=request.head.client[0] if request.head.client else None)
                return _json_response(401, {"error": f"invalid signature: {exc.reason}"})
        doc: Any = None
        match = self._match_runs
        # Decoded once: fully when the type or key pointer or a flow's ``when:`` needs the body.
        full = route.points_in_body or (route.is_json and isinstance(match, RunMatcher)
                                        and match.needs_payload(route.source))
        if route.is_json:
            try:
                doc = _parse_for_type(route, body, full=full)
            except msgspec.DecodeError as exc:
                route.rejected["json"].inc()
                return _json_response(400, {"error": f"invalid JSON body: {exc}"})
        event = Event(
            id=new_id(),
            source=route.source,
            type=route.event_type(headers, doc),
            received_at=time.time(),
            headers={k: v for k, v in headers.items() if k not in HOP_BY_HOP},
            body=body,
            content_type=headers.get("content-type") or (
                "application/json" if route.is_json else "application/octet-stream"),
            is_json=route.is_json,
            dedupe_key=route.dedupe_key(headers),
            ordering_key=route.ordering_key(headers, doc),
        )
        runs: Sequence[RunRequest] = ()
        if match is not None:
            runs = match(event, payload=doc) if full and isinstance(match, RunMatcher) \
                else match(event)
        try:
            result = await self._store.append(event, runs=runs)
        except StoreFullError:
            return self._unavailable(route, "full", "event store is full, retry later")
        except StoreClosedError:
            return self._unavailable(route, "stopping", "shutting down")
        except StoreError as exc:
            log.error("listener.store_failed", source=route.source, error=repr(exc))
            return self._unavailable(route, "store_error", "event store unavailable")
        if result.duplicate:
            route.rejected["duplicate"].inc()
            log.debug("listener.duplicate", event_id=result.id, source=route.source,
                      delivery_id=event.dedupe_key)
            return _json_response(200, {"id": result.id, "duplicate": True})
        route.received.inc()
        log.debug("listener.accepted", event_id=result.id, source=route.source, type=event.type,
                  size=len(body), runs=len(runs))
        # The body by hand: an id is 26 base32 characters, nothing to escape.
        return Response(202, _JSON_HEADERS, b'{"id":"%s"}' % result.id.encode("ascii"))


def _secret(route: _Route | None) -> str | None:
    return route.cfg.verify.secret if route is not None and route.cfg.verify else None


def _client_limiter(cfg: WebhookListenerConfig, before: ClientLimiter | None
                    ) -> ClientLimiter | None:
    """The per-client limiter for *cfg*: *before* (with its buckets) if the limit is unchanged."""
    limit = cfg.client_rate_limit
    if limit is None:
        return None
    if before is not None and before.cfg == limit and before.max_clients == cfg.max_clients_tracked:
        return before
    return ClientLimiter(limit, max_clients=cfg.max_clients_tracked)


def _tls_context(cfg: WebhookListenerConfig) -> ssl.SSLContext | None:
    """The listener's TLS context, the certificate read now.

    Raises:
      ConfigError: the certificate or key cannot be loaded.
    """
    if cfg.tls is None:
        return None
    try:
        return cfg.tls.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the certificate and key: {exc}",
                          key="webhook_listener.tls") from None
