"""The HTTP core against hostile clients, on asyncio, asyncio + uvloop and trio.

Resets in the middle of a lingering close, pipelining without reading, bodies streamed at a
refused path, CL+TE framing, HTTP/2.0 request lines, absolute-form targets, idle connections
hogging every slot. Each test states the defect it guards against.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import anyio
import anyio.abc
import pytest

from mfo_actors.http import HttpLimits, HttpServer, Request, RequestHead, Response
from tests.helpers import poll, uvloop_asyncio_trio  # noqa: F401 (the anyio_backend)
from tests.test_http_server import Client, connect, echo, raw_request, running

pytestmark = pytest.mark.anyio


def reset(stream: anyio.abc.SocketStream) -> None:
    """Make the next close send a TCP reset (SO_LINGER 0) instead of a FIN."""
    reset_socket(stream.extra(anyio.abc.SocketAttribute.raw_socket))


async def send_until_blocked(port: int, first: bytes, chunk: bytes, *, cap: int,
                             stall: float = 1.0) -> int:
    """From a raw socket that never reads: send *first*, then *chunk* repeatedly. Stop when
    the socket stays unwritable for *stall* s (the server applies backpressure), the server
    closes, or *cap* bytes went out (it does not). Returns the bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    sent = 0
    try:
        data = first
        while sent < cap:
            with anyio.move_on_after(stall) as scope:
                await anyio.wait_writable(sock)
            if scope.cancelled_caught:
                return sent
            try:
                n = sock.send(data)
            except BlockingIOError:
                continue
            except OSError:  # the server closed (after its lingering close)
                return sent
            sent += n
            data = data[n:] or chunk
        return sent
    finally:
        reset_socket(sock)
        sock.close()


def reset_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class TestResets:
    async def test_reset_during_lingering_close_never_crashes_the_server(self) -> None:
        """A malformed request followed at once by a reset, hundreds of times: the server
        answers 400 and lingers; the reset closes the transport under it. No connection may
        take the server down (uvloop raised RuntimeError from send_eof)."""
        server = HttpServer(echo)
        requests = [
            b"GARBAGE \x00\x01 HTTP/1.1\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: zz\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 9999999\r\n\r\n" + b"x" * 5000,
        ]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve, "127.0.0.1", 0)
                for round_ in range(10):
                    streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(30)]
                    for i, stream in enumerate(streams):
                        reset(stream)
                        try:
                            await stream.send(requests[(i + round_) % len(requests)])
                        except (anyio.BrokenResourceError, OSError):
                            pass
                    await anyio.sleep(0.01 * (round_ % 2))
                    for stream in streams:
                        await stream.aclose()
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    reply = await Client(stream).request("POST", "/alive", b"{}")
                assert reply.status == 200
                await poll(lambda: server.active_connections == 0)
                tg.cancel_scope.cancel()


class TestBackpressure:
    async def test_pipelining_without_reading_is_held_back(self) -> None:
        """A client that pipelines requests and never reads the answers must be held back
        by TCP flow control: the server stops reading while its answers are unsent, instead
        of queueing the client's bytes in memory (anyio's asyncio stream kept reading)."""
        big = Response(200, [("content-type", "text/plain")], b"z" * 16384)

        async def answer(request: Request) -> Response:
            return big

        async with running(answer) as server:
            chunk = raw_request("GET", "/p") * 512
            sent = await send_until_blocked(server.port, chunk, chunk, cap=256 * 1024 * 1024)
        assert sent < 64 * 1024 * 1024

    async def test_body_at_a_refused_path_is_not_buffered(self) -> None:
        """A 404 with a body still coming closes lingering: the server discards at most
        LINGER_MAX_BYTES, and does not read the rest of a 200 MB body into memory."""
        def check(head: RequestHead) -> Response | int:
            return Response(404, body=b"no")

        async with running(head_check=check) as server:
            head = b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 209715200\r\n\r\n"
            sent = await send_until_blocked(server.port, head, b"x" * 65536,
                                            cap=128 * 1024 * 1024)
        assert sent < 64 * 1024 * 1024


class TestFraming:
    async def test_content_length_with_transfer_encoding_closes_after_answer(self) -> None:
        """RFC 9112 section 6.1: a request with both is framed by chunked, answered, and the
        connection is closed (a smuggled second request never runs)."""
        async with running() as server, connect(server) as client:
            await client.send_raw(
                b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                + raw_request("GET", "/smuggled"))
            reply = await client.reply()
            assert reply.status == 200 and reply.json()["size"] == 3  # type: ignore[index]
            assert reply.headers["connection"] == "close"
            assert await client.closed_by_server(5)

    async def test_http_2_request_line_is_505(self) -> None:
        """Only HTTP/1.0 and 1.1 are spoken here; ``HTTP/2.0`` is not silently read as 1.1."""
        async with running() as server, connect(server) as client:
            await client.send_raw(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
            reply = await client.reply()
            assert reply.status == 505
            assert await client.closed_by_server(5)

    async def test_absolute_form_target_is_routed_by_its_path(self) -> None:
        """RFC 9112 section 3.2.2: a server must accept the absolute form."""
        async with running() as server, connect(server) as client:
            await client.send_raw(b"POST http://t:80/hooks/a?x=1 HTTP/1.1\r\nHost: t\r\n"
                                  b"Content-Length: 2\r\n\r\n{}")
            reply = await client.reply()
            assert reply.json() == {"method": "POST", "path": "/hooks/a", "query": "x=1",
                                    "size": 2}
            await client.send_raw(b"GET HTTPS://t HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await client.reply()).json()["path"] == "/"  # type: ignore[index]


class TestHalfClose:
    @pytest.mark.parametrize("expect", [False, True])
    async def test_body_cut_short_by_a_half_close_is_400(self, expect: bool) -> None:
        """A client that half-closes before its body is complete can still read: it gets a
        400, as for a head cut short (the httptools core closed without a word; with
        ``Expect: 100-continue`` it sent only the 100, which the fuzzer found)."""
        extra = b"Expect: 100-continue\r\n" if expect else b""
        async with running() as server, connect(server) as client:
            await client.send_raw(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n"
                                  + extra + b"\r\nabc")
            await client.stream.send_eof()
            reply = await client.reply()
            assert reply.status == 400 and "body" in reply.json()["error"]  # type: ignore[index]
            assert await client.closed_by_server(5)


class TestConnectionSlots:
    async def test_idle_connections_do_not_lock_out_a_new_request(self) -> None:
        """At max_connections, a new connection evicts the longest-idle one (keep-alive
        between requests, or never sent a byte) instead of being refused: probes get in."""
        limits = HttpLimits(max_connections=8)
        async with running(limits=limits) as server, contextlib.AsyncExitStack() as stack:
            idle = [await stack.enter_async_context(connect(server)) for _ in range(8)]
            for client in idle[:4]:
                assert (await client.request("GET", "/warm")).status == 200
            await poll(lambda: server.active_connections == 8)
            for _ in range(3):
                async with connect(server) as probe:
                    assert (await probe.request("GET", "/healthz")).status == 200
            assert server.active_connections <= 8

    async def test_busy_connections_are_not_evicted(self) -> None:
        """Connections in the middle of a request are never evicted: the newcomer gets 503."""
        release = anyio.Event()

        async def slow(request: Request) -> Response:
            await release.wait()
            return Response(200)

        limits = HttpLimits(max_connections=2)
        async with running(slow, limits=limits) as server, contextlib.AsyncExitStack() as stack:
            busy = [await stack.enter_async_context(connect(server)) for _ in range(2)]
            for client in busy:
                await client.send_raw(raw_request("GET", "/slow"))
            await poll(lambda: server.in_flight == 2)
            async with connect(server) as late:
                assert (await late.reply()).status == 503
            release.set()
            for client in busy:
                assert (await client.reply()).status == 200

