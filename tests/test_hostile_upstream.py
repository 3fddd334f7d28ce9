"""A hostile or broken upstream: redirects, trickled and endless bodies, long outages, echoed
tokens. Nothing the upstream does may lose an event, hold a delivery slot past
``client.timeout``, or put a credential into the store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from mfo_actors.actors.forwarder import ForwarderActor
from mfo_actors.actors.scheduler import SchedulerActor
from mfo_actors.client._auth import NoAuth
from mfo_actors.client._base import BaseClient
from mfo_actors.client._breaker import CircuitBreaker
from mfo_actors.client.errors import RetryableError, classify_response
from mfo_actors.config import InstanceConfig, load_config_text
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.observability import register_secret
from mfo_actors.runtime import Clock, FakeClock, ReadySignal, SystemClock
from mfo_actors.store import DEFAULT_SQLITE_FILE, EventStore, RunRequest, open_sqlite_store
from mfo_actors.taskflow import EmptyConfig, TaskContext, builtin_registry, load_flow_text
from tests import raw_upstream as scripted
from tests.helpers import poll, running_daemon, wait_http_ok, write_config
from tests.test_scheduler import running as running_scheduler
from tests.test_scheduler import settled_runs

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def config(*, max_attempts: int = 3, timeout: str = "5s", threshold: int = 3,
           reset: str = "30s", concurrency: int = 4) -> InstanceConfig:
    return load_config_text(f"""
instance: hostile
client:
  base_url: http://upstream.test
  timeout: {timeout}
  retry: {{max_attempts: {max_attempts}, initial_backoff: 1s, max_backoff: 60s}}
  circuit_breaker: {{failure_threshold: {threshold}, reset_timeout: {reset}}}
forwarder: {{concurrency: {concurrency}, ordering: source, poll_interval: 10ms, lease: 5m}}
""")


def event(source: str, n: int, now: float) -> Event:
    return Event(id=new_id(), source=source, type="t", received_at=now, headers={},
                 body=b'{"n": %d}' % n, is_json=True, content_type="application/json")


@asynccontextmanager
async def forwarding(tmp_path: Path, handler: Handler, cfg: InstanceConfig, *,
                     clock: Clock | None = None
                     ) -> AsyncIterator[tuple[EventStore, ForwarderActor]]:
    """Store, breaker, client over *handler* (no network) and a running forwarder."""
    clk = clock if clock is not None else SystemClock()
    async with open_sqlite_store(tmp_path / "store.sqlite3", clock=clk.now) as store:
        breaker = CircuitBreaker(cfg.client.base_url, cfg.client.circuit_breaker, clock=clk)
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as http:
            client = BaseClient(cfg.client.base_url, auth=NoAuth(), http=http, breaker=breaker)
            forwarder = ForwarderActor(cfg, store, client, clock=clk,
                                       rng=lambda: 1.0)
            async with anyio.create_task_group() as tg:
                ready = ReadySignal()
                tg.start_soon(forwarder.run, ready)
                await ready.wait()
                try:
                    yield store, forwarder
                finally:
                    forwarder.request_stop()


class TestRedirects:
    def test_only_2xx_is_success(self) -> None:
        """Item 3: every status below 400 counted as delivered, so a load balancer's
        http->https redirect silently lost every event."""
        assert classify_response(200, {}, b"") is None
        assert classify_response(204, {}, b"") is None
        for status in (300, 301, 302, 303, 307, 308):
            error = classify_response(status, {"Location": "https://mfo.example/api/events"},
                                      b"<html>moved</html>")
            assert isinstance(error, RetryableError), status
            assert error.status == status
            assert "https://mfo.example/api/events" in str(error)
        assert isinstance(classify_response(100, {}, b""), RetryableError)

    async def test_redirected_event_is_retried_then_dead_with_its_location(
        self, tmp_path: Path
    ) -> None:
        """A 3xx is never followed and never a delivery: the event is retried, then
        dead-lettered with the status and the Location kept."""
        sent: list[str] = []

        async def redirect(request: httpx.Request) -> httpx.Response:
            sent.append(str(request.url))
            return httpx.Response(301, headers={"location": "https://elsewhere.test/x"})

        cfg = config(max_attempts=2)
        async with forwarding(tmp_path, redirect, cfg) as (store, forwarder):
            ev = event("a", 1, time.time())
            await store.append(ev)
            # backoff after the first attempt is initial_backoff (1 s, jitter pinned to 1)
            await poll(lambda: forwarder.dead == 1, deadline=20)
            stored = await store.get_event(ev.id)
        assert stored is not None and stored.status == "dead"
        assert stored.last_error is not None
        assert "301" in stored.last_error and "https://elsewhere.test/x" in stored.last_error
        assert forwarder.delivered == 0
        assert all(url.startswith("http://upstream.test/") for url in sent) and len(sent) == 2


@pytest.mark.slow
class TestOutages:
    async def test_ten_minute_outage_dead_letters_nothing(self, tmp_path: Path) -> None:
        """Item 14: with the upstream refusing connections for 10 minutes (fake clock), no
        event uses up its attempts: half-open probes and closed-state connection failures
        are not attempts while nothing else succeeds. Everything arrives after."""
        clock = FakeClock(start=time.time())
        up = False
        received: list[bytes] = []
        refused: list[float] = []  # fake-clock times of the sends the outage refused

        async def upstream(request: httpx.Request) -> httpx.Response:
            if not up:
                refused.append(clock.monotonic())
                raise httpx.ConnectError("connection refused", request=request)
            received.append(request.content)
            return httpx.Response(202, json={"ok": True})

        cfg = config(max_attempts=3, threshold=3, reset="30s")
        async with forwarding(tmp_path, upstream, cfg, clock=clock) as (store, forwarder):
            events = [event(f"s{i % 4}", i, clock.now()) for i in range(20)]
            for ev in events:
                await store.append(ev)
            await poll(lambda: len(refused) > 0)
            # One breaker period at a time: each ends with a half-open probe, which the
            # outage refuses. Waiting for that send (not a fixed sleep) makes sure the
            # forwarder really kept trying for the whole ten minutes.
            for period in range(1, 21):
                end = 30.0 * period
                await clock.advance_to(end)
                await poll(lambda end=end: any(t >= end for t in refused), deadline=20)
                assert forwarder.dead == 0, (await store.list_events(status="dead"))[:1]
            assert {int(t // 30) for t in refused} == set(range(21)), refused
            stats = await store.stats()
            assert stats.dead == 0 and stats.pending == 20
            # The send that found the outage is the only one that counted.
            attempts = [s.attempts for s in await store.list_events(limit=100)]
            assert sum(attempts) <= 1, attempts
            up = True
            with anyio.fail_after(30):
                while (await store.stats()).delivered < 20:
                    await clock.advance_to(clock.monotonic() + 5)
                    await anyio.sleep(0.01)
        assert len(received) == 20 and forwarder.dead == 0

    async def test_failures_while_others_succeed_count_as_attempts(self, tmp_path: Path
                                                                   ) -> None:
        """An event the server always fails on (a reset, a 500) while it accepts the
        others is not an outage: its attempts count and it is dead-lettered."""
        poison_reset = b'"n": 0}'
        poison_500 = b'"n": 1}'

        async def upstream(request: httpx.Request) -> httpx.Response:
            if poison_reset in request.content:
                raise httpx.ReadError("connection reset by peer", request=request)
            if poison_500 in request.content:
                return httpx.Response(500, json={"error": {"code": "boom", "message": "x"}})
            return httpx.Response(202)

        cfg = config(max_attempts=2, threshold=100)
        async with forwarding(tmp_path, upstream, cfg) as (store, forwarder):
            await store.append(event("bad-reset", 0, time.time()))
            await store.append(event("bad-500", 1, time.time()))
            n = 2
            # Others keep succeeding while the two poison events are retried.
            with anyio.fail_after(30):
                while forwarder.dead < 2:
                    await store.append(event("good", n, time.time()))
                    n += 1
                    await anyio.sleep(0.05)
            dead = {s.event.source: s for s in await store.list_events(status="dead")}
        assert set(dead) == {"bad-reset", "bad-500"}
        assert all(s.attempts == 2 for s in dead.values())


class TestEchoedSecrets:
    async def test_token_echoed_in_an_error_body_is_not_stored(self, tmp_path: Path) -> None:
        """Item 15: the upstream echoing our bearer token in its error body put the token
        in the ``last_error`` column."""
        token = "tok-" + new_id()
        register_secret(token)  # as LoginAuth does with every token it gets

        async def upstream(request: httpx.Request) -> httpx.Response:
            return httpx.Response(400, json={"error": {
                "code": "bad_token", "message": f"Bearer {token} is not allowed; raw {token}"}})

        async with forwarding(tmp_path, upstream, config()) as (store, forwarder):
            ev = event("a", 1, time.time())
            await store.append(ev)
            await poll(lambda: forwarder.dead == 1)
            stored = await store.get_event(ev.id)
        assert stored is not None and stored.last_error is not None
        assert token not in stored.last_error and "[REDACTED]" in stored.last_error


    async def test_token_echoed_into_a_flow_error_is_not_stored(self, tmp_path: Path) -> None:
        """The same echo reaching a flow (an ``mfo.*`` task's error carries the upstream's
        error body) was stored as written: in the task's and the run's ``error``."""
        token = "tok-" + new_id()
        register_secret(token)
        registry = builtin_registry()

        @registry.task("echoing", config=EmptyConfig)
        async def echoing(ctx: TaskContext, config: EmptyConfig) -> dict[str, Any]:
            raise RuntimeError(f"400 bad_token: Bearer {token} is not allowed; raw {token}")

        flow = load_flow_text("name: Echo\ntasks:\n  - {id: call, type: echoing}\n", registry)
        async with open_sqlite_store(tmp_path / "store.sqlite3") as store:
            await store.create_runs([RunRequest(flow="Echo", run_id=new_id(), trigger="manual")])
            actor = SchedulerActor(InstanceConfig(instance="echo"), store, {"Echo": flow},
                                   client=None)
            async with running_scheduler(actor):
                [run] = await settled_runs(store, 1)
            found = await store.get_run(run.run_id)
        assert found is not None
        record, tasks = found
        stored = [record.error, *(t.error for t in tasks)]
        assert all(e is not None and token not in e and "[REDACTED]" in e for e in stored), \
            stored


@asynccontextmanager
async def raw_upstream(respond: Callable[[anyio.abc.SocketStream], Awaitable[None]]
                       ) -> AsyncIterator[str]:
    """A TCP server that reads a request head and then runs *respond* on the connection."""
    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            try:
                await respond(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:  # the listener closed too
        tg.start_soon(listener.serve, serve)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


class TestDeadlines:
    async def test_trickled_answer_is_cut_at_the_timeout(self) -> None:
        """Item 11: a body trickled one byte per 100 ms held a slot for ~54 s with a 5 s
        timeout (httpx's timeouts are per read); ``client.timeout`` bounds the exchange."""
        async def trickle(stream: anyio.abc.SocketStream) -> None:
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(1000):
                await stream.send(b"x")
                await anyio.sleep(0.1)

        async with raw_upstream(trickle) as url:
            async with httpx.AsyncClient(timeout=1.0) as http:
                client = BaseClient(url, auth=NoAuth(), http=http)
                started = anyio.current_time()
                with anyio.fail_after(15), pytest.raises(RetryableError, match="timeout"):
                    await client.request("POST", "/api/events", content=b"{}", retry=False)
                assert anyio.current_time() - started < 10

    async def test_endless_answer_is_not_read_into_memory(self) -> None:
        """Item 11: a 200 MB answer was read whole (RSS +800 MB); bodies are read up to a
        cap, and an error body up to 64 KiB."""
        sent = 0

        async def endless(stream: anyio.abc.SocketStream) -> None:
            nonlocal sent
            await stream.send(b"HTTP/1.1 500 Oops\r\nContent-Length: 209715200\r\n\r\n")
            chunk = b"y" * 65536
            while True:
                await stream.send(chunk)
                sent += len(chunk)

        async with raw_upstream(endless) as url:
            async with httpx.AsyncClient(timeout=30.0) as http:
                client = BaseClient(url, auth=NoAuth(), http=http)
                with anyio.fail_after(20), pytest.raises(RetryableError) as info:
                    await client.request("POST", "/api/events", content=b"{}", retry=False)
        assert info.value.status == 500
        assert sent < 32 * 1024 * 1024


class TestHostileStream:
    """A chat stream from an upstream that never ends a line, or never ends an event: the
    client's memory is bounded by MAX_EVENT_SIZE, it raises a clear error and closes the
    connection (the server sees it go)."""

    @pytest.mark.parametrize("unit", [b"x" * 4096, b"data: " + b"y" * 4090 + b"\n"],
                             ids=["no-newline", "no-blank-line"])
    async def test_an_oversized_event_fails_the_stream_and_closes_it(self, unit: bytes
                                                                     ) -> None:
        from mfo_actors.client import MFOClient
        from mfo_actors.client._sse import MAX_EVENT_SIZE
        from mfo_actors.client.errors import ValidationError

        sent = 0
        gone = anyio.Event()

        async def serve(conn: anyio.abc.SocketStream) -> None:
            nonlocal sent
            async with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += await conn.receive()
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                b"transfer-encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (len(unit), unit)
                try:
                    while sent < 64 * MAX_EVENT_SIZE:  # endless, as far as the client knows
                        await conn.send(chunk)
                        sent += len(unit)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    gone.set()

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve)
                http = httpx.AsyncClient()
                base = BaseClient(f"http://127.0.0.1:{port}", auth=NoAuth(), http=http)
                async with MFOClient(base, owns_http=True) as client:
                    with anyio.fail_after(20):
                        with pytest.raises(ValidationError, match="stream event larger"):
                            async with client.chat.stream("hi") as chunks:
                                async for _ in chunks:
                                    pass
                        await gone.wait()  # the client closed the connection
                assert sent < 64 * MAX_EVENT_SIZE
                tg.cancel_scope.cancel()


def test_a_daemon_stores_no_token_its_upstream_echoes(tmp_path: Path) -> None:
    """The daemon as run (a real process, its lean sender): an upstream that answers 400 with
    our bearer token in the error body gets the event dead-lettered, and neither the stored
    ``last_error`` nor the daemon's log holds the token."""
    token = "tok-" + new_id()
    holder: list[scripted.RawUpstream] = []

    async def echo_token(stream: anyio.abc.ByteStream) -> bool:
        head = holder[0].requests[-1].split(b"\r\n\r\n")[0].decode("latin-1")
        auth = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                    if line.lower().startswith("authorization:"))
        body = json.dumps({"error": {"code": "bad_token", "message":
                                     f"{auth} is not allowed; raw {auth.split()[-1]}"}})
        await stream.send(scripted.answer(400, body.encode(), "Content-Type: application/json"))
        return True

    with anyio.from_thread.start_blocking_portal() as portal, \
            portal.wrap_async_context_manager(scripted.raw_upstream([], default=echo_token)) as up:
        holder.append(up)
        config = write_config(tmp_path, client={"base_url": up.url},
                              auth={"mode": "token", "token": token},
                              forwarder={"ordering": "none"})
        cfg = json.loads(config.read_text())
        listener = f"http://127.0.0.1:{cfg['webhook_listener']['port']}/webhook"
        with running_daemon(config) as daemon:
            wait_http_ok(f"http://127.0.0.1:{cfg['admin']['port']}/readyz")
            accepted = httpx.post(listener, json={"a": 1}, timeout=10)
            assert accepted.status_code == 202
            event_id = accepted.json()["id"]
            daemon.wait_event("forwarder.dead_lettered")
            log = "\n".join(daemon.output())
        assert token.encode() in up.requests[-1]  # the token was sent (and echoed back)
    with sqlite3.connect(tmp_path / "state" / DEFAULT_SQLITE_FILE) as db:
        (last_error,) = db.execute("SELECT last_error FROM events WHERE id = ?",
                                   (event_id,)).fetchone()
    assert "400" in last_error and "[REDACTED]" in last_error
    assert token not in last_error
    assert token not in log
