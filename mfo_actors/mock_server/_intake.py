"""Intake routes: what a client hands the server to keep (``/api/events``, ``/api/pay``,
``/api/notifications``).

``POST /api/events`` records each event and dedupes by ``Idempotency-Key`` (falling back to
the body's ``id``): 202 the first time, 200 ``"duplicate": true`` after. ``POST /api/pay``
records a payment (deduped by ``Idempotency-Key``), ``GET /api/pay/{id}`` reads it back.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.mock_server._base import (
    JSON_HEADERS,
    HTTPError,
    MockPart,
    allow,
    decode_typed,
    encode,
    iso,
    json_response,
)

__all__ = ["IntakeRoutes"]


class _Event(msgspec.Struct, gc=False):
    """One unique event as received: its raw body and headers, decoded only when read
    (``/_mock/events``, :attr:`IntakeRoutes.events`), never on the request path.

    Not tracked by the garbage collector (``gc=False``: it refers to no object that could
    refer back to it): the dedupe table grows by every event a benchmark posts, and each
    full collection walked all of it (~7% of the server's CPU at 30,000 events/s)."""

    key: str
    id: str
    received_at: float
    raw: bytes
    sent_headers: dict[str, str]  # the request's own dict (it is not reused)
    count: int = 1
    decoded: Any = None  # the body, once read back (raw is not decoded before)

    @property
    def body(self) -> Any:
        if self.decoded is None:
            self.decoded = msgspec.json.decode(self.raw)
        return self.decoded

    @property
    def headers(self) -> dict[str, str]:
        """The request headers but ``Authorization`` (never kept in what we serve)."""
        return {k: v for k, v in self.sent_headers.items() if k != "authorization"}


class _Probe(msgspec.Struct):
    """What the events route reads of a body: is it an object, and its ``id`` (any type;
    the other fields are skipped, not built)."""

    id: Any = None


_decode_probe = msgspec.json.Decoder(_Probe).decode
# m.EventAck as msgspec writes it, around the encoded id (a test pins the two as equal).
_ACK_ID = b'{"id":'
_ACK_ACCEPTED = b',"status":"accepted","duplicate":false}'
_ACK_DUPLICATE = b',"status":"duplicate","duplicate":true}'


class IntakeRoutes(MockPart):
    """Events, payments and notifications received so far."""

    def _start_intake(self) -> None:
        self._events: dict[str, _Event] = {}
        self._event_log: list[_Event] = []
        self._notifications: list[m.Notification] = []
        self._payments: dict[str, m.Payment] = {}
        self._payment_keys: dict[str, str] = {}  # Idempotency-Key -> transaction id

    @property
    def events(self) -> list[dict[str, Any]]:
        """The unique events received, in arrival order (for in-process tests)."""
        return [{"id": e.id, "idempotency_key": e.key, "count": e.count, "body": e.body}
                for e in self._event_log]

    async def _api_events(self, method: str, rest: list[str], request: Request) -> Response:
        if rest:
            raise HTTPError(404, "not_found", "no such events endpoint")
        return self._post_event(method, request)

    def _post_event(self, method: str, request: Request) -> Response:
        """``POST /api/events`` itself: synchronous, called at once for the exact path."""
        allow(method, "POST")
        try:
            probe = _decode_probe(request.body)
        except msgspec.ValidationError:
            raise HTTPError(400, "invalid_request", "the event must be a JSON object") from None
        except msgspec.DecodeError:
            if not request.body.strip():
                raise HTTPError(400, "invalid_request",
                                "the event must be a JSON object") from None
            raise HTTPError(400, "invalid_request", "body is not valid JSON") from None
        raw_id = probe.id
        key = request.headers.get("idempotency-key") or raw_id
        if not isinstance(key, str) or not key:
            raise HTTPError(400, "invalid_request",
                            "an Idempotency-Key header (or an event id) is required")
        stats = self.stats
        stats.events_received += 1
        seen = self._events.get(key)
        if seen is not None:
            seen.count += 1
            stats.duplicates += 1
            return Response(200, list(JSON_HEADERS),
                            _ACK_ID + encode(seen.id) + _ACK_DUPLICATE)
        event_id: str = raw_id if isinstance(raw_id, str) and raw_id else key
        event = _Event(key, event_id, self._clock(), request.body, request.headers)
        self._events[key] = event
        self._event_log.append(event)
        stats.unique_event_ids += 1
        return Response(202, list(JSON_HEADERS), _ACK_ID + encode(event_id) + _ACK_ACCEPTED)

    async def _api_pay(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            allow(method, "POST")
            key = request.header("idempotency-key")
            if key and key in self._payment_keys:
                return json_response(self._payments[self._payment_keys[key]])
            create = decode_typed(request, m.PaymentCreate)
            if not create.amount > 0 or not create.currency:
                raise HTTPError(400, "invalid_request", "amount must be > 0, with a currency")
            payment = m.Payment(transaction_id=f"tx_{new_id()}", status="success",
                                amount=create.amount, currency=create.currency,
                                description=create.description, created_at=iso(self._clock()))
            self._payments[payment.transaction_id] = payment
            if key:
                self._payment_keys[key] = payment.transaction_id
            self.stats.payments += 1
            return json_response(payment)
        allow(method, "GET")
        found = self._payments.get(rest[0]) if len(rest) == 1 else None
        if found is None:
            raise HTTPError(404, "not_found", f"no payment {'/'.join(rest)}")
        return json_response(found)

    async def _api_notifications(self, method: str, rest: list[str], request: Request
                                 ) -> Response:
        if rest:
            raise HTTPError(404, "not_found", "no such notifications endpoint")
        if method == "GET":
            return json_response(m.NotificationList(notifications=self._notifications[::-1]))
        allow(method, "POST")
        create = decode_typed(request, m.NotificationCreate)
        note = m.Notification(id=f"ntf_{new_id()}", title=create.title, body=create.body,
                              level=create.level, channel=create.channel,
                              created_at=iso(self._clock()))
        self._notifications.append(note)
        return json_response(note, status=201)
