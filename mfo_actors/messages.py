"""The messages that travel between actors over typed channels.

All are frozen msgspec Structs, tagged by ``kind`` so a union of them can be decoded from the
wire. Times are Unix seconds (float) from the
wall clock unless a field says otherwise.

A flow trigger is not a message: it is a ``store.RunRequest`` written in the same
transaction as its event (or cron tick), so a crash cannot lose it; the scheduler claims
runs from the store.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "BreakerState",
    "BreakerStateName",
    "DeliveryOutcome",
    "Event",
    "EventStored",
    "Message",
    "RunResult",
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


class EventStored(Message, frozen=True):
    """An event is durable; wakes the forwarder without waiting for its poll interval."""

    id: str
    source: str


class DeliveryOutcome(Message, frozen=True):
    """The result of one call to an upstream, reported to its breaker.

    ``failure`` is True for what should count against the breaker: network errors,
    timeouts, 5xx and 429; a 4xx answer is the caller's fault and is not a failure.
    """

    upstream: str
    ok: bool
    failure: bool
    status: int | None = None
    latency_s: float = 0.0
    error: str | None = None


class TokenIssued(Message, frozen=True):
    """The auth refresher has a (new) bearer token for the client's auth provider."""

    token: str
    expires_at: float | None = None  # None: unknown lifetime (static tokens)


class TokenRejected(Message, frozen=True):
    """A caller got 401 with this token; the refresher re-logins once for everyone."""

    token: str | None


BreakerStateName = Literal["closed", "open", "half_open"]


class BreakerState(Message, frozen=True):
    """A breaker changed state; sent to every subscriber and exported as ``mfo_breaker_state``."""

    upstream: str
    state: BreakerStateName
    since: float
    retry_at: float | None = None  # when an open breaker lets the first probe through


TriggerKind = Literal["event", "cron", "interval", "manual", "subflow", "rerun"]
RunStatus = Literal["new", "active", "done", "error"]


class RunResult(Message, frozen=True):
    """A run finished (done or error), with the flow's declared outputs."""

    run_id: str
    flow: str
    status: RunStatus
    error: str | None = None
    outputs: dict[str, Any] = msgspec.field(default_factory=dict)
    interrupted: bool = False
