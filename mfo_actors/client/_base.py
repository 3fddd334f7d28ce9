"""The base client: one HTTP exchange through a gate (auth, breaker, rate limit), typed
decoding and retry.

Every call goes through :meth:`BaseClient.request`. One *attempt* is:

1. ask the gate (:class:`~mfo_actors.client._gate.Gate`): a token (may log in), the breaker
   (raises :class:`CircuitBreakerError` while open), the rate limit;
2. send; on 401, report the token through the admission and, if a different one comes,
   send once more (the single re-login);
3. classify the answer (:func:`classify_response`), settle the admission with the outcome
   (the breaker's one record), raise or decode.

Attempts are repeated by the :class:`RetryPolicy` when ``retry=True`` (the default) and the
call may be repeated (idempotent method, or an ``Idempotency-Key``). The forwarder passes
``retry=False``: one attempt, a typed error, and its own durable retries.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import anyio
import httpx
import msgspec

from mfo_actors.client._auth import AuthProvider
from mfo_actors.client._cache import ResponseCache
from mfo_actors.client._gate import Admission, Gate, PolicyGate
from mfo_actors.client._hooks import Breaker, RateLimiter
from mfo_actors.client._observe import RequestMetrics, endpoint_label
from mfo_actors.client._retry import RetryPolicy
from mfo_actors.client._transport import (
    DEFAULT_MAX_BODY,
    ERROR_BODY_CAP,
    exchange,
    read_capped,
    total_timeout,
    was_truncated,
)
from mfo_actors.client.errors import (
    APIError,
    ClientError,
    RetryableError,
    ValidationError,
    classify_response,
    classify_transport_error,
    is_upstream_failure,
)
from mfo_actors.observability import get_logger

__all__ = ["BaseClient"]

T = TypeVar("T")

log = get_logger(__name__)

_JSON = "application/json"
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_encoder = msgspec.json.Encoder()


def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    dec = _decoders.get(tp)
    if dec is None:
        dec = _decoders[tp] = msgspec.json.Decoder(tp)
    return dec


class BaseClient:
    """HTTP calls to one MFO server (one ``httpx.AsyncClient``, i.e. one keep-alive pool).

    Args:
      base_url: e.g. ``http://127.0.0.1:9000``; request paths (``/api/chat``) are appended.
      auth: Supplies ``Authorization`` (see :class:`AuthProvider`).
      http: The pooled HTTP client; the caller owns it (``MFOClient`` closes its own).
      retry: The policy for ``retry=True`` calls; ``None`` means one attempt always.
      breaker: Optional circuit breaker consulted before and told after each attempt.
      rate_limiter: Optional limiter awaited before each request sent.
      gate: Admits every attempt instead of a gate made of *auth*, *breaker* and
        *rate_limiter* (the daemon's, fed by its actors); give one or the others.
      cache: Optional cache of GET answers (see :class:`ResponseCache`); None: no cache.
      metrics: Where exchanges, errors and tokens are counted (``mfo_upstream_*``); default
        a :class:`RequestMetrics` labelled ``instance="default"``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: AuthProvider | None = None,
        http: httpx.AsyncClient,
        retry: RetryPolicy | None = None,
        breaker: Breaker | None = None,
        rate_limiter: RateLimiter | None = None,
        gate: Gate | None = None,
        cache: ResponseCache | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        if gate is not None and (auth, breaker, rate_limiter) != (None, None, None):
            raise TypeError("give BaseClient a gate, or auth/breaker/rate_limiter: not both")
        self.base_url = base_url.rstrip("/")
        self.gate: Gate = gate if gate is not None else PolicyGate(auth, breaker, rate_limiter)
        self.http = http
        self.retry_policy = retry
        self.cache = cache
        self.metrics = metrics if metrics is not None else RequestMetrics()

    def __repr__(self) -> str:
        return f"BaseClient({self.base_url!r}, retry={self.retry_policy!r})"

    @property
    def breaker(self) -> Breaker | None:
        """The library gate's breaker (None with another gate, or without one)."""
        return self.gate.breaker if isinstance(self.gate, PolicyGate) else None

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The library gate's rate limiter (None with another gate, or without one)."""
        return self.gate.rate_limiter if isinstance(self.gate, PolicyGate) else None

    def with_http(self, http: httpx.AsyncClient) -> BaseClient:
        """This client over another connection pool, sharing its gate.

        httpcore scans every pooled connection on each request (``has_expired`` is a
        ``select`` per connection), so N busy callers on one pool cost O(N) per request;
        the forwarder gives each worker its own one-connection pool instead.
        """
        return BaseClient(self.base_url, http=http, retry=self.retry_policy, gate=self.gate,
                          cache=self.cache, metrics=self.metrics)

    def with_gate(self, gate: Gate) -> BaseClient:
        """This client (same pool) admitted by another gate."""
        return BaseClient(self.base_url, http=self.http, retry=self.retry_policy, gate=gate,
                          cache=self.cache, metrics=self.metrics)

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # --- the public call ----------------------------------------------------------------------

    @overload
    async def request(
        self, method: str, path: str, *, json: Any = ..., content: bytes | None = ...,
        headers: Mapping[str, str] | None = ..., idempotency_key: str | None = ...,
        retry: bool = ..., response_type: type[T], params: Mapping[str, str] | None = ...,
        idempotent: bool | None = ..., cache: bool = ..., max_body: int = ...,
    ) -> T: ...

    @overload
    async def request(
        self, method: str, path: str, *, json: Any = ..., content: bytes | None = ...,
        headers: Mapping[str, str] | None = ..., idempotency_key: str | None = ...,
        retry: bool = ..., response_type: None = ..., params: Mapping[str, str] | None = ...,
        idempotent: bool | None = ..., cache: bool = ..., max_body: int = ...,
    ) -> Any: ...

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        retry: bool = True,
        response_type: type[T] | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        cache: bool = True,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> T | Any:
        """Call ``method base_url+path`` and return the decoded body.

        Each attempt is one exchange bounded by the HTTP client's timeout in total
        (``client.timeout``: connect, send, answer and body together), its body read up to
        *max_body* bytes (an error body up to 64 KiB; see ``mfo_actors.client._transport``).

        Args:
          json: A value to send as JSON (dicts, lists, msgspec Structs).
          content: An already-encoded body, sent as ``application/json`` unless *headers*
            say otherwise (the forwarder's stored events).
          headers: Extra request headers.
          idempotency_key: Sent as ``Idempotency-Key``; makes a POST retryable.
          retry: ``False``: exactly one attempt (the 401 re-login still happens).
          response_type: Decode the body into this type (a Struct); ``None``: plain JSON
            (``None`` for an empty body).
          params: Query string parameters.
          idempotent: Override the method's rule (``True``: a POST that is safe to repeat,
            such as an upsert or a query, is retried without sending a key).
          cache: ``False``: a GET neither read from nor written to the response cache
            (state that changes on its own, such as a job being polled).
          max_body: Bytes of a 2xx answer read at most; a longer one is a ValidationError
            (the forwarder, which ignores the body of an acknowledgement, passes little).

        Raises:
          APIError: a 4xx answer (``AuthError`` for 401/403 after one re-login).
          RetryableError: network error, timeout, 408, 429 or 5xx, after the retries.
          ValidationError: the body does not match *response_type* (names the field), or
            *json* cannot be encoded.
          CircuitBreakerError: the breaker is open; nothing was sent.
        """
        method = method.upper()
        body, send_headers = self._prepare(json, content, headers, idempotency_key)
        url = self.url(path)
        endpoint = endpoint_label(path)
        store = self.cache
        cache_key: str | None = None
        generation = 0
        if store is not None:
            if method != "GET":
                store.invalidate(path)  # before sending: a read racing the write refetches
            elif cache:
                cache_key = store.key(url, params)
                hit = store.get(cache_key)
                self.metrics.cache(hit is not None)
                if hit is not None:
                    return self._decode_body(hit.body, response_type)
                # A write to the group before this answer is in moves the generation on:
                # the answer may then predate the write, and is not kept.
                generation = store.generation(path)

        async def attempt() -> T | Any:
            try:
                response = await self._attempt(method, url, body, send_headers, params,
                                               endpoint, max_body)
                result = self._decode(response, response_type, max_body)
            except ClientError as exc:
                self.metrics.error(endpoint, exc)
                raise
            if cache_key is not None and store is not None:
                store.put(cache_key, path, response.status_code, response.headers,
                          response.content, generation=generation)
            return result

        try:
            if retry and self.retry_policy is not None:
                if idempotent is not None:
                    # The policy decides by method and key; present the caller's verdict so.
                    retry_method = "PUT" if idempotent else "POST"
                    return await self.retry_policy.call(attempt, method=retry_method,
                                                        idempotency_key=None)
                return await self.retry_policy.call(
                    attempt, method=method, idempotency_key=idempotency_key)
            return await attempt()
        finally:
            if store is not None and method != "GET":
                # Again once the write is answered (or failed): a GET sent while it was in
                # flight may have read the state before it; its answer is not kept either.
                store.invalidate(path)

    async def get(self, path: str, *, response_type: type[T] | None = None,
                  params: Mapping[str, str] | None = None, retry: bool = True,
                  cache: bool = True) -> T | Any:
        return await self.request("GET", path, response_type=response_type, params=params,
                                  retry=retry, cache=cache)

    async def post(self, path: str, *, json: Any = None, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None,
                   idempotency_key: str | None = None, retry: bool = True,
                   response_type: type[T] | None = None,
                   idempotent: bool | None = None) -> T | Any:
        return await self.request("POST", path, json=json, content=content, headers=headers,
                                  idempotency_key=idempotency_key, retry=retry,
                                  response_type=response_type, idempotent=idempotent)

    async def put(self, path: str, *, json: Any = None, retry: bool = True,
                  response_type: type[T] | None = None) -> T | Any:
        return await self.request("PUT", path, json=json, retry=retry,
                                  response_type=response_type)

    async def delete(self, path: str, *, retry: bool = True,
                     response_type: type[T] | None = None) -> T | Any:
        return await self.request("DELETE", path, retry=retry, response_type=response_type)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Open a streaming response (SSE): one attempt, no retry once bytes may have flowed.

        Yields the ``httpx.Response`` after a 2xx head; an error status is raised as the
        typed error (its body read first) before anything is yielded.
        """
        method = method.upper()
        body, send_headers = self._prepare(json, None, headers, None)
        send_headers.setdefault("accept", "text/event-stream")
        url = self.url(path)
        endpoint = endpoint_label(path)
        metrics = self.metrics
        try:
            admission = await self.gate.admit()
        except ClientError as exc:
            metrics.error(endpoint, exc)
            raise
        auth_header = admission.header
        relogged = False
        settled = False  # an outcome reached the gate; else its slot is given back
        try:
            while True:
                request = self.http.build_request(
                    method, url, content=body,
                    headers=self._with_auth(send_headers, auth_header))
                started = time.perf_counter()
                try:
                    response = await self.http.send(request, stream=True)
                except httpx.TransportError as exc:
                    settled = True
                    await admission.settle(ok=False, failure=True, status=None)
                    metrics.exchange(endpoint, None, time.perf_counter() - started)
                    lost = classify_transport_error(exc)
                    metrics.error(endpoint, lost)
                    raise lost from exc
                metrics.exchange(endpoint, response.status_code, time.perf_counter() - started)
                try:
                    if response.status_code == 401 and not relogged:
                        await response.aread()
                        new_header = await admission.reauth()
                        if new_header is not None:
                            log.info("client.relogin", reason="401")
                            relogged, auth_header = True, new_header
                            continue
                    if not response.is_success:
                        try:
                            with anyio.fail_after(total_timeout(self.http)):
                                content, _ = await read_capped(response, ERROR_BODY_CAP)
                        except (httpx.TransportError, TimeoutError) as exc:
                            settled = True
                            await admission.settle(ok=False, failure=True, status=None)
                            raise classify_transport_error(exc) from exc
                        error = classify_response(response.status_code, response.headers,
                                                  content)
                        settled = True
                        await self._settle(admission, error, response.status_code)
                        if error is not None:
                            metrics.error(endpoint, error)
                            raise error
                    settled = True
                    await admission.settle(ok=True, failure=False, status=response.status_code)
                    yield response
                    return
                finally:
                    await response.aclose()
        except BaseException:
            if not settled:
                admission.abandon()  # cancelled, or a local error before any outcome
            raise

    # --- one attempt --------------------------------------------------------------------------

    def _prepare(
        self, json: Any, content: bytes | None, headers: Mapping[str, str] | None,
        idempotency_key: str | None,
    ) -> tuple[bytes | None, dict[str, str]]:
        send_headers = {k.lower(): v for k, v in (headers or {}).items()}
        body: bytes | None = None
        if content is not None:
            body = content
            send_headers.setdefault("content-type", _JSON)
        elif json is not None:
            try:
                body = _encoder.encode(json)
            except (TypeError, msgspec.EncodeError) as exc:
                raise ValidationError(str(exc), field=None, direction="request") from None
            send_headers.setdefault("content-type", _JSON)
        send_headers.setdefault("accept", _JSON)
        if idempotency_key:
            send_headers["idempotency-key"] = idempotency_key
        return body, send_headers

    @staticmethod
    def _with_auth(headers: dict[str, str], auth_header: str | None) -> dict[str, str]:
        if auth_header is None:
            return headers
        return {**headers, "authorization": auth_header}

    async def _send(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str],
        params: Mapping[str, str] | None, auth_header: str | None, endpoint: str,
        max_body: int,
    ) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = await exchange(
                self.http, method, url, content=body,
                headers=self._with_auth(headers, auth_header), params=params,
                max_body=max_body)
        except RetryableError as exc:
            self.metrics.exchange(endpoint, None, time.perf_counter() - started)
            log.debug("client.transport_error", method=method, url=url, error=str(exc))
            raise
        elapsed = time.perf_counter() - started
        self.metrics.exchange(endpoint, response.status_code, elapsed, len(response.content))
        log.debug("client.response", method=method, url=url, status=response.status_code,
                  elapsed_ms=round(elapsed * 1000, 1))
        return response

    async def _attempt(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str],
        params: Mapping[str, str] | None, endpoint: str, max_body: int,
    ) -> httpx.Response:
        admission = await self.gate.admit()
        try:
            response = await self._send(method, url, body, headers, params, admission.header,
                                        endpoint, max_body)
            if response.status_code == 401:
                new_header = await admission.reauth()
                if new_header is not None:
                    log.info("client.relogin", reason="401")
                    response = await self._send(method, url, body, headers, params, new_header,
                                                endpoint, max_body)
        except RetryableError as exc:
            await admission.settle(ok=False, failure=is_upstream_failure(exc), status=exc.status)
            raise
        except APIError as exc:  # the re-login itself was refused
            await admission.settle(ok=False, failure=False, status=exc.status)
            raise
        except BaseException:
            admission.abandon()  # cancelled, or a local error: no outcome, but free the slot
            raise
        error = classify_response(response.status_code, response.headers, response.content)
        await self._settle(admission, error, response.status_code)
        if error is not None:
            raise error
        return response

    @staticmethod
    async def _settle(admission: Admission, error: Exception | None, status: int) -> None:
        if error is None:
            await admission.settle(ok=True, failure=False, status=status)
        else:
            await admission.settle(ok=False, failure=is_upstream_failure(error), status=status)

    @classmethod
    def _decode(cls, response: httpx.Response, response_type: type[T] | None,
                max_body: int = DEFAULT_MAX_BODY) -> T | Any:
        if was_truncated(response):
            raise ValidationError(f"answer body larger than {max_body} bytes", field=None)
        return cls._decode_body(response.content, response_type)

    @staticmethod
    def _decode_body(body: bytes, response_type: type[T] | None) -> T | Any:
        if response_type is None:
            if not body.strip():
                return None
            try:
                return msgspec.json.decode(body)
            except msgspec.DecodeError as exc:
                raise ValidationError(f"not JSON: {exc}", field=None) from None
        try:
            return _decoder(response_type).decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ValidationError.from_msgspec(exc) from None

