"""The messages that travel between actors.

All are frozen msgspec Structs, tagged by ``kind`` so a union of them can be decoded from the
wire. Times are Unix seconds (float) from the wall clock unless a field says otherwise. Who
sends each and who receives it is declared in one place, ``mfo_actors/daemon/_graph.py``
(``mfo-actors check --graph`` prints it); a test holds every message here to a producer and a
consumer in the running daemon.

* :class:`Event`: listener -> forwarder, through the durable store (the mailbox that
  survives kill -9);
* :class:`DeliveryOutcome`: one per attempt, from whoever sent it (through the gate) to the
  breaker actor;
* :class:`BreakerState`: the breaker actor's watch (latest value), read by the gate, the
  forwarder and the scheduler;
* :class:`TokenIssued`: the auth actor's watch, read by the gate (every caller's header);
* :class:`TokenRejected`: a caller that got 401 -> the auth actor.

A flow trigger is not a message: it is a ``store.RunRequest`` written in the same
transaction as its event (or cron tick), so a crash cannot lose it; the scheduler claims
runs from the store.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "BreakerState",
    "BreakerStateName",
    "DeliveryOutcome",
    "Event",
    "Message",
    "RunStatus",
    "TokenIssued",
    "TokenRejected",
    "TriggerKind",
]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag=True):
    """Base for everything that crosses a channel."""


class Event(Message, frozen=True):
    """An accepted webhook (or other inbound event), as stored and as forwarded.

    ``body`` is the raw request body; for JSON routes it is valid JSON and is forwarded as
    the ``payload`` value without being decoded and re-encoded.
    """

    id: str
    source: str
    type: str
    received_at: float
    headers: dict[str, str]
    body: bytes
    content_type: str = "application/json"
    is_json: bool = True
    dedupe_key: str | None = None  # the provider's delivery id, when one was sent
    # ``forwarder.ordering: key``: the key taken from the request at acceptance (events with
    # the same key are delivered in acceptance order). None: ordered with its source.
    ordering_key: str | None = None

    @property
    def lane(self) -> str:
        """The delivery lane: events of one lane reach the server one at a time, in
        acceptance order (ordered modes). The ordering key, else the source."""
        return self.source if self.ordering_key is None else self.ordering_key


class DeliveryOutcome(Message, frozen=True):
    """The outcome of one attempt to an upstream, reported to its breaker actor.

    ``failure`` is True for what should count against the breaker: network errors,
    timeouts, 5xx and 429; a 4xx answer is the caller's fault and is not a failure.
    """

    upstream: str
    ok: bool
    failure: bool
    status: int | None = None
    latency_s: float = 0.0


class TokenIssued(Message, frozen=True):
    """The auth actor's current bearer token (the value of its token watch)."""

    token: str
    expires_at: float | None = None  # None: unknown lifetime (static tokens)


class TokenRejected(Message, frozen=True):
    """A caller got 401 with this token; the auth actor logs in again once for everyone."""

    token: str | None


BreakerStateName = Literal["closed", "open", "half_open"]


class BreakerState(Message, frozen=True):
    """The breaker's state (the value of the breaker actor's watch; ``mfo_breaker_state``)."""

    upstream: str
    state: BreakerStateName
    since: float
    retry_at: float | None = None  # when an open breaker lets the first probe through


TriggerKind = Literal["event", "cron", "interval", "manual", "subflow", "rerun"]
RunStatus = Literal["new", "active", "done", "error"]
