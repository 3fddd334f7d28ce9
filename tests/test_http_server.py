"""The HTTP core over real sockets: keep-alive, pipelining, limits, timeouts, streaming, stop."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import h11
import pytest

from mfo_actors.http import HttpLimits, HttpServer, Request, RequestHead, Response, serve_http
from mfo_actors.http._parser import RequestParser
from tests.helpers import poll

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> Response:
    body = json.dumps({"method": request.method, "path": request.path, "query": request.query,
                       "size": len(request.body)}).encode()
    return Response(200, [("content-type", "application/json")], body)


@asynccontextmanager
async def running(
    handler: Callable[[Request], Awaitable[Response]] = echo,
    *,
    limits: HttpLimits = HttpLimits(),
    head_check: Callable[[RequestHead], Response | int] | None = None,
) -> AsyncIterator[HttpServer]:
    server = HttpServer(handler, limits=limits, head_check=head_check)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 0)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)

    def json(self) -> object:
        return json.loads(self.body)


class Client:
    """A raw-socket HTTP/1.1 client, so tests control every byte and see every close."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None) -> Reply:
        await self.send_raw(raw_request(method, path, body, headers))
        return await self.reply()

    async def reply(self, wait: float = 10) -> Reply:
        with anyio.fail_after(wait):
            if self.conn.our_state is h11.IDLE:
                # pretend we sent a request so h11 will parse the answer
                self.conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
                self.conn.send(h11.EndOfMessage())
            reply: Reply | None = None
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await self.stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        data = b""
                    self.conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    reply = Reply(event.status_code,
                                  {k.decode(): v.decode() for k, v in event.headers})
                elif isinstance(event, h11.InformationalResponse):
                    continue
                elif isinstance(event, h11.Data):
                    assert reply is not None
                    reply.body += event.data
                    reply.chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert reply is not None
                    if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    return reply
                else:
                    raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self, wait: float = 10) -> bool:
        """True if the server closes the connection within *wait* seconds."""
        with anyio.move_on_after(wait):
            try:
                while await self.stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False


def raw_request(method: str, path: str, body: bytes = b"",
                headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    hdrs = headers or []
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@asynccontextmanager
async def connect(server: HttpServer) -> AsyncIterator[Client]:
    stream = await anyio.connect_tcp("127.0.0.1", server.port)
    async with stream:
        yield Client(stream)


class TestBasics:
    async def test_serve_http_reports_port_and_answers(self) -> None:
        """serve_http passes the bound port to task_status.started."""
        async with anyio.create_task_group() as tg:
            port = await tg.start(functools.partial(serve_http, echo, host="127.0.0.1", port=0))
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                reply = await Client(stream).request("POST", "/a?x=1", b"hello")
            assert reply.status == 200
            assert reply.json() == {"method": "POST", "path": "/a", "query": "x=1", "size": 5}
            tg.cancel_scope.cancel()

    async def test_keep_alive_reuses_connection(self) -> None:
        async with running() as server, connect(server) as client:
            for i in range(5):
                reply = await client.request("POST", f"/n{i}", b"x" * i)
                assert reply.status == 200
                assert reply.json() == {"method": "POST", "path": f"/n{i}", "query": "",
                                        "size": i}
            assert server.active_connections == 1

    async def test_pipelined_requests_answered_in_order(self) -> None:
        """Three requests in one write get three answers, in order, on one connection."""
        async with running() as server, connect(server) as client:
            await client.send_raw(b"".join(
                raw_request("POST", f"/p{i}", b"y" * i) for i in range(3)))
            paths = [(await client.reply()).json()["path"] for _ in range(3)]  # type: ignore[index]
            assert paths == ["/p0", "/p1", "/p2"]

    async def test_handler_exception_is_500_json(self) -> None:
        async def boom(request: Request) -> Response:
            raise RuntimeError("kaput")

        async with running(boom) as server, connect(server) as client:
            reply = await client.request("GET", "/")
            assert reply.status == 500
            assert reply.json() == {"error": "internal server error"}
            assert (await client.request("GET", "/")).status == 500  # connection survives

    async def test_header_injection_from_handler_is_500(self) -> None:
        """A response header with CR/LF never reaches the wire (no response splitting)."""
        async def bad(request: Request) -> Response:
            return Response(200, [("x-evil", "a\r\nset-cookie: x=1")], b"")

        async with running(bad) as server, connect(server) as client:
            reply = await client.request("GET", "/")
            assert reply.status == 500 and "set-cookie" not in reply.headers

    async def test_head_check_answers_without_reading_body(self) -> None:
        """A HeadCheck Response is sent at once; the unread body forces Connection: close."""
        def check(head: RequestHead) -> Response | int:
            return Response(404, body=b"nope") if head.path != "/ok" else 10

        async with running(head_check=check) as server:
            async with connect(server) as client:
                # the body is announced but never sent: the answer must not wait for it
                await client.send_raw(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
                reply = await client.reply()
                assert reply.status == 404
                assert reply.headers["connection"] == "close"
            async with connect(server) as client:
                # without a body the connection stays open after the early answer
                assert (await client.request("GET", "/x")).status == 404
                assert (await client.request("GET", "/y")).status == 404
                assert server.active_connections == 1
                assert (await client.request("POST", "/ok", b"0123456789")).status == 200
                assert (await client.request("POST", "/ok", b"01234567890")).status == 413

    async def test_expect_100_continue(self) -> None:
        async with running() as server, connect(server) as client:
            await client.send_raw(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                                  b"Expect: 100-continue\r\n\r\n")
            with anyio.fail_after(5):
                interim = await client.stream.receive()
            assert interim.startswith(b"HTTP/1.1 100 ")
            client.conn.send(h11.Request(method="POST", target="/e",
                                         headers=[("host", "t"), ("content-length", "3"),
                                                  ("expect", "100-continue")]))
            client.conn.receive_data(interim)
            await client.send_raw(client.conn.send(h11.Data(data=b"abc")) or b"")
            client.conn.send(h11.EndOfMessage())
            reply = await client.reply()
            assert reply.json()["size"] == 3  # type: ignore[index]


class TestErrors:
    async def test_malformed_request_is_400(self) -> None:
        async with running() as server, connect(server) as client:
            await client.send_raw(b"GARBAGE\r\n\r\n")
            reply = await client.reply()
            assert reply.status == 400
            assert "error" in reply.json()  # type: ignore[operator]
            assert await client.closed_by_server()

    async def test_content_length_too_large_is_413_before_body(self) -> None:
        """413 comes back though the body was never sent."""
        limits = HttpLimits(max_body_size=1000)
        async with running(limits=limits) as server, connect(server) as client:
            await client.send_raw(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
            reply = await client.reply()
            assert reply.status == 413
            assert reply.headers["connection"] == "close"

    async def test_chunked_body_too_large_is_413_while_streaming(self) -> None:
        limits = HttpLimits(max_body_size=1000)
        async with running(limits=limits) as server, connect(server) as client:
            await client.send_raw(b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                                  b"\r\n\r\n" + b"200\r\n" + b"z" * 0x200 + b"\r\n")
            await client.send_raw(b"200\r\n" + b"z" * 0x200 + b"\r\n")  # 1024 > 1000
            reply = await client.reply()
            assert reply.status == 413
            assert await client.closed_by_server()

    async def test_chunked_body_within_limit_is_read(self) -> None:
        limits = HttpLimits(max_body_size=1000)
        async with running(limits=limits) as server, connect(server) as client:
            await client.send_raw(b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                                  b"\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
            assert (await client.reply()).json()["size"] == 8  # type: ignore[index]

    async def test_too_many_headers_is_431(self) -> None:
        limits = HttpLimits(max_headers=10)
        async with running(limits=limits) as server, connect(server) as client:
            headers = [(f"x-h{i}", "v") for i in range(10)]
            assert (await client.request("GET", "/", headers=headers)).status == 431

    async def test_oversized_head_is_431(self) -> None:
        limits = HttpLimits(max_header_size=2048)
        async with running(limits=limits) as server, connect(server) as client:
            reply = await client.request("GET", "/", headers=[("x-big", "a" * 4096)])
            assert reply.status == 431


class TestTimeouts:
    async def test_slowloris_closed_while_others_are_served(self) -> None:
        """A client trickling its head is cut off by the total header timeout, not per byte."""
        limits = HttpLimits(header_timeout=0.6)
        async with running(limits=limits) as server, connect(server) as slow:
            start = anyio.current_time()
            closed = anyio.Event()

            async def trickle() -> None:
                try:
                    for byte in b"POST /slow HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaa":
                        await slow.send_raw(bytes([byte]))
                        await anyio.sleep(0.05)  # each byte well within any per-recv limit
                except (anyio.BrokenResourceError, OSError):
                    pass
                closed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(trickle)
                async with connect(server) as fast:
                    for _ in range(3):
                        assert (await fast.request("GET", "/fast")).status == 200
                assert await slow.closed_by_server(wait=5)
                elapsed = anyio.current_time() - start
                tg.cancel_scope.cancel()
            assert 0.5 <= elapsed < 3

    async def test_slow_body_is_cut_off(self) -> None:
        limits = HttpLimits(body_timeout=0.3)
        async with running(limits=limits) as server, connect(server) as client:
            await client.send_raw(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
            reply = await client.reply()
            assert reply.status == 408
            assert await client.closed_by_server()

    async def test_idle_keepalive_connection_closed(self) -> None:
        limits = HttpLimits(keepalive_timeout=0.3)
        async with running(limits=limits) as server, connect(server) as client:
            assert (await client.request("GET", "/")).status == 200
            start = anyio.current_time()
            assert await client.closed_by_server(wait=5)
            assert anyio.current_time() - start >= 0.25

    async def test_silent_connection_closed_by_header_timeout(self) -> None:
        limits = HttpLimits(header_timeout=0.3)
        async with running(limits=limits) as server, connect(server) as client:
            assert await client.closed_by_server(wait=5)


class TestConnections:
    async def test_max_connections_answers_503(self) -> None:
        """With every connection in a request, a newcomer is answered 503 and closed (idle
        ones would be evicted instead: tests/test_http_hostile.py)."""
        release = anyio.Event()

        async def slow(request: Request) -> Response:
            await release.wait()
            return Response(200)

        limits = HttpLimits(max_connections=2)
        async with running(slow, limits=limits) as server, connect(server) as c1, \
                connect(server) as c2:
            await c1.send_raw(raw_request("GET", "/"))
            await c2.send_raw(raw_request("GET", "/"))
            await poll(lambda: server.in_flight == 2)
            async with connect(server) as c3:
                reply = await c3.reply()
                assert reply.status == 503
                assert reply.headers["retry-after"] == "1"
                assert await c3.closed_by_server()
            release.set()
            assert (await c1.reply()).status == 200
            assert (await c1.request("GET", "/")).status == 200

    async def test_stop_accepting_and_drain(self) -> None:
        """In-flight requests finish; keep-alive gets Connection: close; new ones refused."""
        gate = anyio.Event()
        entered = anyio.Event()

        async def slow(request: Request) -> Response:
            if request.path == "/slow":
                entered.set()
                await gate.wait()
            return Response(200, body=b"done")

        async with running(slow) as server, connect(server) as busy, connect(server) as idle:
            assert (await idle.request("GET", "/")).status == 200
            await busy.send_raw(raw_request("GET", "/slow"))
            await entered.wait()
            server.stop_accepting()
            assert await idle.closed_by_server()  # idle keep-alive closed at once
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", server.port)
            assert not await server.drain(0.1)
            gate.set()
            reply = await busy.reply()
            assert reply.status == 200 and reply.headers["connection"] == "close"
            assert await server.drain(5)
            assert await busy.closed_by_server()


class TestStreaming:
    async def test_stream_sent_chunked(self) -> None:
        async def sse(request: Request) -> Response:
            async def events() -> AsyncIterator[bytes]:
                for i in range(3):
                    yield f"data: {i}\n\n".encode()
            return Response(200, [("content-type", "text/event-stream")], stream=events())

        async with running(sse) as server, connect(server) as client:
            reply = await client.request("GET", "/events")
            assert reply.headers["transfer-encoding"] == "chunked"
            assert reply.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert (await client.request("GET", "/events")).status == 200  # keep-alive

    async def test_stream_ends_when_client_leaves(self) -> None:
        finished = anyio.Event()
        started = anyio.Event()

        async def forever(request: Request) -> Response:
            async def events() -> AsyncIterator[bytes]:
                try:
                    yield b"data: hello\n\n"
                    started.set()
                    await anyio.sleep_forever()
                    yield b""
                finally:
                    finished.set()
            return Response(200, [("content-type", "text/event-stream")], stream=events())

        async with running(forever) as server:
            async with connect(server) as client:
                await client.send_raw(raw_request("GET", "/events"))
                await started.wait()
            with anyio.fail_after(5):
                await finished.wait()
            with anyio.fail_after(5):
                while server.active_connections:  # noqa: ASYNC110 (polling with a deadline)
                    await anyio.sleep(0.01)


class TestCancellation:
    async def test_cancel_does_not_wait_out_a_lingering_close(self) -> None:
        """Cancelling the server (a shutdown deadline) ends a connection that is discarding a
        refused body at once, not after LINGER_TIMEOUT: shutdown must keep its deadline."""
        limits = HttpLimits(max_body_size=1000)
        server = HttpServer(echo, limits=limits)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as outer:
                port = await outer.start(server.serve, "127.0.0.1", 0)
                # The client stays open (it never ends its body) until the server is gone.
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    client = Client(stream)
                    await client.send_raw(
                        b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
                    assert (await client.reply()).status == 413  # the server lingers now
                    started = anyio.current_time()
                    outer.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        # wait for the serve task to finish while the client stays connected
                        while server.active_connections:  # noqa: ASYNC110 (deadline above)
                            await anyio.sleep(0.01)
                    elapsed = anyio.current_time() - started
        assert elapsed < 1.0

    async def test_client_bytes_during_a_stream_are_not_buffered_without_bound(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While a response streams, the server watches the socket for the client leaving;
        a client sending data meanwhile must not grow the server's buffer without bound."""
        fed = 0
        original = RequestParser.feed

        def counting(self: RequestParser, data: bytes) -> None:
            nonlocal fed
            fed += len(data)
            original(self, data)

        monkeypatch.setattr(RequestParser, "feed", counting)
        started = anyio.Event()

        async def forever(request: Request) -> Response:
            async def events() -> AsyncIterator[bytes]:
                yield b"data: hello\n\n"
                started.set()
                await anyio.sleep_forever()
                yield b""
            return Response(200, [("content-type", "text/event-stream")], stream=events())

        async with running(forever) as server, connect(server) as client:
            await client.send_raw(raw_request("GET", "/events"))
            with anyio.fail_after(5):
                await started.wait()
            junk = b"x" * (1024 * 1024)
            with anyio.move_on_after(1.0):
                for _ in range(64):
                    await client.send_raw(junk)
        assert fed < 1024 * 1024
