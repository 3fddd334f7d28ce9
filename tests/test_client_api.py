"""The MFO client against the real reference server over a real socket (both backends)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from mfo_actors.client import (
    APIError,
    AuthError,
    CircuitBreakerError,
    LoginAuth,
    MFOClient,
    RetryableError,
    ValidationError,
)
from mfo_actors.client import models as m
from mfo_actors.mock_server import MockOptions
from tests.mock_fixtures import (
    EMAIL,
    PASSWORD,
    MockServerHandle,
    client_config,
    free_port,
    mock_server,
    running_mock_server,
)

pytestmark = pytest.mark.anyio

__all__ = ["mock_server"]  # the fixture, imported so pytest finds it


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts requests that reach the network layer (connection attempts included)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_for(srv: MockServerHandle, **kw: Any) -> MFOClient:
    transport = kw.pop("transport", None)
    return MFOClient.from_config(client_config(srv.base_url, **kw), transport=transport)


class TestEndpointGroups:
    async def test_info(self, mock_server: MockServerHandle) -> None:
        """GET /api/info decodes into Info."""
        async with client_for(mock_server) as client:
            info = await client.info()
        assert isinstance(info, m.Info)
        assert info.name == "mfo-mock"
        assert "/api/events" in {e.path for e in info.endpoints}
        assert info.capabilities["streaming"] is True

    async def test_chat_send_get_thread_list(self, mock_server: MockServerHandle) -> None:
        """A chat reply carries content, thread and message ids; the thread keeps growing."""
        async with client_for(mock_server) as client:
            first = await client.chat.send("hello")
            assert isinstance(first, m.ChatResponse)
            assert first.content == "You said: hello"
            assert first.thread_id is not None and first.thread_id.startswith("thread_")
            assert first.message_id is not None
            second = await client.chat.send(
                messages=[{"role": "user", "content": "again"}], thread_id=first.thread_id)
            assert second.thread_id == first.thread_id
            assert first.id is not None
            chat = await client.chat.get(first.id)
            assert [msg.content for msg in chat.messages] == ["hello", "You said: hello"]
            thread = await client.chat.thread(first.thread_id)
            assert [msg.role for msg in thread.messages] == ["user", "assistant"] * 2
            assert thread.messages[-1].content == "You said: again"
            assert len(await client.chat.list()) == 2

    async def test_chat_stream_yields_chunks_in_order_until_done(
            self, mock_server: MockServerHandle) -> None:
        """SSE chunks arrive in order and the iteration ends on [DONE]."""
        async with client_for(mock_server) as client:
            chunks = [c async for c in client.chat.stream("one two three four")]
            assert chunks == ["You", " said:", " one", " two", " three", " four"]
            async with client.chat.stream("early stop") as stream:
                async for _ in stream:
                    break  # leaving early releases the connection
            assert (await client.info()).name == "mfo-mock"

    async def test_tools(self, mock_server: MockServerHandle) -> None:
        """Tools list, get and execute; an unknown tool is a 404 APIError."""
        async with client_for(mock_server) as client:
            tools = await client.tools.list()
            assert {t.id for t in tools} >= {"echo", "calculator"}
            calc = await client.tools.get("calculator")
            assert calc.example == "15 * 7"
            result = await client.tools.execute("calculator", {"expression": "15 * 7"})
            assert isinstance(result, m.ToolResult) and result.result == 105
            echoed = await client.tools.execute("echo", {"text": "hi"})
            assert echoed.result == {"text": "hi"}
            with pytest.raises(APIError) as err:
                await client.tools.execute("nope", {})
            assert (err.value.status, err.value.code) == (404, "not_found")

    async def test_memory(self, mock_server: MockServerHandle) -> None:
        """Memory set, get, update (with previous value), list, query, delete."""
        async with client_for(mock_server) as client:
            assert (await client.memory.set("pref", {"theme": "dark"})).status == "stored"
            item = await client.memory.get("pref")
            assert isinstance(item, m.MemoryItem) and item.value == {"theme": "dark"}
            updated = await client.memory.update("pref", {"theme": "light"})
            assert updated.status == "updated"
            assert updated.previous_value == {"theme": "dark"}
            await client.memory.set("other/key", 3)
            assert [k.key for k in await client.memory.list()] == ["pref", "other/key"]
            found = await client.memory.query("light theme")
            assert found[0].key == "pref" and found[0].score == 1.0
            assert (await client.memory.delete("pref")).status == "deleted"
            with pytest.raises(APIError) as err:
                await client.memory.get("pref")
            assert err.value.status == 404
            assert (await client.memory.get("other/key")).value == 3

    async def test_resources(self, mock_server: MockServerHandle) -> None:
        """Resources list, get and search (query string)."""
        async with client_for(mock_server) as client:
            listed = await client.resources.list()
            assert "mars-101" in {r.id for r in listed}
            res = await client.resources.get("mars-101")
            assert isinstance(res, m.Resource) and res.content.startswith("Mars")
            hits = await client.resources.search("mars")
            assert [h.id for h in hits] == ["mars-101", "solar-system"]

    async def test_events_dedupe_by_idempotency_key(self, mock_server: MockServerHandle) -> None:
        """A second send with the same key is acknowledged as a duplicate and counted."""
        event = {"id": "ev1", "source": "github", "type": "push", "received_at": 1.0,
                 "headers": {}, "payload": {"a": 1}}
        async with client_for(mock_server) as client:
            ack = await client.events.send(event, idempotency_key="ev1")
            assert isinstance(ack, m.EventAck)
            assert (ack.id, ack.duplicate) == ("ev1", False)
            again = await client.events.send(msgspec.json.encode(event), idempotency_key="ev1",
                                              retry=False)
            assert again.duplicate is True
        stats = mock_server.app.stats
        assert (stats.events_received, stats.unique_event_ids, stats.duplicates) == (2, 1, 1)
        assert mock_server.app.events[0]["body"]["payload"] == {"a": 1}

    async def test_jobs(self, mock_server: MockServerHandle) -> None:
        """Jobs are created, then read back done."""
        async with client_for(mock_server) as client:
            job = await client.jobs.create("report", {"n": 1})
            assert isinstance(job, m.Job) and job.id.startswith("job_")
            done = await client.jobs.get(job.id)
            assert done.status == "done" and done.result == {"type": "report", "params": {"n": 1}}
            assert [j.id for j in await client.jobs.list()] == [job.id]

    async def test_notifications(self, mock_server: MockServerHandle) -> None:
        """Notifications are sent and listed."""
        async with client_for(mock_server) as client:
            sent = await client.notifications.send("Deploy", "done", level="warning")
            assert isinstance(sent, m.Notification) and sent.level == "warning"
            assert [n.id for n in await client.notifications.list()] == [sent.id]


class TestErrorsAndRetries:
    async def test_503_retry_after_is_honoured(self, mock_server: MockServerHandle) -> None:
        """A 503 with Retry-After: 1 is retried, no sooner than one second later."""
        mock_server.app.set_faults(fail_next=1, retry_after=1)
        async with client_for(mock_server) as client:
            started = time.monotonic()
            info = await client.info()
            elapsed = time.monotonic() - started
        assert info.name == "mfo-mock"
        assert elapsed >= 1.0
        assert mock_server.app.stats.requests_by_status == {"503": 1, "200": 2}  # + the login

    async def test_400_raises_api_error_at_once(self, mock_server: MockServerHandle) -> None:
        """A 400 is not retried (even on a GET) and carries SLOP's code and message."""
        async with client_for(mock_server) as client:
            with pytest.raises(APIError) as err:
                await client.base.get("/api/resources/search")
            assert err.value.status == 400
            assert err.value.code == "invalid_request"
            assert err.value.message == "Missing required parameter: q"
            with pytest.raises(APIError) as err2:
                await client.base.post("/api/chat", json={"messages": []})
            assert err2.value.message == "Missing required field: messages"
        assert mock_server.app.stats.requests_by_status.get("400") == 2
        assert mock_server.app.stats.logins == 1

    async def test_expired_token_relogins_once(self, mock_server: MockServerHandle) -> None:
        """An expired token leads to exactly one re-login, then success."""
        async with client_for(mock_server) as client:
            await client.info()
            mock_server.app.set_faults(expire_tokens=True)
            info = await client.info()
        assert info.name == "mfo-mock"
        stats = mock_server.app.stats
        assert stats.logins == 2
        assert stats.expired_token_requests == 1

    async def test_concurrent_401s_share_one_relogin(self, mock_server: MockServerHandle
                                                     ) -> None:
        """Many calls failing with the same expired token cause a single login."""
        async with client_for(mock_server) as client:
            await client.info()
            mock_server.app.set_faults(expire_tokens=True)
            results: list[m.Info] = []

            async def call() -> None:
                results.append(await client.info())

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(call)
        assert len(results) == 8
        assert mock_server.app.stats.logins == 2

    async def test_relogin_that_still_fails_raises_auth_error(self) -> None:
        """Tokens that expire at once: one re-login, then AuthError (no loop)."""
        opts = MockOptions(email=EMAIL, password=PASSWORD, token_lifetime=0.0)
        async with running_mock_server(opts) as srv:
            client = MFOClient.from_config(client_config(srv.base_url))
            async with client:
                with pytest.raises(AuthError) as err:
                    await client.info()
            assert err.value.status == 401 and err.value.code == "token_expired"
            assert srv.app.stats.logins == 2

    async def test_wrong_password_is_auth_error(self, mock_server: MockServerHandle) -> None:
        """A refused login is an AuthError, not retried."""
        async with client_for(mock_server, password="wrong") as client:
            with pytest.raises(AuthError, match="login rejected"):
                await client.info()
        assert mock_server.app.stats.failed_logins == 1

    async def test_static_token_rejected(self, mock_server: MockServerHandle) -> None:
        """A bad static token is an AuthError after a single request."""
        async with client_for(mock_server, auth="token", token="abc.def.ghi") as client:
            with pytest.raises(AuthError) as err:
                await client.tools.list()
        assert err.value.code == "invalid_token"
        assert mock_server.app.stats.requests == 1  # no login, no retry

    async def test_malformed_response_names_the_field(self, mock_server: MockServerHandle
                                                      ) -> None:
        """A body that does not match the model raises ValidationError naming the field."""
        mock_server.app.set_faults(malformed=["/api/info", "/api/chat"])
        async with client_for(mock_server) as client:
            with pytest.raises(ValidationError) as err:
                await client.info()
            assert err.value.field == "name"
            with pytest.raises(ValidationError) as err2:
                await client.chat.send("x")
            assert err2.value.field in {"id", "thread_id", "message_id", "model"}
        assert mock_server.app.stats.requests_by_status == {"200": 3}  # login, info, chat

    async def test_connection_refused_after_configured_attempts(self) -> None:
        """Connection refused: RetryableError once max_attempts attempts are spent."""
        transport = CountingTransport()
        cfg = client_config(f"http://127.0.0.1:{free_port()}", auth="none", max_attempts=4)
        async with MFOClient.from_config(cfg, transport=transport) as client:
            with pytest.raises(RetryableError) as err:
                await client.info()
        assert err.value.status is None
        assert "connection" in err.value.message
        assert len(transport.requests) == 4

    async def test_retry_false_makes_one_attempt(self, mock_server: MockServerHandle) -> None:
        """retry=False: one attempt; the RetryableError carries status and retry_after."""
        mock_server.app.set_faults(fail_next=2, retry_after=7, fail_status=429)
        async with client_for(mock_server) as client:
            with pytest.raises(RetryableError) as err:
                await client.events.send({"id": "e"}, idempotency_key="e", retry=False)
        assert (err.value.status, err.value.retry_after) == (429, 7.0)
        assert mock_server.app.stats.requests_by_status == {"200": 1, "429": 1}  # login, event

    async def test_post_without_key_is_not_retried(self, mock_server: MockServerHandle) -> None:
        """A chat POST (no idempotency key) fails on the first 503."""
        mock_server.app.set_faults(fail_next=1)
        async with client_for(mock_server) as client:
            with pytest.raises(RetryableError):
                await client.chat.send("hi")
            assert (await client.chat.send("hi")).content == "You said: hi"
        assert mock_server.app.stats.requests_by_status == {"503": 1, "200": 2}  # + the login

    async def test_post_with_key_is_retried(self, mock_server: MockServerHandle) -> None:
        """An event POST carries its key and is retried after a 503."""
        mock_server.app.set_faults(fail_next=2)
        async with client_for(mock_server) as client:
            ack = await client.events.send({"id": "k"}, idempotency_key="k")
        assert ack.status == "accepted"
        assert mock_server.app.stats.requests_by_status == {"200": 1, "503": 2, "202": 1}

    async def test_outage_close_mode_is_retryable(self, mock_server: MockServerHandle) -> None:
        """A dropped connection is a RetryableError without status."""
        mock_server.app.set_faults(outage_for=60, outage_mode="close")
        async with client_for(mock_server, auth="none", max_attempts=2) as client:
            with pytest.raises(RetryableError) as err:
                await client.info()
        assert err.value.status is None

    async def test_timeout_is_retryable(self) -> None:
        """A server slower than client.timeout gives RetryableError after the attempts."""
        opts = MockOptions(require_auth=False, latency=0.5)
        async with running_mock_server(opts) as srv:
            cfg = client_config(srv.base_url, auth="none", max_attempts=2, timeout="100ms")
            async with MFOClient.from_config(cfg) as client:
                with pytest.raises(RetryableError, match="timeout"):
                    await client.info()


class FakeBreaker:
    def __init__(self, *, open_: bool = False) -> None:
        self.open = open_
        self.calls = 0
        self.records: list[tuple[bool, bool, int | None]] = []

    def before_call(self) -> None:
        self.calls += 1
        if self.open:
            raise CircuitBreakerError("mfo", "open", 12.5)

    def record(self, *, ok: bool, failure: bool, status: int | None) -> None:
        self.records.append((ok, failure, status))


class FakeLimiter:
    def __init__(self) -> None:
        self.acquired = 0

    async def acquire(self) -> None:
        self.acquired += 1


class TestHooks:
    async def test_breaker_sees_each_attempt(self, mock_server: MockServerHandle) -> None:
        """The breaker is asked before, and told after, every attempt."""
        mock_server.app.set_faults(fail_next=1)
        breaker, limiter = FakeBreaker(), FakeLimiter()
        cfg = client_config(mock_server.base_url)
        async with MFOClient.from_config(cfg, breaker=breaker, rate_limiter=limiter) as client:
            await client.info()
            with pytest.raises(APIError):
                await client.tools.get("missing")
        assert breaker.records == [(False, True, 503), (True, False, 200), (False, False, 404)]
        assert breaker.calls == 3
        assert limiter.acquired == 3

    async def test_open_breaker_sends_nothing(self, mock_server: MockServerHandle) -> None:
        """While the breaker is open, calls fail fast with CircuitBreakerError."""
        breaker = FakeBreaker(open_=True)
        cfg = client_config(mock_server.base_url, auth="none")
        async with MFOClient.from_config(cfg, breaker=breaker) as client:
            with pytest.raises(CircuitBreakerError) as err:
                await client.info()
        assert (err.value.upstream, err.value.state, err.value.retry_in) == ("mfo", "open", 12.5)
        assert mock_server.app.stats.requests == 0
        assert breaker.calls == 1

    async def test_preencoded_content_is_sent_as_json(self, mock_server: MockServerHandle
                                                      ) -> None:
        """content= bytes go out unchanged with content-type application/json."""
        body = b'{"id":"raw1","payload":{"x":[1,2]}}'
        async with client_for(mock_server) as client:
            ack = await client.base.request("POST", "/api/events", content=body,
                                            idempotency_key="raw1", retry=False,
                                            response_type=m.EventAck)
        assert ack.id == "raw1"
        recorded = mock_server.app.events[0]
        assert recorded["body"] == {"id": "raw1", "payload": {"x": [1, 2]}}

    async def test_login_auth_reused_over_calls(self, mock_server: MockServerHandle) -> None:
        """LoginAuth logs in once for many calls (the token is kept)."""
        async with httpx.AsyncClient() as http:
            auth = LoginAuth(mock_server.base_url + "/auth", EMAIL, PASSWORD, http)
            client = MFOClient.from_config(client_config(mock_server.base_url), auth=auth)
            async with client:
                for _ in range(3):
                    await client.tools.list()
        assert auth.logins == 1
        assert mock_server.app.stats.logins == 1
        assert "s3cret" not in repr(auth)


async def test_memory_upsert_is_retried_without_a_key(mock_server: MockServerHandle) -> None:
    """memory.set (an upsert POST) is retried after a 503 and sends no Idempotency-Key."""
    transport = CountingTransport()
    async with client_for(mock_server, transport=transport) as client:
        mock_server.app.set_faults(fail_next=1)
        await client.memory.set("k", 1)
        await client.memory.set("k", 2)
        assert (await client.memory.get("k")).value == 2
    posts = [r for r in transport.requests if r.url.path == "/api/memory"]
    assert len(posts) == 3
    assert all("idempotency-key" not in r.headers for r in posts)
