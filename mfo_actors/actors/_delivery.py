"""Send once, return an outcome: the seam between the forwarder and whatever sends its events.

The forwarder decides *when* to send (the gate) and *what an outcome means* for the stored
event (delivered, rescheduled, dead-lettered); an :class:`EventSender` only sends one event
once and says what happened, as a :class:`Sent`. It never raises for anything the upstream
or the network did. :class:`ClientSender` sends with the MFO ``BaseClient`` (one attempt,
through the client's gate; the library's default); the daemon's
:class:`~mfo_actors.actors._lean_sender.LeanSender` implements :class:`EventSender` over the
same gate on a lean HTTP client: admit, send, settle the admission, return a ``Sent``. Both
turn errors into outcomes with :func:`sent_for_error`, so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import msgspec

from mfo_actors.client import (
    ERROR_BODY_CAP,
    APIError,
    AuthError,
    CircuitBreakerError,
    RetryableError,
    ValidationError,
    is_upstream_failure,
)
from mfo_actors.observability import get_logger

if TYPE_CHECKING:
    import httpx

    from mfo_actors.client import BaseClient
    from mfo_actors.messages import Event
    from mfo_actors.runtime import Clock

__all__ = ["EVENTS_PATH", "ClientSender", "EventSender", "SenderFactory", "Sent", "SentKind",
           "client_senders", "sent_for_error"]

log = get_logger(__name__)

EVENTS_PATH = "/api/events"
ERROR_BODY_LIMIT = 2000  # characters of an error body kept in the dead-letter reason

SentKind = Literal["delivered", "failed", "late", "refused", "auth", "no_token", "held",
                   "unexpected"]


class Sent:
    """What one send of one event came to.

    Kinds:
      ``delivered``: a 2xx (``error`` says so when its body could not be read);
      ``failed``: no answer, or 3xx/408/429/5xx (``failure``: the upstream is to blame,
      ``retry_after``: the server's wish);
      ``late``: no answer by the send deadline (the claim's lease would run out);
      ``refused``: any other 4xx (``error`` is the dead-letter reason);
      ``auth``: 401/403 after the one re-login;
      ``no_token``: nothing sent, no token in time;
      ``held``: nothing sent, the breaker refused (``retry_in``, ``error`` names the state);
      ``unexpected``: a bug or an unknown transport error (logged with its traceback).
    """

    __slots__ = ("at", "error", "failure", "kind", "latency", "retry_after", "retry_in",
                 "status")

    def __init__(self, kind: SentKind, *, at: float, latency: float | None,
                 status: int | None = None, error: str | None = None, failure: bool = False,
                 retry_after: float | None = None, retry_in: float = 0.0) -> None:
        self.kind = kind
        self.at = at  # wall clock, when the request started
        self.latency = latency  # seconds to the outcome (None: nothing was sent)
        self.status = status  # the HTTP status of a refusal (None: no answer, or a 2xx)
        self.error = error
        self.failure = failure
        self.retry_after = retry_after
        self.retry_in = retry_in

    def __repr__(self) -> str:
        return f"Sent({self.kind!r}, status={self.status!r}, error={self.error!r})"


class EventSender(Protocol):
    """Sends one event once (see the module docstring)."""

    async def send(self, event: Event, body: bytes, *, send_by: float) -> Sent:
        """POST *body* (the event's wire form) with ``Idempotency-Key: event.id``.

        Args:
          send_by: Monotonic time by which an answer must have come, else ``late``.
        """
        ...


SenderFactory = Callable[[], AbstractAsyncContextManager[EventSender]]
"""Opens one sender per forwarder worker (its own connection pool), closed when it stops."""


class ClientSender:
    """An :class:`EventSender` over the MFO ``BaseClient`` (one attempt, ``retry=False``)."""

    def __init__(self, client: BaseClient, clock: Clock) -> None:
        self._client = client
        self._clock = clock

    async def send(self, event: Event, body: bytes, *, send_by: float) -> Sent:
        clock = self._clock
        at, started = clock.now(), clock.monotonic()

        def took() -> float:
            return max(0.0, clock.monotonic() - started)

        try:
            with anyio.fail_after(max(0.0, send_by - started)):
                await self._client.request(
                    "POST", EVENTS_PATH, content=body, idempotency_key=event.id,
                    retry=False, max_body=ERROR_BODY_CAP)
        except Exception as exc:
            return sent_for_error(exc, event, at=at, latency=took())
        return Sent("delivered", at=at, latency=took())


def sent_for_error(exc: Exception, event: Event, *, at: float, latency: float) -> Sent:
    """The :class:`Sent` for an attempt that raised *exc* (the client's error tree, or
    ``TimeoutError`` from the send deadline): the one mapping every sender shares."""
    if isinstance(exc, CircuitBreakerError):
        return Sent("held", at=at, latency=None, retry_in=exc.retry_in,
                    error=f"circuit {exc.state}")
    if isinstance(exc, RetryableError):
        return Sent("failed", at=at, latency=latency, status=exc.status, error=str(exc),
                    failure=is_upstream_failure(exc), retry_after=exc.retry_after)
    if isinstance(exc, AuthError):
        if exc.code == "token_unavailable":
            return Sent("no_token", at=at, latency=None, error=f"auth: {exc}")
        return Sent("auth", at=at, latency=latency, status=exc.status, error=f"auth: {exc}")
    if isinstance(exc, APIError):
        return Sent("refused", at=at, latency=latency, status=exc.status,
                    error=dead_reason(exc))
    if isinstance(exc, TimeoutError):
        return Sent("late", at=at, latency=latency, failure=True)
    if isinstance(exc, ValidationError):
        # A 2xx with a body we could not read: the server has the event.
        return Sent("delivered", at=at, latency=latency, error=str(exc))
    # A bug or an unexpected transport error: never lose the event over it.
    log.error("forwarder.unexpected_error", event_id=event.id, exc_info=exc)
    return Sent("unexpected", at=at, latency=latency, error=f"unexpected: {exc!r}")


def client_senders(client: BaseClient, clock: Clock,
                   http_factory: Callable[[], httpx.AsyncClient] | None = None
                   ) -> SenderFactory:
    """One :class:`ClientSender` per worker: over *client*'s pool, or each over its own pool
    from *http_factory* (see ``BaseClient.with_http``)."""

    @contextlib.asynccontextmanager
    async def open_sender() -> AsyncIterator[EventSender]:
        if http_factory is None:
            yield ClientSender(client, clock)
            return
        async with http_factory() as http:
            yield ClientSender(client.with_http(http), clock)

    return open_sender


def dead_reason(exc: APIError) -> str:
    """``<status> <code>: <message>`` plus the error details, bounded in size."""
    text = f"{exc.status} {exc.code}: {exc.message}"
    if exc.details:
        try:
            text += " " + msgspec.json.encode(exc.details).decode()
        except (TypeError, msgspec.EncodeError):
            text += f" {exc.details!r}"
    return text[:ERROR_BODY_LIMIT]
