"""Intake routes: what a client hands the server to keep (``/api/events``, ``/api/pay``,
``/api/notifications``).

``POST /api/events`` records each event and dedupes by ``Idempotency-Key`` (falling back to
the body's ``id``): 202 the first time, 200 ``"duplicate": true`` after. ``POST /api/pay``
records a payment (deduped by ``Idempotency-Key``), ``GET /api/pay/{id}`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.mock_server._base import (
    HTTPError,
    MockPart,
    allow,
    decode_json,
    decode_typed,
    iso,
    json_response,
)

__all__ = ["IntakeRoutes"]


@dataclass(slots=True)
class _Event:
    key: str
    id: str
    received_at: float
    body: Any
    headers: dict[str, str]
    count: int = 1


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
        allow(method, "POST")
        if rest:
            raise HTTPError(404, "not_found", "no such events endpoint")
        body = decode_json(request)
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid_request", "the event must be a JSON object")
        key = request.header("idempotency-key") or body.get("id")
        if not isinstance(key, str) or not key:
            raise HTTPError(400, "invalid_request",
                            "an Idempotency-Key header (or an event id) is required")
        self.stats.events_received += 1
        raw_id = body.get("id")
        event_id: str = raw_id if isinstance(raw_id, str) and raw_id else key
        seen = self._events.get(key)
        if seen is not None:
            seen.count += 1
            self.stats.duplicates += 1
            return json_response(m.EventAck(id=seen.id, status="duplicate", duplicate=True))
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        event = _Event(key=key, id=event_id, received_at=self._clock(), body=body,
                       headers=headers)
        self._events[key] = event
        self._event_log.append(event)
        self.stats.unique_event_ids += 1
        return json_response(m.EventAck(id=event_id, status="accepted"), status=202)

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
