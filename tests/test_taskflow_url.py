"""Item 13: URLs of ``http.request`` built from event data cannot be steered to another host.

The scheme, host and port come only from the flow file; every value interpolated after them
is percent-encoded, so ``"@host:port/..."`` in a payload stays inside the path or query.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import pytest

from mfo_actors.errors import ConfigError
from mfo_actors.taskflow import FlowExecutor, default_registry, load_flow_text

pytestmark = pytest.mark.anyio


def flow_with_url(url: str) -> str:
    return ("name: f\ntasks:\n  - id: call\n    type: http.request\n"
            f"    config: {{url: {url!r}}}\n")


@pytest.mark.parametrize("url", [
    "${input.url}",
    "http://${input.host}/x",
    "http://127.0.0.1:${input.port}/x",
    "${input.scheme}://127.0.0.1/x",
    "http://127.0.0.1${input.path}",
])
def test_scheme_host_and_port_must_be_written_in_the_flow(url: str) -> None:
    with pytest.raises(ConfigError, match="scheme, host and port") as info:
        load_flow_text(flow_with_url(url), default_registry(), file="f.yaml")
    assert info.value.key is not None and info.value.key.endswith("config.url")


async def test_interpolated_values_are_percent_encoded() -> None:
    """A payload value ``@evil:1/x`` in the path, ``a&b=c#d`` in the query: both arrive
    percent-encoded at the flow file's host (before: the first moved the request to
    evil:1 when it landed right after the authority)."""
    seen: list[bytes] = []
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener: Any = multi.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve() -> None:
        stream = await listener.accept()
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            seen.append(data)
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    flow = load_flow_text(flow_with_url(
        f"http://127.0.0.1:{port}/users/${{event.payload.id}}?q=${{event.payload.q}}"),
        default_registry())
    event = {"id": "E", "source": "s", "type": "t", "received_at": 0.0, "headers": {},
             "payload": {"id": "@evil:1/x", "q": "a&b=c#d"}}
    async with multi, anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(10):
            outcome = await FlowExecutor().run(flow, event=event)
    assert outcome.status == "done", outcome.error
    assert seen[0].startswith(b"GET /users/%40evil%3A1%2Fx?q=a%26b%3Dc%23d HTTP/1.1")
