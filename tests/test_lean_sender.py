"""The lean sender (the daemon's default) gives the same ``Sent`` outcome as the httpx-based
``ClientSender`` for every answer an upstream can give: each case is sent by both, each to
its own scripted upstream on a real socket, and the outcomes are compared field by field."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trustme

from mfo_actors.actors._delivery import ClientSender, EventSender, Sent
from mfo_actors.actors._lean_sender import lean_senders
from mfo_actors.actors.forwarder import encode_event
from mfo_actors.client import AuthError, BaseClient, CircuitBreaker, PolicyGate, RequestMetrics
from mfo_actors.client._auth import AuthProvider, StaticTokenAuth
from mfo_actors.config import CircuitBreakerConfig
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.runtime import SystemClock
from tests.raw_upstream import (
    CLOSE,
    STALL,
    Step,
    answer,
    raw_upstream,
    refusing_upstream,
    then_close,
    trickle,
)
from tests.test_listener_reload import write_cert

pytestmark = pytest.mark.anyio

CLOCK = SystemClock()  # send_by is on its monotonic clock (trio's, under trio)

SLOP_400 = b'{"error": {"code": "invalid_request", "message": "bad field", "status": 400, ' \
           b'"details": {"field": "type"}}}'


def make_event() -> Event:
    return Event(id=new_id(), source="s", type="t", received_at=time.time(), headers={},
                 body=b'{"n": 1}', is_json=True, content_type="application/json")


class RotatingAuth:
    """A token that changes each time the server rejects one (a login that works)."""

    def __init__(self) -> None:
        self.n = 0

    async def header(self) -> str | None:
        return f"Bearer t{self.n}"

    async def invalidate(self, token: str | None) -> None:
        if token == f"t{self.n}":
            self.n += 1


class NoTokenAuth:
    async def header(self) -> str | None:
        raise AuthError(401, "token_unavailable", "logins failing")

    async def invalidate(self, token: str | None) -> None:
        return None


@asynccontextmanager
async def sender(kind: str, url: str, gate: PolicyGate, *, client_timeout: float = 5.0,
                 verify: object = True) -> AsyncIterator[EventSender]:
    """A ClientSender (httpx) or a LeanSender to *url*, admitted by *gate*."""
    clock = CLOCK
    async with httpx.AsyncClient(timeout=client_timeout, verify=verify) as http:  # type: ignore[arg-type]
        client = BaseClient(url, http=http, gate=gate, metrics=RequestMetrics("lean-test"))
        if kind == "httpx":
            yield ClientSender(client, clock)
            return
        context = verify if isinstance(verify, ssl.SSLContext) else None
        opened = lean_senders(client, clock, timeout=client_timeout, ssl_context=context)
        async with opened() as lean:
            yield lean


async def send_with(kind: str, steps: list[Step], *, auth: AuthProvider | None = None,
                    breaker: CircuitBreaker | None = None, client_timeout: float = 5.0,
                    within: float = 10.0) -> tuple[Sent, list[bytes]]:
    """Send one event with *kind* of sender to an upstream running *steps*."""
    gate = PolicyGate(auth if auth is not None else StaticTokenAuth("tok"), breaker)
    async with raw_upstream(steps) as up, \
            sender(kind, up.url, gate, client_timeout=client_timeout) as s:
        ev = make_event()
        sent = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + within)
        return sent, up.requests


def same(a: Sent, b: Sent, *, error: bool) -> None:
    fields = ["kind", "status", "failure", "retry_after", "retry_in"]
    if error:
        fields.append("error")
    assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}


ANSWERS: dict[str, list[Step]] = {
    "202 ack": [answer(202, b'{"id": "x"}')],
    "204 no body": [answer(204)],
    "200 not json": [answer(200, b"<html>ok</html>")],
    "200 too large": [answer(200, b"[" + b"1," * 40_000 + b"1]")],
    "200 chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"],
    "301 redirect": [answer(301, b"<html>moved</html>", "Location: https://elsewhere.test/x")],
    "100 then 308": [b"HTTP/1.1 100 Continue\r\n\r\n" + answer(308, b"", "Location: /y")],
    "408": [answer(408)],
    "429 retry-after": [answer(429, b"slow down", "Retry-After: 7")],
    "503 retry-after date": [answer(503, b"", "Retry-After: Fri, 31 Dec 1999 23:59:59 GMT")],
    "500 slop error": [answer(500, b'{"error": {"code": "boom", "message": "it broke"}}')],
    "400 slop error": [answer(400, SLOP_400)],
    "404 text": [answer(404, b"no such thing")],
    "413 too large": [answer(413, b"x" * 100_000)],
    "403": [answer(403, b'{"error": "forbidden"}')],
    "401 twice (static token)": [answer(401), answer(401)],
}
TRANSPORT: dict[str, list[Step]] = {
    "no answer": [CLOSE],
    "garbage": [b"hello\r\n\r\n"],
    "cut off": [then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")],
}


class TestSameOutcomes:
    @pytest.mark.parametrize("case", list(ANSWERS))
    async def test_answers(self, case: str) -> None:
        """Every kind of answer: the same Sent, error text included."""
        httpx_sent, _ = await send_with("httpx", ANSWERS[case])
        lean_sent, requests = await send_with("lean", ANSWERS[case])
        same(httpx_sent, lean_sent, error=True)
        assert b"\r\nAuthorization: Bearer tok\r\n" in requests[0]

    @pytest.mark.parametrize("case", list(TRANSPORT))
    async def test_no_answer(self, case: str) -> None:
        """No usable answer: a failure of the upstream, no status (texts name the cause)."""
        httpx_sent, _ = await send_with("httpx", TRANSPORT[case])
        lean_sent, _ = await send_with("lean", TRANSPORT[case])
        same(httpx_sent, lean_sent, error=False)
        assert lean_sent.kind == "failed" and lean_sent.failure and lean_sent.status is None

    async def test_large_event_refused_before_its_body_was_read(self) -> None:
        """An upstream that answers 413 to a large event's head and closes: the lean sender
        reports the refusal (dead-lettered, with its status), not a network error that would
        be retried. (httpx reads after a failed write too, but on asyncio the reset usually
        wins: it reports a network error there.)"""
        ev = Event(id=new_id(), source="s", type="t", received_at=time.time(), headers={},
                   body=b'{"blob": "' + b"x" * 8_000_000 + b'"}', is_json=True,
                   content_type="application/json")
        async with refusing_upstream(answer(413, b"too large")) as up:
            async with sender("lean", up.url, PolicyGate(StaticTokenAuth("tok"))) as s:
                sent = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
        assert (sent.kind, sent.status, sent.failure) == ("refused", 413, False)
        assert sent.error is not None and "413" in sent.error

    async def test_connection_refused(self) -> None:
        async with raw_upstream([]) as up:
            url = up.url
        outcomes = []
        for kind in ("httpx", "lean"):
            async with sender(kind, url, PolicyGate(StaticTokenAuth("tok"))) as s:
                ev = make_event()
                outcomes.append(await s.send(ev, encode_event(ev),
                                             send_by=CLOCK.monotonic() + 10))
        same(*outcomes, error=False)
        assert outcomes[1].error is not None
        assert outcomes[1].error.startswith("connection failed: ")

    async def test_401_then_new_token_is_delivered(self) -> None:
        """The one re-login: a 401, a new token from the auth path, the same event again."""
        steps: list[Step] = [answer(401), answer(202, b"{}")]
        httpx_sent, _ = await send_with("httpx", steps, auth=RotatingAuth())
        lean_sent, requests = await send_with("lean", steps, auth=RotatingAuth())
        same(httpx_sent, lean_sent, error=True)
        assert lean_sent.kind == "delivered"
        assert b"Authorization: Bearer t0\r\n" in requests[0]
        assert b"Authorization: Bearer t1\r\n" in requests[1]

    async def test_no_token(self) -> None:
        httpx_sent, _ = await send_with("httpx", [], auth=NoTokenAuth())
        lean_sent, requests = await send_with("lean", [], auth=NoTokenAuth())
        same(httpx_sent, lean_sent, error=True)
        assert lean_sent.kind == "no_token" and requests == []

    async def test_breaker_open_is_held(self) -> None:
        outcomes = []
        for kind in ("httpx", "lean"):
            breaker = CircuitBreaker("up", CircuitBreakerConfig(failure_threshold=1))
            breaker.before_call()
            breaker.record(ok=False, failure=True, status=503)
            sent, requests = await send_with(kind, [], breaker=breaker)
            assert requests == []
            outcomes.append(sent)
        assert outcomes[1].kind == "held" and outcomes[1].error == "circuit open"
        assert abs(outcomes[0].retry_in - outcomes[1].retry_in) < 1.0

    async def test_breaker_counts_one_outcome_per_send(self) -> None:
        """Each send settles its admission once: three 503s open a breaker of three."""
        breaker = CircuitBreaker("up", CircuitBreakerConfig(failure_threshold=3))
        gate = PolicyGate(StaticTokenAuth("tok"), breaker)
        async with raw_upstream([], default=answer(503)) as up, \
                sender("lean", up.url, gate) as s:
            for _ in range(3):
                ev = make_event()
                await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
            ev = make_event()
            held = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
        assert held.kind == "held" and len(up.requests) == 3


class TestDeadlines:
    async def test_client_timeout_is_a_failure(self) -> None:
        """No answer within client.timeout: failed (the upstream's fault), like httpx."""
        httpx_sent, _ = await send_with("httpx", [STALL], client_timeout=0.2)
        lean_sent, _ = await send_with("lean", [STALL], client_timeout=0.2)
        same(httpx_sent, lean_sent, error=True)
        assert lean_sent.error == "timeout: no complete answer within 0.2s"

    async def test_trickled_answer_is_bounded_in_total(self) -> None:
        """A body trickled a byte at a time cannot hold the send past client.timeout."""
        steps = [trickle(answer(200, b"{}" * 50), 0.02)]
        started = time.monotonic()
        lean_sent, _ = await send_with("lean", steps, client_timeout=0.3)
        assert lean_sent.kind == "failed" and lean_sent.error is not None
        assert lean_sent.error.startswith("timeout")
        assert time.monotonic() - started < 3

    async def test_send_deadline_is_late(self) -> None:
        """The forwarder's send_by (before client.timeout): late, for both senders."""
        httpx_sent, _ = await send_with("httpx", [STALL], within=0.2)
        lean_sent, _ = await send_with("lean", [STALL], within=0.2)
        same(httpx_sent, lean_sent, error=True)
        assert lean_sent.kind == "late"

    async def test_timeout_leaves_the_breaker_slot_settled(self) -> None:
        """A timed-out send reports one failure (not an abandoned slot); the next goes out."""
        breaker = CircuitBreaker("up", CircuitBreakerConfig(failure_threshold=2))
        gate = PolicyGate(StaticTokenAuth("tok"), breaker)
        async with raw_upstream([STALL, answer(202, b"{}")]) as up, \
                sender("lean", up.url, gate, client_timeout=0.2) as s:
            ev = make_event()
            first = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
            assert breaker.allowance() == 1  # threshold 2, one failure recorded, none in flight
            second = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
        assert (first.kind, second.kind) == ("failed", "delivered")
        assert breaker.allowance() == 3  # failures reset, a success streak of one


class TestTls:
    async def test_https_upstream_verified_as_httpx_does(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The daemon's lean sender verifies the upstream as httpx does: here a private CA
        named by SSL_CERT_FILE."""
        ca = trustme.CA()
        pem = write_cert(ca, tmp_path, "upstream")
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(pem)
        async with raw_upstream([], default=answer(202, b"{}"),
                                ssl_context=server_context) as up:
            async with sender("lean", up.url, PolicyGate(StaticTokenAuth("tok"))) as s:
                for _ in range(2):
                    ev = make_event()
                    sent = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
                    assert sent.kind == "delivered", sent
            monkeypatch.delenv("SSL_CERT_FILE")
            async with sender("lean", up.url, PolicyGate(StaticTokenAuth("tok"))) as s:
                ev = make_event()
                refused = await s.send(ev, encode_event(ev), send_by=CLOCK.monotonic() + 10)
        assert up.connections == 1  # the second handshake failed
        assert refused.kind == "failed" and refused.error is not None
        assert "certificate" in refused.error.lower()

    async def test_same_outcome_over_tls(self, tmp_path: Path) -> None:
        ca = trustme.CA()
        pem = write_cert(ca, tmp_path, "upstream")
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(pem)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        outcomes = []
        for kind in ("httpx", "lean"):
            async with raw_upstream([answer(429, b"", "Retry-After: 3")],
                                    ssl_context=server_context) as up:
                gate = PolicyGate(StaticTokenAuth("tok"))
                async with sender(kind, up.url, gate, verify=client_context) as s:
                    ev = make_event()
                    outcomes.append(await s.send(ev, encode_event(ev),
                                                 send_by=CLOCK.monotonic() + 10))
        same(*outcomes, error=True)
        assert outcomes[1].retry_after == 3.0
