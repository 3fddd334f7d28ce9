"""The forwarder: delivers stored events to ``POST {base_url}/api/events``, durably.

One dispatcher task claims due events from the store and hands them to a fixed pool of
``forwarder.concurrency`` worker tasks over a bounded channel (cheaper than a task per event);
it never claims more than there are idle workers, so a claimed event is sent right away and
its lease is not spent waiting in a queue. Each worker POSTs one event (one attempt,
``retry=False``: retries are durable reschedules, not in-memory loops) and settles it:

* 2xx: ``mark_delivered`` (``mfo_events_forwarded_total``, ``mfo_forward_latency_seconds``
  from acceptance to delivery). A 2xx whose body is not the expected JSON still counts as
  delivered: the server took the event. Only a 2xx: a 3xx (a redirect at a load balancer)
  is a retryable error, never followed.
* :class:`RetryableError` (network, timeout, 3xx, 408, 429, 5xx): ``reschedule`` at
  ``now + compute_backoff(attempt, client.retry, retry_after)`` (full jitter, ``Retry-After``
  as a floor; ``mfo_events_retried_total``), or ``dead_letter`` once ``client.retry.max_attempts``
  attempts have failed (see "What an attempt is" below).
* 401/403 after the client's one re-login (:class:`AuthError`): the event is rescheduled
  like a retryable failure (and dead-lettered only when the attempts run out, from where
  ``events replay`` brings it back). No token in time (logins failing): rescheduled, no
  attempt counted (nothing was sent).
* Any other 4xx (:class:`APIError`): ``dead_letter`` at once with the status and error body
  (``mfo_events_dead_total``); ``events replay`` sends it again.

What an attempt is (what ``client.retry.max_attempts`` counts): a send **the upstream
answered about this event** (an answer that is not a failure of the upstream itself: 2xx,
3xx, 4xx), or a failure of the upstream (no answer, a timeout, 408, 429, 5xx) **while it
was answering others**: the upstream's previous outcome, over every worker, was an answer
(this failure does not continue a run of failures), or another send got an answer while
this one was in flight. A failure that continues a run of failures is an outage, not this
event's fault: the event is rescheduled with backoff, its attempts untouched, however long
the outage lasts (connection refused for an hour, a proxy answering 502, every half-open
probe failing).
So a poison event (one the server always fails on while it takes the others) is
dead-lettered after ``max_attempts``; an outage costs at most the one attempt of the send
that found it, and never dead-letters anything. The price: an event that fails while it is
the only traffic (one source, the server timing out on it alone) cannot be told from an
outage after its first failure, and is retried until the server takes it or an operator
acts; ``events list`` shows its ``last_error``, and the breaker keeps such retries to one
probe per ``reset_timeout``.
Error texts kept in the store (``last_error``) are redacted like log lines: a token the
upstream echoes back is never stored.
* :class:`CircuitBreakerError` (nothing was sent): the worker keeps the event and waits
  for the breaker (``wait_until_callable``) while its lease allows (half of it), then tries
  again; only if the breaker stays shut longer is the event rescheduled to the breaker's
  probe time, without counting an attempt (nothing was sent), so however long an outage
  lasts it never dead-letters an event. This case is also kept rare: the dispatcher does
  not claim while the breaker is open, and in half-open claims no more
  events than there are probe slots. Likewise it claims nothing while the auth refresher
  has no token (``provider.wait_ready()``), so failing logins do not use up attempts.

The breaker sees every attempt exactly once: the ``BaseClient`` calls ``before_call`` and
``record`` when it was built with this breaker (the daemon's wiring); given a client without
a breaker, the forwarder does it itself. While the breaker is open nothing is claimed or sent
(the dispatcher sleeps until the probe time); while failures pile up in the closed state the
workers keep fewer calls in flight than could still open it, so an outage costs about
``failure_threshold`` requests, then ``half_open_max_calls`` per ``reset_timeout``.
The rate limit is the client's (``rate_limiter=`` shared ``TokenBucket``), applied per request.

Ordering guarantee under retries: with ``forwarder.ordering: source`` (the default) the store
lets only the oldest undelivered event of a source be claimed, together with up to
``batch_size`` due events right behind it; one worker sends that run one event after the
other (the next only once the previous was answered 2xx), so events of one source reach
the server in acceptance order, one at a time, without a store round trip per claim. When an
event of the run is rescheduled, the rest of the run is given back unsent (no attempt
counted) and waits behind it: an event being retried holds back the later
events of its source until it is delivered or dead-lettered (head-of-line blocking, by
design). A dead-lettered event no longer holds them back, so after a replay it arrives after
its successors. Sources are independent of each other. With ``ordering: none`` events are
sent as they come due, up to ``concurrency`` at once, and a retried event is overtaken by
later ones. Delivery is at least once: a crash or a shutdown past the deadline leaves claims
unsettled, and the lease (or ``recover_claims`` at start-up) makes them due again, carrying
the same ``Idempotency-Key`` when resent.

Shutdown (:meth:`ForwarderActor.request_stop`): stop claiming; the workers finish the
requests in flight (and settle them) and return; whatever was not claimed stays due in the
store. The supervisor cancels ``run`` if that takes longer than the shutdown deadline.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import msgspec

from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.client._retry import compute_backoff
from mfo_actors.client._transport import ERROR_BODY_CAP
from mfo_actors.client.errors import (
    APIError,
    AuthError,
    CircuitBreakerError,
    RetryableError,
    ValidationError,
    is_upstream_failure,
)
from mfo_actors.messages import DeliveryOutcome
from mfo_actors.metrics import (
    EVENTS_DEAD,
    EVENTS_FORWARDED,
    EVENTS_RETRIED,
    FORWARD_LATENCY,
)
from mfo_actors.observability import get_logger, redact
from mfo_actors.runtime import RestartPolicy, SystemClock
from mfo_actors.store import StoreError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from mfo_actors.client._base import BaseClient
    from mfo_actors.client._breaker import CircuitBreaker
    from mfo_actors.config import InstanceConfig
    from mfo_actors.messages import Event
    from mfo_actors.runtime import ChannelSender, Clock, ReadySignal
    from mfo_actors.store import EventStore, StoredEvent

__all__ = ["EVENTS_PATH", "ForwarderActor", "WireEvent", "encode_event"]

log = get_logger(__name__)

EVENTS_PATH = "/api/events"
LEASE_HOLD_FRACTION = 0.5  # a worker holds a claimed event for the breaker this much of the lease
# A send still unanswered at this fraction of the lease is abandoned and rescheduled, so the
# claim is settled before the lease could hand the event to another worker (which would send
# it a second time while the first request is still open).
LEASE_SEND_FRACTION = 0.9
ERROR_BODY_LIMIT = 2000  # characters of an error body kept in the dead-letter reason


class WireEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``POST /api/events`` (ARCHITECTURE.md, "Wire formats").

    ``payload`` is the webhook's JSON body embedded as is (never decoded and re-encoded),
    or, for raw routes, the body as a string: UTF-8 text, else base64 with
    ``payload_encoding: "base64"``.
    """

    id: str
    source: str
    type: str
    received_at: str  # RFC 3339, UTC, microseconds
    headers: dict[str, str]
    payload: msgspec.Raw | str
    payload_encoding: str | None = None


_encoder = msgspec.json.Encoder()


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def encode_event(event: Event) -> bytes:
    """The wire body for *event* (see :class:`WireEvent`)."""
    payload: msgspec.Raw | str
    encoding: str | None = None
    if event.is_json and event.body.strip():
        payload = msgspec.Raw(event.body)
    else:
        try:
            payload = event.body.decode("utf-8")
        except UnicodeDecodeError:
            payload = base64.b64encode(event.body).decode("ascii")
            encoding = "base64"
    return _encoder.encode(WireEvent(
        id=event.id, source=event.source, type=event.type,
        received_at=_rfc3339(event.received_at), headers=event.headers,
        payload=payload, payload_encoding=encoding,
    ))


class ForwarderActor:
    """Claims due events and delivers them (see the module docstring for every rule).

    Args:
      cfg: ``forwarder`` (concurrency, ordering, batch_size, lease, poll_interval),
        ``client.retry`` (backoff and max_attempts), ``instance`` (metric label).
      store: Where events wait; the forwarder claims and settles them.
      client: The ``BaseClient`` to send with; build it with the shared breaker and rate
        limiter (``MFOClient.from_config(cfg, auth=..., breaker=..., rate_limiter=...).base``).
      breaker: The upstream's breaker (the same object the client holds, if it holds one).
      outcomes: Optional observer channel: one :class:`DeliveryOutcome` per attempt. Not
        for the breaker actor's ``outcomes`` when *client* holds the breaker (it has
        recorded the attempt already).
      clock: Time source (``now()`` for ``next_attempt_at``, ``monotonic()`` for waits).
      rng: Uniform [0, 1) source for the backoff jitter (tests pass a constant).
      http_factory: Makes one connection pool per worker (see ``BaseClient.with_http``);
        None: every worker shares *client*'s pool.

    Attributes:
      delivered, retried, dead: Counts since start (tests and ``health()``).
    """

    name = "forwarder"
    restart = RestartPolicy("permanent")

    def __init__(
        self,
        cfg: InstanceConfig,
        store: EventStore,
        client: BaseClient,
        breaker: CircuitBreaker,
        *,
        outcomes: ChannelSender[DeliveryOutcome] | None = None,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
        http_factory: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        self._cfg = cfg
        self._http_factory = http_factory
        self._fcfg = cfg.forwarder
        self._retry = cfg.client.retry
        self._store = store
        self._client = client
        self._breaker = breaker
        self._outcomes = outcomes
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rng = rng
        self._instance = cfg.instance
        self._concurrency = max(1, self._fcfg.concurrency)
        self._ordered = self._fcfg.ordering == "source"
        # The client applies the breaker itself when it holds one; else we must.
        self._gate_self = getattr(client, "breaker", None) is None
        # The auth refresher's provider can say when a token is there (RefreshingAuth);
        # other providers cannot, and are taken as always ready.
        self._auth_ready: Callable[[], Awaitable[None]] | None = getattr(
            getattr(client, "auth", None), "wait_ready", None)
        self._dispatch_scope: anyio.CancelScope | None = None
        self._idle = self._concurrency
        self._freed = anyio.Event()
        self._stopping = False
        self._stop = anyio.Event()
        # Answers from the upstream that were not failures of the upstream itself (2xx, 3xx,
        # 4xx), all workers together, and whether the last outcome was a failure: they decide
        # whether a failure is an attempt (see "What an attempt is").
        self._answered = 0
        self._failing = False
        self.delivered = 0
        self.retried = 0
        self.dead = 0
        self._last_error: str | None = None

    # -- status ------------------------------------------------------------------------

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """A reload changes the retry policy (``client.retry``) of the next failures; the
        ``forwarder`` section itself needs a restart (its workers are sized at start)."""
        retry = update.cfg.client.retry

        def apply() -> None:
            self._retry = retry

        return apply

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: busy workers and counts (the forwarder is ready while running)."""
        return {
            "ok": True,
            "in_flight": self._concurrency - self._idle,
            "delivered": self.delivered,
            "retried": self.retried,
            "dead": self.dead,
            "breaker": self._breaker.state,
            "last_error": self._last_error,
        }

    # -- the actor ---------------------------------------------------------------------

    async def run(self, ready: ReadySignal) -> None:
        """Deliver until asked to stop; then finish the requests in flight and return."""
        self._stopping = False
        self._idle = self._concurrency
        send, receive = anyio.create_memory_object_stream[tuple[float, list["StoredEvent"]]](
            self._concurrency)
        async with anyio.create_task_group() as workers:
            async with receive:
                for n in range(self._concurrency):
                    workers.start_soon(self._worker, receive.clone(), name=f"forwarder-{n}")
            async with send:
                ready.set()
                log.info("forwarder.started", concurrency=self._concurrency,
                         ordering=self._fcfg.ordering, upstream=self._breaker.upstream)
                with anyio.CancelScope() as dispatch_scope:
                    self._dispatch_scope = dispatch_scope
                    if self._stopping:
                        dispatch_scope.cancel()
                    await self._dispatch(send)
            # The send side is closed: workers finish what they hold, then see end-of-stream.
        log.info("forwarder.stopped", delivered=self.delivered, retried=self.retried,
                 dead=self.dead)

    def request_stop(self) -> None:
        """Stop claiming; in-flight requests finish and settle, then ``run`` returns."""
        self._stopping = True
        if self._dispatch_scope is not None:
            self._dispatch_scope.cancel()

    # -- dispatcher ----------------------------------------------------------------------

    async def _dispatch(self, send: Any) -> None:
        batch = max(1, self._fcfg.batch_size)
        lease = float(self._fcfg.lease)
        ordered = self._fcfg.ordering == "source"
        poll = float(self._fcfg.poll_interval)
        while not self._stopping:
            if self._idle == 0:
                freed = self._freed
                if self._idle == 0:
                    await freed.wait()
                continue
            # Sleep while the breaker is open (until the probe time): nothing is claimed.
            await self._breaker.wait_until_callable()
            if self._auth_ready is not None:
                await self._auth_ready()  # no token (logins failing): claim nothing either
            workers = min(self._idle, batch)
            allowance = self._breaker.allowance()
            if allowance is not None:
                workers = min(workers, max(1, allowance))
            # Each idle worker gets a run: ordered, a source's next events; unordered, a
            # share of the oldest due events (one each while the breaker is counting calls).
            per_worker = 1 if allowance is not None else max(1, batch // self._concurrency)
            try:
                # Shielded: a claim committed but not dispatched would sit out its lease.
                with anyio.CancelScope(shield=True):
                    claimed = await self._store.claim_due(
                        limit=workers if ordered else workers * per_worker, lease=lease,
                        ordered_by_source=ordered, per_source=batch if ordered else 1)
            except StoreError as exc:
                self._last_error = f"claim failed: {exc}"
                log.error("forwarder.claim_failed", error=str(exc))
                await self._clock.sleep(poll)
                continue
            claimed_at = self._clock.monotonic()
            runs = (_runs_by_source(claimed) if ordered
                    else [claimed[i::workers] for i in range(min(workers, len(claimed)))])
            for run in runs:
                self._idle -= 1
                send.send_nowait((claimed_at, run))  # room guaranteed: at most `idle` queued
            if not claimed:
                await self._store.wait_for_events(poll)

    # -- workers -------------------------------------------------------------------------

    async def _worker(self, receive: Any) -> None:
        if self._http_factory is None:
            await self._work(receive, self._client)
            return
        async with self._http_factory() as http:
            await self._work(receive, self._client.with_http(http))

    async def _work(self, receive: Any, client: BaseClient) -> None:
        async with receive:
            async for claimed_at, run in receive:
                # One claim: a single event, or (ordering: source) consecutive events of one
                # source, sent one after another in acceptance order.
                hold_until = claimed_at + float(self._fcfg.lease) * LEASE_HOLD_FRACTION
                sent = 0
                try:
                    # Settles of a run go to the store while the next event is sent (group
                    # commit merges them); the run ends when all are durable. A crash before
                    # that re-sends the event later, under the same Idempotency-Key.
                    async with anyio.create_task_group() as settles:
                        for stored in run:
                            if sent and (self._stopping
                                         or self._clock.monotonic() > hold_until):
                                break
                            sent += 1
                            delivered = await self._deliver(stored, client, hold_until, settles)
                            if not delivered and self._ordered:
                                break  # rescheduled: the rest of its source waits behind it
                    if sent < len(run):
                        await self._release(run[sent:])
                except* StoreError as group:
                    # The settle failed: the claim stays and its lease makes the event due
                    # again (at least once, same Idempotency-Key). except*: a settle raised
                    # inside the `settles` task group arrives wrapped in an ExceptionGroup.
                    exc = group.exceptions[0]
                    self._last_error = f"settle failed: {exc}"
                    log.error("forwarder.settle_failed", event_id=run[0].event.id,
                              error=str(exc))
                finally:
                    self._idle += 1
                    freed, self._freed = self._freed, anyio.Event()
                    freed.set()

    async def _release(self, rest: list[StoredEvent]) -> None:
        """Give back claimed events that were not sent (no attempt counted), due now."""
        now = self._clock.now()
        for stored in rest:
            await self._store.reschedule(
                stored.event.id, stored.claim_token or "", next_attempt_at=now,
                error="not sent yet: an earlier event of its source was not delivered",
                count_attempt=False)

    async def _deliver(self, stored: StoredEvent, client: BaseClient, hold_until: float,
                       settles: TaskGroup) -> bool:
        """Send one claimed event and settle it; True when settled for good (delivered or
        dead), False when rescheduled (later events of its source must wait). A delivered
        event's settle runs in *settles*."""
        event = stored.event
        token = stored.claim_token or ""
        body = encode_event(event)
        lease = float(self._fcfg.lease)
        send_by = hold_until + lease * (LEASE_SEND_FRACTION - LEASE_HOLD_FRACTION)
        while True:
            # Healthy: returns at once. Failing: keeps calls in flight under the threshold.
            await self._wait_for_breaker(hold_until)
            started = self._clock.monotonic()
            send = _Send(at=self._clock.now(), started=started)

            def answered(status: int | None, send: _Send = send) -> _Send:
                return send.answered(status, self._clock.monotonic())

            answers_before = self._answered
            try:
                if self._gate_self:
                    self._breaker.before_call()
                with anyio.fail_after(max(0.0, send_by - started)):
                    await client.request(
                        "POST", EVENTS_PATH, content=body, idempotency_key=event.id,
                        retry=False, max_body=ERROR_BODY_CAP)
            except CircuitBreakerError as exc:
                # Nothing was sent. Keep the event while the lease allows, then give it back.
                # (Only while our breaker agrees it is shut, so the wait above really waits.)
                if (not self._stopping and self._breaker.allowance() == 0
                        and self._clock.monotonic() + exc.retry_in < hold_until):
                    continue
                await self._reschedule(stored, token, delay=exc.retry_in,
                                       error=f"circuit {exc.state}", count=False)
                return False
            except RetryableError as exc:
                failure = is_upstream_failure(exc)
                count = self._is_attempt(failure, answers_before)
                await self._report(started, ok=False, failure=failure, status=exc.status,
                                   error=str(exc))
                return await self._failed(stored, token, str(exc), answered(exc.status),
                                          retry_after=exc.retry_after, count=count)
            except AuthError as exc:
                # 401/403 after the one re-login, or no token (logins failing): not the
                # event's fault, and not the upstream's (the breaker counts it as no failure).
                sent = exc.code != "token_unavailable"
                if sent:
                    await self._report(started, ok=False, failure=False, status=exc.status,
                                       error=str(exc))
                elif self._gate_self:
                    self._breaker.release()  # nothing was sent: no outcome, free the slot
                return await self._failed(stored, token, f"auth: {exc}",
                                          answered(exc.status), retry_after=None,
                                          count=sent, sent=sent)
            except APIError as exc:
                await self._report(started, ok=False, failure=False, status=exc.status,
                                   error=str(exc))
                await self._dead(stored, token, _dead_reason(exc), answered(exc.status))
                return True
            except TimeoutError:
                # Auth waits, the rate limit and the request together outlasted the claim.
                if self._gate_self:
                    self._breaker.release()
                error = f"no answer within {LEASE_SEND_FRACTION:.0%} of the {lease:g}s lease"
                count = self._is_attempt(True, answers_before)
                await self._report(started, ok=False, failure=True, status=None, error=error)
                return await self._failed(stored, token, error, answered(None),
                                          retry_after=None, count=count)
            except ValidationError as exc:
                # A 2xx with a body we could not read: the server has the event.
                log.warning("forwarder.unreadable_ack", event_id=event.id, error=str(exc))
            except Exception as exc:
                # A bug or an unexpected transport error: never lose the event over it.
                if self._gate_self:
                    self._breaker.record(ok=False, failure=True, status=None)
                log.exception("forwarder.unexpected_error", event_id=event.id)
                return await self._failed(stored, token, f"unexpected: {exc!r}",
                                          answered(None), retry_after=None, count=True)
            except BaseException:
                if self._gate_self:
                    self._breaker.release()  # cancelled mid-call: no outcome, free the slot
                raise
            await self._report(started, ok=True, failure=False, status=None, error=None)
            settles.start_soon(self._settle_delivered, stored, token,
                               answered(None))
            return True

    async def _settle_delivered(self, stored: StoredEvent, token: str, send: _Send) -> None:
        event = stored.event
        try:
            await self._store.mark_delivered(event.id, token, sent_at=send.at,
                                             latency=send.latency)
        except StoreError as exc:
            # The lease will make it due again: sent twice at worst, same Idempotency-Key.
            self._last_error = f"settle failed: {exc}"
            log.error("forwarder.settle_failed", event_id=event.id, error=str(exc))
            return
        self.delivered += 1
        EVENTS_FORWARDED.labels(instance=self._instance).inc()
        FORWARD_LATENCY.labels(instance=self._instance).observe(
            max(0.0, self._clock.now() - event.received_at))
        log.debug("forwarder.delivered", event_id=event.id, source=event.source,
                  attempt=stored.attempts + 1, latency_ms=_ms(send.latency))

    async def _wait_for_breaker(self, hold_until: float) -> None:
        allowance = self._breaker.allowance()
        if allowance is None or allowance > 0:
            return
        remaining = hold_until - self._clock.monotonic()
        if remaining <= 0:
            return  # before_call decides; a refusal is handled by the caller
        with anyio.move_on_after(remaining):
            await self._breaker.wait_until_callable()

    def _is_attempt(self, failure: bool, answered_before: int) -> bool:
        """Whether a send that ended this way counts as an attempt (see the module doc);
        call before :meth:`_report` records it."""
        return not failure or not self._failing or self._answered > answered_before

    async def _report(self, started: float, *, ok: bool, failure: bool, status: int | None,
                      error: str | None) -> None:
        if failure:
            self._failing = True
        else:
            self._answered += 1
            self._failing = False
        if self._gate_self:
            self._breaker.record(ok=ok, failure=failure, status=status)
        if self._outcomes is not None:
            await self._outcomes.send(DeliveryOutcome(
                upstream=self._breaker.upstream, ok=ok, failure=failure, status=status,
                latency_s=max(0.0, self._clock.monotonic() - started), error=error))

    async def _failed(self, stored: StoredEvent, token: str, error: str, send: _Send, *,
                      retry_after: float | None, count: bool, sent: bool = True) -> bool:
        """Reschedule with backoff (False), or dead-letter once attempts run out (True).

        The budget (``client.retry.max_attempts``) counts the attempts since the last replay.
        *count*: whether this was an attempt (see "What an attempt is"); one that was not
        never dead-letters, and backs off as after the event's last counted attempt.
        *sent*: the request went out (``mfo_events_retried_total`` counts those).
        """
        attempt = stored.attempts - stored.attempt_base + 1
        if count and attempt >= self._retry.max_attempts:
            await self._dead(stored, token, f"gave up after {attempt} attempts: {error}", send)
            return True
        if not count:
            error = f"{error} (upstream failing for every event: not counted as an attempt)"
        delay = compute_backoff(attempt, self._retry, retry_after, rng=self._rng)
        await self._reschedule(stored, token, delay=delay, error=error, count=count, send=send,
                               retried=sent)
        return False

    async def _reschedule(self, stored: StoredEvent, token: str, *, delay: float, error: str,
                          count: bool, send: _Send | None = None,
                          retried: bool | None = None) -> None:
        error = redact(error)  # an upstream may echo our token in its error body
        await self._store.reschedule(
            stored.event.id, token, next_attempt_at=self._clock.now() + delay, error=error,
            count_attempt=count, sent_at=send.at if send else None,
            status=send.status if send else None, latency=send.latency if send else None)
        self._last_error = error
        if count if retried is None else retried:
            self.retried += 1
            EVENTS_RETRIED.labels(instance=self._instance).inc()
        log.debug("forwarder.rescheduled", event_id=stored.event.id, source=stored.event.source,
                  attempt=stored.attempts + 1 if count else None, retry_in=round(delay, 3),
                  reason=error, status=send.status if send else None,
                  latency_ms=_ms(send.latency) if send else None)

    async def _dead(self, stored: StoredEvent, token: str, reason: str, send: _Send) -> None:
        reason = redact(reason)  # an upstream may echo our token in its error body
        await self._store.dead_letter(stored.event.id, token, reason=reason, sent_at=send.at,
                                      status=send.status, latency=send.latency)
        self.dead += 1
        self._last_error = reason
        EVENTS_DEAD.labels(instance=self._instance).inc()
        log.warning("forwarder.dead_lettered", event_id=stored.event.id,
                    source=stored.event.source, attempts=stored.attempts + 1, reason=reason)


class _Send:
    """One send of an event, for its attempt history and the per-event debug lines."""

    __slots__ = ("at", "latency", "started", "status")

    def __init__(self, *, at: float, started: float, status: int | None = None,
                 latency: float | None = None) -> None:
        self.at = at  # wall clock, when the request started
        self.started = started  # monotonic, same moment
        self.status = status  # the HTTP status of a refusal (None: no answer, or a 2xx)
        self.latency = latency  # seconds to the answer, once there is one

    def answered(self, status: int | None, now: float) -> _Send:
        """This send with its outcome: *status*, and the latency up to *now* (monotonic)."""
        return _Send(at=self.at, started=self.started, status=status,
                     latency=max(0.0, now - self.started))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _dead_reason(exc: APIError) -> str:
    """``<status> <code>: <message>`` plus the error details, bounded in size."""
    text = f"{exc.status} {exc.code}: {exc.message}"
    if exc.details:
        try:
            text += " " + msgspec.json.encode(exc.details).decode()
        except (TypeError, msgspec.EncodeError):
            text += f" {exc.details!r}"
    return text[:ERROR_BODY_LIMIT]


def _runs_by_source(claimed: list[StoredEvent]) -> list[list[StoredEvent]]:
    """Group a claim by source, keeping acceptance order within each group."""
    runs: dict[str, list[StoredEvent]] = {}
    for stored in claimed:
        runs.setdefault(stored.event.source, []).append(stored)
    return list(runs.values())
