"""The reference server's hot route, ``POST /api/events``, kept lean: bodies decoded only when
read back, tokens verified once, accepted events logged as a count (what the rest of the
server does per request is in ``tests/test_mock_server.py``)."""

from __future__ import annotations

import msgspec
import pytest
import structlog

from mfo_actors.client import models as m
from mfo_actors.mock_server import MockMFOServer, MockOptions
from mfo_actors.mock_server import _app as app_module
from tests.test_mock_server import bearer, decode, login, req

pytestmark = pytest.mark.anyio


async def test_events_read_back_decoded_without_the_token() -> None:
    """What was received is served back as JSON, headers without Authorization."""
    app = MockMFOServer()
    token = await login(app)
    body = {"id": "e1", "source": "s", "payload": {"n": [1, 2.5]}}
    sent = await app.handle(req("POST", "/api/events", body,
                                headers={**bearer(token), "Idempotency-Key": "e1",
                                         "X-Trace": "t1"}))
    assert sent.status == 202
    events = decode(await app.handle(req("GET", "/_mock/events")))["events"]
    assert events[0]["body"] == body and events[0]["idempotency_key"] == "e1"
    assert events[0]["headers"] == {"idempotency-key": "e1", "x-trace": "t1"}
    assert app.events == [{"id": "e1", "idempotency_key": "e1", "count": 1, "body": body}]


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "the event must be a JSON object"),
    (b"  ", "the event must be a JSON object"),
    (b'"text"', "the event must be a JSON object"),
    (b'{"id": "x", "payload": {', "body is not valid JSON"),
    (b'{"id": "x", "payload": [1,]}', "body is not valid JSON"),
])
async def test_bodies_that_are_not_an_event_are_400(raw: bytes, message: str) -> None:
    app = MockMFOServer(MockOptions(require_auth=False))
    resp = await app.handle(req("POST", "/api/events", raw=raw,
                                headers={"Idempotency-Key": "k"}))
    assert (resp.status, decode(resp)["error"]["message"]) == (400, message)
    assert app.events == []


async def test_an_id_that_is_not_a_string_falls_back_to_the_key() -> None:
    app = MockMFOServer(MockOptions(require_auth=False))
    resp = await app.handle(req("POST", "/api/events", {"id": 7},
                                headers={"Idempotency-Key": "k7"}))
    assert (resp.status, decode(resp)["id"]) == (202, "k7")


async def test_a_verified_token_is_still_revoked_and_expires() -> None:
    """Verifying a token once per value does not outlive its revocation."""
    app = MockMFOServer()
    token = await login(app)
    ok = await app.handle(req("POST", "/api/events", {"id": "a"}, headers=bearer(token)))
    assert ok.status == 202
    app.set_faults(expire_tokens=True)
    revoked = await app.handle(req("POST", "/api/events", {"id": "b"}, headers=bearer(token)))
    assert (revoked.status, decode(revoked)["error"]["code"]) == (401, "token_expired")


async def test_accepted_events_are_counted_not_logged_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """202s and duplicates make one ``mock.events`` line per interval; a refused event and
    every other request still get a ``mock.request`` line each."""
    monkeypatch.setattr(app_module, "EVENTS_LOG_INTERVAL", 3600.0)
    app = MockMFOServer(MockOptions(require_auth=False))
    with structlog.testing.capture_logs() as logs:
        for n in range(3):
            await app.handle(req("POST", "/api/events", {"id": f"e{n}"}))
        await app.handle(req("POST", "/api/events", {"id": "e0"}))  # a duplicate: 200
        await app.handle(req("POST", "/api/events", [1]))  # refused: 400
        await app.handle(req("GET", "/api/info"))
    assert [(e["event"], e.get("path"), e.get("status")) for e in logs] == [
        ("mock.request", "/api/events", 400), ("mock.request", "/api/info", 200)]
    monkeypatch.setattr(app_module, "EVENTS_LOG_INTERVAL", 0.0)
    with structlog.testing.capture_logs() as logs:
        await app.handle(req("POST", "/api/events", {"id": "e9"}))
    assert [(e["event"], e["accepted"], e["duplicates"]) for e in logs] == [
        ("mock.events", 4, 1)]


@pytest.mark.parametrize("event_id", ["e1", 'quo"te \\ \u00e9 \u2028', ""])
async def test_the_acks_are_what_event_ack_encodes_to(event_id: str) -> None:
    """The events route writes its answers from constant pieces around the encoded id: the
    same bytes as ``m.EventAck`` through msgspec, first time (202) and duplicate (200)."""
    app = MockMFOServer(MockOptions(require_auth=False))
    headers = {"Idempotency-Key": "k"}
    body = {"id": event_id} if event_id else {}
    first = await app.handle(req("POST", "/api/events", body, headers=headers))
    again = await app.handle(req("POST", "/api/events", body, headers=headers))
    sent_id = event_id or "k"
    assert (first.status, first.body) == (
        202, msgspec.json.encode(m.EventAck(id=sent_id, status="accepted")))
    assert (again.status, again.body) == (
        200, msgspec.json.encode(m.EventAck(id=sent_id, status="duplicate", duplicate=True)))
    assert first.headers == again.headers == [("content-type", "application/json")]
