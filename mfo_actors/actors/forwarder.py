"""The forwarder: delivers stored events to ``POST {base_url}/api/events``, durably.

One dispatcher task claims due events from the store and hands them to a fixed pool of
``forwarder.concurrency`` worker tasks over a bounded channel (cheaper than a task per event).
While the upstream is healthy it keeps at most one claimed run queued per worker beside the
one the worker is sending (so a worker never waits for a store round trip between runs, and
a queued run waits one run's time, a small part of its lease); while the breaker counts
failures it claims only for idle workers. Once a claim took all that was due, the next one
waits inside the store for its next write (``claim_due(within=poll_interval)``): a new event
is claimed in the commit that stores it, and nothing is claimed, nor committed, while nothing
comes. Each worker POSTs one event (one attempt,
``retry=False``: retries are durable reschedules, not in-memory loops) and settles it:

* 2xx: delivered (``mark_delivered_many``: one write settles the runs every worker finished
  since the last one, while the workers go on; ``mfo_events_forwarded_total``,
  ``mfo_forward_latency_seconds`` from acceptance to delivery, counted once it is durable).
  A 2xx whose body is not the expected JSON still counts as delivered: the server took the
  event. Only a 2xx: a 3xx (a redirect at a load balancer) is a retryable error, never
  followed.
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
* The breaker refused (nothing was sent): the worker keeps the event and waits on the
  gate (``wait_ready``) while its lease allows (half of it), then tries again; only if the
  breaker stays shut longer is the event rescheduled to the breaker's probe time, without
  counting an attempt (nothing was sent), so however long an outage lasts it never
  dead-letters an event. This case is also kept rare: the dispatcher does not claim while
  the breaker is open, and in half-open claims no more events than there are probe slots.
  Likewise it claims nothing while the auth actor has no token, so failing logins do not use
  up attempts.

One gate per delivery: the forwarder asks one object, the upstream's gate
(:class:`~mfo_actors.client.Gate`; in the daemon the ``UpstreamGate`` over the breaker and
auth actors), whether it may send now (breaker allowance, a token, the rate limit); the
sender's admission reports the attempt's one outcome to the breaker. While the breaker is
open nothing is claimed or sent (the dispatcher waits on the gate until the probe time);
while failures pile up in the closed state the workers keep fewer calls in flight than could
still open it, so an outage costs about ``failure_threshold`` requests, then
``half_open_max_calls`` per ``reset_timeout``.

Each delivery is two steps: *send once* (an :class:`~mfo_actors.actors._delivery.EventSender`
returns a ``Sent`` outcome and never raises for what the upstream did) and *settle that
outcome* (:meth:`ForwarderActor._settle`: delivered, rescheduled or dead-lettered, with its
attempt history). A failure is settled before the worker sends anything else; the events of
a run the upstream took are handed to the **settler**, one background task that writes what
every worker handed in since its last write in one ``mark_delivered_many`` (one store write
per commit cycle, however many workers and runs: with ``ordering: none`` a run is often a
single event, and one write per run made settles half of the store's writes); while other
writes are coming, the store lets that write wait up to ``SETTLE_LINGER`` (5 ms) to share the
commit of the next append or claim. A worker takes
its next claim while the last one's settle commits, but hands in a run only once its
previous one is durable (one unsettled run per worker: a slow store slows the workers down
instead of piling up settles). Until that commit each of those events is still claimed, so
its lane stays blocked behind it and nothing is claimed twice; a crash before it re-sends
them (same ``Idempotency-Key``).

The sender is pluggable (``senders=``): the default sends with the MFO ``BaseClient``
(httpx); the daemon plugs in the lean sender
(:mod:`~mfo_actors.actors._lean_sender`: kept-alive connections, a prebuilt head, httptools)
over the same gate, with the same outcomes.

Ordering guarantee under retries: events travel in **lanes** (``Event.lane``). With
``forwarder.ordering: source`` (the default) an event's lane is its source; with ``ordering:
key`` it is the ordering key the listener read at acceptance (``routes[].ordering_key`` or
``forwarder.ordering_key``), else its source. One code path serves both: the store lets only
the oldest undelivered event of a lane be claimed, together with up to ``batch_size`` due
events right behind it; one worker sends that run one event after the other (the next only
once the previous was answered 2xx), so events of one lane reach the server in acceptance
order, one at a time, without a store round trip per claim, and up to ``concurrency`` lanes
are in flight at once. When an event of the run is rescheduled, the rest of the run is given
back unsent (no attempt counted) and waits behind it: an event being retried holds back the
later events of its lane until it is delivered or dead-lettered (head-of-line blocking, by
design). A dead-lettered event no longer holds them back, so after a replay it arrives after
its successors. Lanes are independent of each other. With ``ordering: none`` events are
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
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import httpx
import msgspec

from mfo_actors.actors._delivery import (
    EVENTS_PATH,
    EventSender,
    SenderFactory,
    Sent,
    client_senders,
)
from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.client import Gate, compute_backoff
from mfo_actors.metrics import (
    EVENTS_DEAD,
    EVENTS_FORWARDED,
    EVENTS_RETRIED,
    FORWARD_LATENCY,
)
from mfo_actors.observability import get_logger, redact
from mfo_actors.runtime import RestartPolicy, SystemClock
from mfo_actors.store import Delivered, StoreError

if TYPE_CHECKING:
    from mfo_actors.client import BaseClient
    from mfo_actors.config import InstanceConfig
    from mfo_actors.messages import Event
    from mfo_actors.runtime import Clock, ReadySignal
    from mfo_actors.store import EventStore, StoredEvent

__all__ = ["EVENTS_PATH", "ForwarderActor", "WireEvent", "encode_event"]

log = get_logger(__name__)

ORDERED_MODES = ("source", "key")  # forwarder.ordering values that deliver lane by lane
# Why claimed events go back unsent (their last_error until they are sent).
RELEASED_BEHIND = "not sent yet: an earlier event of its lane was not delivered"
RELEASED_STOPPING = "not sent: the forwarder stopped"
RELEASED_HELD = "not sent: claimed for half its lease without a free worker"
PREFETCH_RUNS = 2  # runs claimed per worker while healthy: the one it sends and the next
LEASE_HOLD_FRACTION = 0.5  # a worker holds a claimed event for the breaker this much of the lease
# A send still unanswered at this fraction of the lease is abandoned and rescheduled, so the
# claim is settled before the lease could hand the event to another worker (which would send
# it a second time while the first request is still open).
LEASE_SEND_FRACTION = 0.9


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
      client: The ``BaseClient`` to send with; its gate (``client.gate``) is the one the
        forwarder asks before each send (the daemon's: ``client.with_gate(UpstreamGate)``).
      clock: Time source (``now()`` for ``next_attempt_at``, ``monotonic()`` for waits).
      rng: Uniform [0, 1) source for the backoff jitter (tests pass a constant).
      http_factory: Makes one connection pool per worker (see ``BaseClient.with_http``);
        None: every worker shares *client*'s pool.
      senders: Opens one :class:`EventSender` per worker instead of sending with *client*
        (which then only supplies the gate).

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
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
        http_factory: Callable[[], httpx.AsyncClient] | None = None,
        senders: SenderFactory | None = None,
    ) -> None:
        self._cfg = cfg
        self._fcfg = cfg.forwarder
        self._retry = cfg.client.retry
        self._store = store
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._gate: Gate = client.gate
        self._senders = (senders if senders is not None
                         else client_senders(client, self._clock, http_factory))
        self._upstream = client.base_url
        self._rng = rng
        self._instance = cfg.instance
        self._concurrency = max(1, self._fcfg.concurrency)
        self._ordered = self._fcfg.ordering in ORDERED_MODES
        self._dispatch_scope: anyio.CancelScope | None = None
        self._settles = _SettleBatch()  # delivered runs handed to the settler, not written
        self._settle_wanted = anyio.Event()  # the settler has something to write
        self._workers_done = False  # the settler writes what is left and returns
        self._unsettled_runs = 0  # delivered runs whose settle is not durable yet
        self._busy = 0  # runs handed to workers (queued or being sent), not finished
        self._freed = anyio.Event()
        self._stopping = False
        # Answers from the upstream that were not failures of the upstream itself (2xx, 3xx,
        # 4xx), all workers together, and whether the last outcome was a failure: they decide
        # whether a failure is an attempt (see "What an attempt is").
        self._answered = 0
        self._failing = False
        self.delivered = 0
        self.retried = 0
        self.dead = 0
        self._last_error: str | None = None
        self._forwarded = EVENTS_FORWARDED.labels(instance=self._instance)
        self._latency = FORWARD_LATENCY.labels(instance=self._instance)

    # -- status ------------------------------------------------------------------------

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """A reload changes the retry policy (``client.retry``) of the next failures; the
        ``forwarder`` section itself needs a restart (its workers are sized at start)."""
        retry = update.cfg.client.retry

        def apply() -> None:
            self._retry = retry

        return apply

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: work in flight (busy workers, and runs sent whose delivered
        settle is not durable yet) and counts (the forwarder is ready while running)."""
        return {
            "ok": True,
            "in_flight": self._busy + self._unsettled_runs,
            "delivered": self.delivered,
            "retried": self.retried,
            "dead": self.dead,
            "allowance": self._gate.allowance(),
            "last_error": self._last_error,
        }

    # -- the actor ---------------------------------------------------------------------

    async def run(self, ready: ReadySignal) -> None:
        """Deliver until asked to stop; then finish the requests in flight and return."""
        self._stopping = False
        self._busy = 0
        send, receive = anyio.create_memory_object_stream[tuple[float, list["StoredEvent"]]](
            PREFETCH_RUNS * self._concurrency)
        self._settles, self._settle_wanted = _SettleBatch(), anyio.Event()
        self._workers_done = False
        # Outside the workers: a run's delivered settle outlives the worker's turn with it.
        async with anyio.create_task_group() as settling:
            settling.start_soon(self._settler, name="forwarder-settler")
            async with anyio.create_task_group() as workers:
                async with receive:
                    for n in range(self._concurrency):
                        workers.start_soon(self._worker, receive.clone(),
                                           name=f"forwarder-{n}")
                async with send:
                    ready.set()
                    log.info("forwarder.started", concurrency=self._concurrency,
                             ordering=self._fcfg.ordering, upstream=self._upstream)
                    with anyio.CancelScope() as dispatch_scope:
                        self._dispatch_scope = dispatch_scope
                        if self._stopping:
                            dispatch_scope.cancel()
                        await self._dispatch(send)
                # The send side is closed: workers finish what they hold, then see
                # end-of-stream; the settler writes what they handed in, then returns.
            self._workers_done = True
            self._settle_wanted.set()
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
        ordered = self._ordered
        poll = float(self._fcfg.poll_interval)
        drained = False  # the last claim took all that was due: the next waits for writes
        while not self._stopping:
            # Wait while the breaker is open (until the probe time) or there is no token
            # (logins failing): nothing is claimed.
            await self._gate.wait_ready()
            # Healthy (no allowance counted): a run queued per worker besides the one it
            # sends; failing: runs only for idle workers, within the breaker's allowance.
            allowance = self._gate.allowance()
            room = (self._concurrency * (PREFETCH_RUNS if allowance is None else 1)
                    - self._busy)
            if room <= 0:
                await self._freed.wait()
                continue
            workers = min(room, batch)
            if allowance is not None:
                workers = min(workers, max(1, allowance))
            # Each idle worker gets a run: ordered, a lane's next events; unordered, a
            # share of the oldest due events (one each while the breaker is counting calls).
            per_worker = 1 if allowance is not None else max(1, batch // self._concurrency)
            limit = workers if ordered else workers * per_worker
            per_source = batch if ordered else 1
            try:
                if drained:
                    # With the store's next write (a new event is claimed in the commit
                    # that stores it), or after poll_interval; cancelled, it claims nothing.
                    claimed = await self._store.claim_due(
                        limit=limit, lease=lease, ordered_by_source=ordered,
                        per_source=per_source, within=poll)
                else:
                    # Shielded: a claim committed but not dispatched would sit out its lease.
                    with anyio.CancelScope(shield=True):
                        claimed = await self._store.claim_due(
                            limit=limit, lease=lease, ordered_by_source=ordered,
                            per_source=per_source)
            except StoreError as exc:
                self._last_error = f"claim failed: {exc}"
                log.error("forwarder.claim_failed", error=str(exc))
                await self._clock.sleep(poll)
                continue
            claimed_at = self._clock.monotonic()
            runs = (_runs_by_lane(claimed) if ordered
                    else [claimed[i::workers] for i in range(min(workers, len(claimed)))])
            for run in runs:
                self._busy += 1
                send.send_nowait((claimed_at, run))  # room guaranteed: busy <= the bound
            drained = len(runs if ordered else claimed) < limit

    # -- workers -------------------------------------------------------------------------

    async def _worker(self, receive: Any) -> None:
        async with self._senders() as sender:
            await self._work(receive, sender)

    async def _work(self, receive: Any, sender: EventSender) -> None:
        settled: anyio.Event | None = None  # this worker's last background settle is durable
        async with receive:
            async for claimed_at, run in receive:
                # One claim: a single event, or (ordering: source or key) consecutive events
                # of one lane, sent one after another in acceptance order.
                hold_until = claimed_at + float(self._fcfg.lease) * LEASE_HOLD_FRACTION
                sent = 0
                delivered: list[_Delivery] = []
                try:
                    reason = RELEASED_STOPPING
                    for stored in run:
                        # Stopping, or held too long (a run that waited in the queue behind
                        # a slow one): the rest is given back unsent, before its lease ends.
                        if self._stopping:
                            break
                        if self._clock.monotonic() > hold_until:
                            reason = RELEASED_HELD
                            break
                        sent += 1
                        done = await self._deliver(stored, sender, hold_until, delivered)
                        if not done and self._ordered:
                            reason = RELEASED_BEHIND
                            break  # rescheduled: the rest of its lane waits behind it
                    if sent < len(run):
                        # All at once, one commit (a run behind a failed event can be
                        # batch_size - 1 events; one commit after another held the worker).
                        await self._store.release(run[sent:], reason=reason)
                except StoreError as exc:
                    # The settle failed: the claim stays and its lease makes the event due
                    # again (at least once, same Idempotency-Key).
                    self._last_error = f"settle failed: {exc}"
                    log.error("forwarder.settle_failed", event_id=run[0].event.id,
                              error=str(exc))
                finally:
                    if delivered:
                        # One unsettled run per worker: a slow store slows the workers
                        # down instead of piling up settles.
                        if settled is not None:
                            await settled.wait()
                        settled = self._hand_in(delivered)
                    self._busy -= 1
                    freed, self._freed = self._freed, anyio.Event()
                    freed.set()


    async def _deliver(self, stored: StoredEvent, sender: EventSender, hold_until: float,
                       delivered: list[_Delivery]) -> bool:
        """Send one claimed event (once, or again while the breaker holds it and the lease
        allows) and settle the outcome; True when settled for good (delivered: added to
        *delivered*, or dead), False when rescheduled (later events of its lane must
        wait)."""
        body = encode_event(stored.event)
        lease = float(self._fcfg.lease)
        send_by = hold_until + lease * (LEASE_SEND_FRACTION - LEASE_HOLD_FRACTION)
        while True:
            # Healthy: returns at once. Failing: keeps calls in flight under the threshold.
            await self._gate.wait_ready(max(0.0, hold_until - self._clock.monotonic()))
            answers_before = self._answered
            sent = await sender.send(stored.event, body, send_by=send_by)
            if (sent.kind == "held" and not self._stopping and self._gate.allowance() == 0
                    and self._clock.monotonic() + sent.retry_in < hold_until):
                continue  # nothing was sent: keep the event while the lease allows
            return await self._settle(stored, sent, answers_before, delivered)

    async def _settle(self, stored: StoredEvent, sent: Sent, answers_before: int,
                      delivered: list[_Delivery]) -> bool:
        """Settle one send's outcome in the store (see the module docstring); True when
        settled for good. A delivered event is only added to *delivered* (its run's
        settle)."""
        token = stored.claim_token or ""
        kind = sent.kind
        if kind == "delivered":
            self._note(failure=False)
            if sent.error is not None:
                log.warning("forwarder.unreadable_ack", event_id=stored.event.id,
                            error=sent.error)
            delivered.append(_Delivery(stored, sent))
            return True
        if kind == "held":
            await self._reschedule(stored, token, delay=sent.retry_in,
                                   error=sent.error or "circuit open", count=False)
            return False
        if kind == "refused":
            self._note(failure=False)
            await self._dead(stored, token, sent.error or f"{sent.status}", sent)
            return True
        if kind == "no_token":
            return await self._failed(stored, token, sent.error or "auth: no token", sent,
                                      retry_after=None, count=False, sent=False)
        if kind == "auth":
            # 401/403 after the one re-login: not the event's fault, and not the upstream's.
            self._note(failure=False)
            return await self._failed(stored, token, sent.error or "auth", sent,
                                      retry_after=None, count=True)
        if kind == "unexpected":
            return await self._failed(stored, token, sent.error or "unexpected", sent,
                                      retry_after=None, count=True)
        # failed, late: the upstream did not take it
        error = sent.error
        if kind == "late":
            lease = float(self._fcfg.lease)
            error = f"no answer within {LEASE_SEND_FRACTION:.0%} of the {lease:g}s lease"
        count = self._is_attempt(sent.failure, answers_before)
        self._note(failure=sent.failure)
        return await self._failed(stored, token, error or "failed", sent,
                                  retry_after=sent.retry_after, count=count)

    def _hand_in(self, delivered: list[_Delivery]) -> anyio.Event:
        """Give a run's delivered events to the settler; the event is set once their
        write returned (committed or failed)."""
        batch = self._settles
        batch.deliveries.extend(delivered)
        batch.runs += 1
        self._unsettled_runs += 1
        self._settle_wanted.set()
        return batch.durable

    async def _settler(self) -> None:
        """Write the delivered runs handed in, all that came since the last write in one,
        until the workers are done and nothing is left."""
        while True:
            batch = self._settles
            if batch.deliveries:
                self._settles = _SettleBatch()  # runs handed in meanwhile: the next write
                await self._settle_delivered(batch)
                continue
            if self._workers_done:
                return
            await self._settle_wanted.wait()
            self._settle_wanted = anyio.Event()  # the buffer is looked at after this

    async def _settle_delivered(self, batch: _SettleBatch) -> None:
        """Settle delivered events in one store write, then count them."""
        delivered = batch.deliveries
        try:
            await self._store.mark_delivered_many([
                Delivered(event_id=d.stored.event.id, claim_token=d.stored.claim_token or "",
                          sent_at=d.sent.at, latency=d.sent.latency, status=d.sent.status)
                for d in delivered])
        except StoreError as exc:
            # The lease will make them due again: sent twice at worst, same Idempotency-Key.
            self._last_error = f"settle failed: {exc}"
            log.error("forwarder.settle_failed", event_id=delivered[0].stored.event.id,
                      events=len(delivered), error=str(exc))
        else:
            now = self._clock.now()
            self.delivered += len(delivered)
            self._forwarded.inc(len(delivered))
            for d in delivered:
                event = d.stored.event
                self._latency.observe(max(0.0, now - event.received_at))
                log.debug("forwarder.delivered", event_id=event.id, source=event.source,
                          attempt=d.stored.attempts + 1, latency_ms=_ms(d.sent.latency))
        finally:
            self._unsettled_runs -= batch.runs
            batch.durable.set()

    def _is_attempt(self, failure: bool, answered_before: int) -> bool:
        """Whether a send that ended this way counts as an attempt (see the module doc);
        call before :meth:`_note` counts it."""
        return not failure or not self._failing or self._answered > answered_before

    def _note(self, *, failure: bool) -> None:
        """Count an outcome of the upstream, for :meth:`_is_attempt`."""
        if failure:
            self._failing = True
        else:
            self._answered += 1
            self._failing = False

    async def _failed(self, stored: StoredEvent, token: str, error: str, send: Sent, *,
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
                          count: bool, send: Sent | None = None,
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

    async def _dead(self, stored: StoredEvent, token: str, reason: str, send: Sent) -> None:
        reason = redact(reason)  # an upstream may echo our token in its error body
        await self._store.dead_letter(stored.event.id, token, reason=reason, sent_at=send.at,
                                      status=send.status, latency=send.latency)
        self.dead += 1
        self._last_error = reason
        EVENTS_DEAD.labels(instance=self._instance).inc()
        log.warning("forwarder.dead_lettered", event_id=stored.event.id,
                    source=stored.event.source, attempts=stored.attempts + 1, reason=reason)


class _Delivery(NamedTuple):
    """A claimed event the upstream took, waiting for its run's settle."""

    stored: StoredEvent
    sent: Sent


class _SettleBatch:
    """Delivered runs (of any workers) that one store write settles."""

    __slots__ = ("deliveries", "durable", "runs")

    def __init__(self) -> None:
        self.deliveries: list[_Delivery] = []
        self.runs = 0
        self.durable = anyio.Event()  # set once the write returned (committed or failed)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _runs_by_lane(claimed: list[StoredEvent]) -> list[list[StoredEvent]]:
    """Group a claim by lane, keeping acceptance order within each group."""
    runs: dict[str, list[StoredEvent]] = {}
    for stored in claimed:
        runs.setdefault(stored.event.lane, []).append(stored)
    return list(runs.values())
