"""ConnectionStream's read path: the direct read from anyio's asyncio protocol (plain TCP on
asyncio and uvloop) and the fallback through anyio's ``receive`` (trio) return the same
bytes, split at ``max_bytes`` with the rest kept, and end the same way.

The first test guards the fast path itself: it is taken only when anyio's stream has the
protocol attributes it reads, so an anyio change would otherwise silently turn it off.
"""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from mfo_actors.http._stream import ConnectionStream
from tests.helpers import uvloop_asyncio_trio  # noqa: F401 (this module's anyio_backend)

pytestmark = pytest.mark.anyio


async def _pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    """A connected (client, accepted server side) pair over loopback."""
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = multi.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted: list[anyio.abc.SocketStream] = []

    async def accept_one() -> None:
        async with listener:
            accepted.append(await listener.accept())

    async with anyio.create_task_group() as tg:
        tg.start_soon(accept_one)
        client = await anyio.connect_tcp("127.0.0.1", port)
    return client, accepted[0]


async def test_fast_path_is_armed_on_asyncio_only(
        anyio_backend: tuple[str, dict[str, bool]]) -> None:
    client, server = await _pair()
    async with client, server:
        stream = ConnectionStream(server)
        assert (stream._protocol is not None) == (anyio_backend[0] == "asyncio")


async def test_receive_splits_at_max_bytes_then_sees_the_end(
        anyio_backend: tuple[str, dict[str, bool]]) -> None:
    client, server = await _pair()
    async with client, server:
        stream = ConnectionStream(server)
        await client.send(b"0123456789")
        got = b""
        with anyio.fail_after(5):
            while len(got) < 10:
                piece = await stream.receive(4)
                assert 0 < len(piece) <= 4
                got += piece
        assert got == b"0123456789"
        await client.send_eof()
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await stream.receive(4)
