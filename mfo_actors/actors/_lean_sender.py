"""The forwarder's default sender: ``POST /api/events`` on the lean HTTP client.

:class:`LeanSender` is an :class:`~mfo_actors.actors._delivery.EventSender` that sends over an
:class:`~mfo_actors.http.UpstreamPool` (kept-alive connections, the head built once, httptools
for the answer) instead of httpx: ~1.5 ms of CPU per event with httpx, a fraction of it here
(``benchmarks/client.py``). Everything else is the client's, so an outcome is the same as
:class:`~mfo_actors.actors._delivery.ClientSender`'s in every case:

* admission through the same gate (breaker, token, rate limit), one outcome settled per
  attempt, the one re-login on a 401 (``Admission.reauth``);
* the answer classified by :func:`~mfo_actors.client.classify_response` (only a 2xx is a
  delivery; a 3xx is a failure, never followed; 408/429/5xx carry ``Retry-After``), its body
  read up to ``ERROR_BODY_CAP`` bytes, a 2xx body that is cut off or not JSON still a delivery;
* each exchange bounded by ``client.timeout`` (a ``timeout`` failure), the whole send by the
  forwarder's ``send_by`` (``late``); the errors mapped to a ``Sent`` by the same function;
* the ``mfo_upstream_*`` metrics counted as the client counts them.

One deadline per send: a single cancel scope whose deadline is ``send_by`` while admitting
and the nearer of ``send_by`` and ``client.timeout`` from the exchange's start; which one
fired decides between ``failed`` (timeout) and ``late``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import msgspec

from mfo_actors import __version__
from mfo_actors.actors._delivery import (
    EVENTS_PATH,
    EventSender,
    SenderFactory,
    Sent,
    sent_for_error,
)
from mfo_actors.client import (
    ERROR_BODY_CAP,
    APIError,
    ClientError,
    RetryableError,
    ValidationError,
    classify_response,
    is_upstream_failure,
    upstream_ssl_context,
)
from mfo_actors.http import ClientResponse, ExchangeError, UpstreamPool, header_line
from mfo_actors.observability import get_logger
from mfo_actors.runtime import SystemClock

if TYPE_CHECKING:
    import ssl

    from mfo_actors.client import Admission, BaseClient, Gate, RequestMetrics
    from mfo_actors.messages import Event
    from mfo_actors.runtime import Clock

__all__ = ["LeanSender", "lean_senders"]

log = get_logger(__name__)

_FIXED_HEADERS = (header_line("Accept", "application/json")
                  + header_line("Accept-Encoding", "identity")
                  + header_line("Content-Type", "application/json")
                  + header_line("User-Agent", f"mfo-actors/{__version__}"))
# What an exchange error is called in a RetryableError (the words classify_transport_error
# uses for httpx's errors of the same kind).
_KIND_WORDS = {"connect": "connection failed", "closed": "connection closed by server",
               "network": "network error", "protocol": "connection closed by server"}


class LeanSender:
    """Sends events over *pool*, admitted by *gate* (see the module docstring).

    Args:
      pool: The connections to ``{base_url}/api/events``.
      gate: The upstream's gate (the daemon's ``UpstreamGate``).
      clock: Time for the ``send_by`` deadline and ``Sent.at`` (a ``FakeClock`` in tests).
      timeout: Seconds one exchange may take in all (``client.timeout``); None: no bound.
      metrics: Where exchanges and errors are counted (the client's).
    """

    def __init__(self, pool: UpstreamPool, gate: Gate, clock: Clock, *,
                 timeout: float | None, metrics: RequestMetrics) -> None:
        self._pool = pool
        self._gate = gate
        self._clock = clock
        self._timeout = timeout
        self._metrics = metrics
        self._anyio_clock = isinstance(clock, SystemClock)  # its monotonic() is anyio's
        self._auth_value: str | None = None
        self._auth_line = b""

    async def send(self, event: Event, body: bytes, *, send_by: float) -> Sent:
        clock = self._clock
        at, started = clock.now(), clock.monotonic()
        now = started if self._anyio_clock else anyio.current_time()
        state = _Attempt(now + max(0.0, send_by - started))
        scope = state.scope
        try:
            with scope:
                await self._attempt(event, body, state)
            if scope.cancelled_caught:
                await state.timed_out(self)
        except Exception as exc:
            if isinstance(exc, ClientError):
                self._metrics.error(EVENTS_PATH, exc)
            return sent_for_error(exc, event, at=at,
                                  latency=max(0.0, clock.monotonic() - started))
        return Sent("delivered", at=at, latency=max(0.0, clock.monotonic() - started))

    async def _attempt(self, event: Event, body: bytes, state: _Attempt) -> None:
        admission = await self._gate.admit()
        state.admission = admission
        try:
            lines = self._lines(event.id, admission.header)
            response = await self._exchange(body, lines, state)
            if response.status == 401:
                state.widen()  # the re-login waits under the send's deadline
                new_header = await admission.reauth()
                if new_header is not None:
                    log.info("client.relogin", reason="401")
                    response = await self._exchange(body, self._lines(event.id, new_header),
                                                    state)
        except RetryableError as exc:
            state.admission = None
            await admission.settle(ok=False, failure=is_upstream_failure(exc),
                                   status=exc.status)
            raise
        except APIError as exc:  # the re-login itself was refused
            state.admission = None
            await admission.settle(ok=False, failure=False, status=exc.status)
            raise
        except BaseException:
            if not (state.exchanging and state.scope.cancel_called):
                # Cancelled from outside, or a local error: no outcome, free the slot. (Our
                # own deadline mid-exchange is a timeout, settled by timed_out.)
                state.admission = None
                admission.abandon()  # cancelled, or a local error: free the slot
            raise
        state.admission = None
        error = classify_response(response.status, response.headers, response.body)
        if error is None:
            await admission.settle(ok=True, failure=False, status=response.status)
            _check_ack(response)
            return
        await admission.settle(ok=False, failure=is_upstream_failure(error),
                               status=response.status)
        raise error

    async def _exchange(self, body: bytes, lines: bytes, state: _Attempt) -> ClientResponse:
        state.narrow(self._timeout)
        state.exchanging = True
        started = time.perf_counter()
        try:
            response = await self._pool.post(body, header_lines=lines, cap=ERROR_BODY_CAP)
        except ExchangeError as exc:
            state.exchanging = False
            self._metrics.exchange(EVENTS_PATH, None, time.perf_counter() - started)
            raise RetryableError(f"{_KIND_WORDS[exc.kind]}: {exc.detail}") from exc
        except BaseException:
            state.elapsed = time.perf_counter() - started
            raise
        state.exchanging = False
        self._metrics.exchange(EVENTS_PATH, response.status, time.perf_counter() - started,
                               len(response.body))
        return response

    def _lines(self, event_id: str, auth: str | None) -> bytes:
        """The per-request header lines (the auth line cached while the token lasts)."""
        if auth != self._auth_value:
            self._auth_line = b"" if auth is None else header_line("Authorization", auth)
            self._auth_value = auth
        return self._auth_line + header_line("Idempotency-Key", event_id)

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @property
    def metrics(self) -> RequestMetrics:
        return self._metrics


class _Attempt:
    """Where one send is: its cancel scope, its admission while unsettled, and whether the
    scope's deadline is ``client.timeout``'s (set when an exchange starts) or ``send_by``'s.

    The deadline is narrowed when an exchange starts and left so after it (what follows,
    settling the outcome, does not wait), but for a re-login (:meth:`widen`): a deadline
    change costs a timer on asyncio, and this keeps it to one per send.
    """

    __slots__ = ("admission", "elapsed", "exchange_bound", "exchanging", "scope", "send_by")

    def __init__(self, send_by: float) -> None:
        self.send_by = send_by  # on anyio's clock
        self.scope = anyio.CancelScope(deadline=send_by)
        self.admission: Admission | None = None
        self.exchange_bound = False  # the deadline is client.timeout's, not send_by's
        self.exchanging = False
        self.elapsed = 0.0

    def narrow(self, timeout: float | None) -> None:
        """An exchange starts: bound it by *timeout* too (whichever comes first). The
        deadline is ``send_by``'s here: the first exchange, or the second after
        :meth:`widen`."""
        if timeout is None:
            return
        bound = anyio.current_time() + timeout
        if bound < self.send_by:
            self.scope.deadline = bound
            self.exchange_bound = True

    def widen(self) -> None:
        """Back to the send's own deadline (before a wait that is not an exchange)."""
        if self.exchange_bound:
            self.exchange_bound = False
            self.scope.deadline = self.send_by

    async def timed_out(self, sender: LeanSender) -> None:
        """The scope's deadline passed: a ``timeout`` failure of the exchange (settled as
        one, raised as a ``RetryableError``) or the send deadline (``TimeoutError``: late)."""
        admission, self.admission = self.admission, None
        if self.exchange_bound and admission is not None:
            sender.metrics.exchange(EVENTS_PATH, None, self.elapsed)
            await admission.settle(ok=False, failure=True, status=None)
            raise RetryableError(f"timeout: no complete answer within {sender.timeout:g}s")
        if admission is not None:
            admission.abandon()
        raise TimeoutError


def _check_ack(response: ClientResponse) -> None:
    """Raise as the client does for a 2xx body it cannot read (the event is delivered)."""
    if response.truncated:
        raise ValidationError(f"answer body larger than {ERROR_BODY_CAP} bytes", field=None)
    body = response.body
    if body and body.strip():
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ValidationError(f"not JSON: {exc}", field=None) from None


def lean_senders(client: BaseClient, clock: Clock, *, timeout: float | None,
                 ssl_context: ssl.SSLContext | None = None, max_idle: int = 1
                 ) -> SenderFactory:
    """One :class:`LeanSender` per forwarder worker, each with its own pool (a worker sends
    one request at a time, so one kept-alive connection each), admitted by *client*'s gate
    and counted in its metrics.

    Args:
      client: Supplies the base URL, the gate and the metrics (its httpx pool is not used).
      timeout: ``client.timeout``: the bound of one exchange.
      ssl_context: For an https base URL; default :func:`upstream_ssl_context` (as httpx).
    """
    url = client.url(EVENTS_PATH)
    context = ssl_context
    if context is None and url.startswith("https:"):
        context = upstream_ssl_context()

    @contextlib.asynccontextmanager
    async def open_sender() -> AsyncIterator[EventSender]:
        pool = UpstreamPool(url, ssl_context=context, headers=_FIXED_HEADERS,
                            max_idle=max_idle)
        try:
            yield LeanSender(pool, client.gate, clock, timeout=timeout,
                             metrics=client.metrics)
        finally:
            with anyio.CancelScope(shield=True):
                await pool.aclose()

    return open_sender
