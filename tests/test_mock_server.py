"""The reference MFO server: its handler directly, its control endpoints, and the CLI."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import msgspec
import pytest

from mfo_actors.http import Request, RequestHead, Response
from mfo_actors.mock_server import MockMFOServer, MockOptions
from tests.mock_fixtures import running_mock_server

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def req(method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
        raw: bytes | None = None) -> Request:
    path, _, query = path.partition("?")
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    data = raw if raw is not None else (b"" if body is None else msgspec.json.encode(body))
    return Request(RequestHead(method, path, query, hdrs, list(hdrs.items())), data)


def decode(resp: Response) -> Any:
    return msgspec.json.decode(resp.body) if resp.body else None


async def login(app: MockMFOServer) -> str:
    resp = await app.handle(req("POST", "/auth/login", {"email": "demo@example.com",
                                                         "password": "demo"}))
    assert resp.status == 200
    return str(decode(resp)["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TestAuth:
    async def test_login_issues_jwt_shaped_token(self) -> None:
        """The token is three base64url parts; the payload holds exp = now + lifetime."""
        clock = FakeClock()
        app = MockMFOServer(MockOptions(token_lifetime=60), clock=clock)
        resp = await app.handle(req("POST", "/auth/login", {"email": "demo@example.com",
                                                             "password": "demo"}))
        body = decode(resp)
        assert body["expires_in"] == 60
        parts = body["token"].split(".")
        assert len(parts) == 3
        payload = parts[1]
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["exp"] == clock.now + 60 and claims["sub"] == "demo@example.com"
        assert app.stats.logins == 1

    async def test_wrong_credentials_and_bad_body(self) -> None:
        app = MockMFOServer()
        resp = await app.handle(req("POST", "/auth/login", {"email": "demo@example.com",
                                                             "password": "x"}))
        assert resp.status == 401
        assert decode(resp)["error"] == {"code": "invalid_credentials",
                                         "message": "wrong email or password", "status": 401}
        assert (await app.handle(req("POST", "/auth/login", raw=b"{"))).status == 400
        assert (await app.handle(req("GET", "/auth/login"))).status == 405
        assert app.stats.failed_logins == 1

    async def test_token_checks(self) -> None:
        """Missing, forged, unknown and expired tokens are 401 with distinct codes."""
        clock = FakeClock()
        app = MockMFOServer(MockOptions(token_lifetime=10), clock=clock)
        token = await login(app)
        ok = await app.handle(req("GET", "/api/info", headers=bearer(token)))
        assert ok.status == 200
        missing = await app.handle(req("GET", "/api/info"))
        assert (missing.status, decode(missing)["error"]["code"]) == (401, "unauthorized")
        h, p, _ = token.split(".")
        forged = await app.handle(req("GET", "/api/info", headers=bearer(f"{h}.{p}.AAAA")))
        assert decode(forged)["error"]["code"] == "invalid_token"
        other = await login(MockMFOServer())  # signed by another server's secret
        assert (await app.handle(req("GET", "/api/info", headers=bearer(other)))).status == 401
        clock.now += 10
        expired = await app.handle(req("GET", "/api/info", headers=bearer(token)))
        assert (expired.status, decode(expired)["error"]["code"]) == (401, "token_expired")
        assert app.stats.expired_token_requests == 1

    async def test_expire_tokens_fault_and_no_auth(self) -> None:
        app = MockMFOServer()
        token = await login(app)
        app.set_faults(expire_tokens=True)
        assert (await app.handle(req("GET", "/api/info", headers=bearer(token)))).status == 401
        fresh = await login(app)
        assert (await app.handle(req("GET", "/api/info", headers=bearer(fresh)))).status == 200
        open_app = MockMFOServer(MockOptions(require_auth=False))
        assert (await open_app.handle(req("GET", "/api/tools"))).status == 200


class TestEndpoints:
    async def test_events_dedupe_and_record(self) -> None:
        """Events are deduplicated by Idempotency-Key, falling back to the body's id."""
        app = MockMFOServer(MockOptions(require_auth=False))
        event = {"id": "e1", "source": "s", "type": "t", "received_at": 1.0, "headers": {},
                 "payload": {}}
        first = await app.handle(req("POST", "/api/events", event,
                                     headers={"Idempotency-Key": "e1"}))
        assert (first.status, decode(first)) == (202, {"id": "e1", "status": "accepted",
                                                        "duplicate": False})
        second = await app.handle(req("POST", "/api/events", event))  # key from the body id
        assert (second.status, decode(second)["duplicate"]) == (200, True)
        third = await app.handle(req("POST", "/api/events", {"id": "e2"},
                                     headers={"Idempotency-Key": "e2"}))
        assert third.status == 202
        no_key = await app.handle(req("POST", "/api/events", {"x": 1}))
        assert no_key.status == 400
        not_object = await app.handle(req("POST", "/api/events", [1],
                                          headers={"Idempotency-Key": "z"}))
        assert not_object.status == 400
        stats = decode(await app.handle(req("GET", "/_mock/stats")))
        assert (stats["events_received"], stats["unique_event_ids"], stats["duplicates"]) == (
            3, 2, 1)
        events = decode(await app.handle(req("GET", "/_mock/events")))["events"]
        assert [(e["id"], e["count"]) for e in events] == [("e1", 2), ("e2", 1)]

    async def test_calculator_is_safe(self) -> None:
        app = MockMFOServer(MockOptions(require_auth=False))
        ok = await app.handle(req("POST", "/api/tools/calculator", {"expression": "2 + 3 * 4"}))
        assert decode(ok) == {"result": 14}
        for expression in ["__import__('os')", "9 ** 999999", "1 / 0", "x"]:
            bad = await app.handle(req("POST", "/api/tools/calculator",
                                       {"expression": expression}))
            assert bad.status == 400, expression

    async def test_routing_errors(self) -> None:
        app = MockMFOServer(MockOptions(require_auth=False))
        assert (await app.handle(req("GET", "/nope"))).status == 404
        assert (await app.handle(req("GET", "/api/nope"))).status == 404
        wrong = await app.handle(req("DELETE", "/api/info"))
        assert wrong.status == 405 and ("allow", "GET") in wrong.headers
        assert (await app.handle(req("PUT", "/api/memory/missing", {"value": 1}))).status == 404
        assert (await app.handle(req("POST", "/api/chat", raw=b"not json"))).status == 400
        assert (await app.handle(req("GET", "/api/chat/thread_unknown"))).status == 404

    async def test_sse_stream_body(self) -> None:
        """The stream starts with a comment, sends content chunks and ends with [DONE]."""
        app = MockMFOServer(MockOptions(require_auth=False))
        resp = await app.handle(req("POST", "/api/chat/stream",
                                    {"messages": [{"role": "user", "content": "a b"}]}))
        assert ("content-type", "text/event-stream") in resp.headers
        assert resp.stream is not None
        raw = b"".join([c async for c in resp.stream])
        assert raw.startswith(b": ")
        assert raw.endswith(b"data: [DONE]\n\n")
        assert b'data: {"content":" b"}' in raw

    async def test_jobs_become_done_after_duration(self) -> None:
        clock = FakeClock()
        app = MockMFOServer(MockOptions(require_auth=False, job_duration=5), clock=clock)
        job = decode(await app.handle(req("POST", "/api/jobs", {"type": "x", "params": {}})))
        assert job["status"] == "new"
        get = req("GET", f"/api/jobs/{job['id']}")
        assert decode(await app.handle(get))["status"] == "new"  # the first quarter
        clock.now += 1.25
        answer = await app.handle(get)
        assert decode(answer)["status"] == "active"
        assert ("cache-control", "no-store") in answer.headers
        clock.now += 3.75
        assert decode(await app.handle(get))["status"] == "done"
        failing = decode(await app.handle(req("POST", "/api/jobs", {"type": "fail"})))
        clock.now += 5
        assert decode(await app.handle(req("GET", f"/api/jobs/{failing['id']}")))["status"] == \
            "error"


class TestFaults:
    async def test_fail_rate_and_status_with_retry_after(self) -> None:
        app = MockMFOServer(MockOptions(require_auth=False, fail_rate=1.0, fail_status=429,
                                        retry_after=2.5))
        resp = await app.handle(req("GET", "/api/info"))
        assert resp.status == 429 and ("retry-after", "3") in resp.headers
        assert decode(resp)["error"]["code"] == "injected_failure"
        control = await app.handle(req("GET", "/_mock/stats"))  # never faulted
        assert control.status == 200

    async def test_seeded_fail_rate_is_roughly_the_rate(self) -> None:
        app = MockMFOServer(MockOptions(require_auth=False, fail_rate=0.3, seed=7))
        statuses = [(await app.handle(req("GET", "/api/info"))).status for _ in range(400)]
        assert 80 < statuses.count(503) < 160

    async def test_outage_then_recovery(self) -> None:
        clock = FakeClock()
        app = MockMFOServer(MockOptions(require_auth=False, outage_for=10, retry_after=4),
                            clock=clock)
        down = await app.handle(req("GET", "/api/info"))
        assert down.status == 503 and ("retry-after", "4") in down.headers
        assert (await app.handle(req("POST", "/auth/login", {}))).status == 503
        clock.now += 10
        assert (await app.handle(req("GET", "/api/info"))).status == 200

    async def test_control_endpoint_changes_faults(self) -> None:
        app = MockMFOServer(MockOptions(require_auth=False))
        resp = await app.handle(req("POST", "/_mock/faults",
                                    {"fail_next": 1, "latency": 0, "malformed": "/api/info"}))
        assert resp.status == 200 and decode(resp)["fail_next"] == 1
        assert (await app.handle(req("GET", "/api/info"))).status == 503
        corrupted = decode(await app.handle(req("GET", "/api/info")))
        assert corrupted["name"] == 12345
        for bad in [{"nope": 1}, {"fail_rate": 2}, {"fail_status": 200}, {"outage_for": -1},
                    {"outage_mode": "x"}, {"fail_next": "a"}]:
            resp = await app.handle(req("POST", "/_mock/faults", bad))
            assert resp.status == 400, bad
        reset = await app.handle(req("POST", "/_mock/faults", {"reset": True}))
        assert decode(reset)["malformed"] == []
        await app.handle(req("POST", "/_mock/reset"))
        assert decode(await app.handle(req("GET", "/_mock/stats")))["requests"] == 1  # the reset


class TestOverSocket:
    async def test_stats_and_faults_over_http(self) -> None:
        """The control endpoints work over a real socket, and latency is added."""
        async with running_mock_server(MockOptions(require_auth=False)) as srv:
            async with httpx.AsyncClient(base_url=srv.base_url) as http:
                resp = await http.post("/_mock/faults", json={"latency": 0.2})
                assert resp.json()["latency"] == 0.2
                started = time.monotonic()
                assert (await http.get("/api/info")).status_code == 200
                assert time.monotonic() - started >= 0.2
                stats = (await http.get("/_mock/stats")).json()
                assert stats["requests_by_status"] == {"200": 2}  # this request not yet


def test_cli_serves_until_sigterm(tmp_path: Any) -> None:
    """``mfo-actors mock-server --port 0`` serves, logs each request, exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfo_actors", "mock-server", "--port", "0", "--no-auth",
         "--log-format", "json", "--fail-rate", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        resp = httpx.get(url + "/api/info", timeout=5)
        assert resp.status_code == 200 and resp.json()["name"] == "mfo-mock"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert '"event": "mock.request"' in err and '"path": "/api/info"' in err


def test_cli_rejects_bad_flags() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mfo_actors", "mock-server", "--fail-rate", "2"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "--fail-rate must be between 0 and 1" in proc.stderr
    assert "Traceback" not in proc.stderr
