"""Fuzz targets that need no daemon: the HTTP core over a loopback socket, the config and flow
loaders. Used by the bounded pytest run (``test_fuzz_targets.py``) and by ``python -m
tests.fuzz`` for long runs.

The HTTP target runs one :class:`~mfo_actors.http.HttpServer` (the listener's core, with a
head check like the listener's) in a background thread with its own event loop, so each
example is a plain blocking socket exchange: thousands per second, and the server sees
real TCP (split reads, half-closes, resets) rather than a fake stream.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import h11

from mfo_actors.errors import ConfigError
from mfo_actors.http import HttpLimits, HttpServer, Request, RequestHead, Response

__all__ = ["CONFIG_SEEDS", "FLOW_SEEDS", "HttpTarget", "check_config", "check_flow"]

ROOT = Path(__file__).resolve().parents[2]
CONFIG_SEEDS = [p.read_text() for p in sorted((ROOT / "config").glob("*.yaml"))]
FLOW_SEEDS = [p.read_text() for p in sorted((ROOT / "flows").glob("*.yaml"))]


async def _echo(request: Request) -> Response:
    return Response(202, [("content-type", "application/json")], b'{"id":"x"}')


def _head_check(head: RequestHead) -> Response | int:
    if head.path != "/webhook":
        return Response(404, [("content-type", "application/json")], b'{"error":"no"}')
    if head.method != "POST":
        return Response(405, [("allow", "POST")], b"")
    return 4096


class HttpTarget:
    """An HttpServer in a thread; :meth:`exchange` sends bytes and checks the answer."""

    def __init__(self, backend: str = "asyncio") -> None:
        self.backend = backend
        self.port = 0
        self.server: HttpServer | None = None
        self.crashed: BaseException | None = None
        self._stop: anyio.Event | None = None
        self._thread: threading.Thread | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None

    @contextmanager
    def running(self) -> Iterator[HttpTarget]:
        started: queue.Queue[int] = queue.Queue()

        async def main() -> None:
            limits = HttpLimits(header_timeout=2.0, body_timeout=2.0, keepalive_timeout=2.0,
                                max_body_size=4096)
            self.server = HttpServer(_echo, limits=limits, head_check=_head_check)
            self._stop = anyio.Event()
            self._token = anyio.lowlevel.current_token()
            async with anyio.create_task_group() as tg:
                started.put(await tg.start(self.server.serve, "127.0.0.1", 0))
                await self._stop.wait()
                tg.cancel_scope.cancel()

        def thread() -> None:
            try:
                anyio.run(main, backend=self.backend)
            except BaseException as exc:  # reported by the check after each example
                self.crashed = exc
                started.put(0)

        self._thread = threading.Thread(target=thread, daemon=True)
        self._thread.start()
        self.port = started.get(timeout=10)
        try:
            yield self
        finally:
            if self._stop is not None and self._token is not None:
                anyio.from_thread.run_sync(self._stop.set, token=self._token)
            self._thread.join(timeout=10)

    def exchange(self, data: bytes, *, chunks: int = 1, reset: bool = False) -> bytes:
        """Send *data* in *chunks* writes, then half-close (or reset); return the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            step = max(1, len(data) // max(1, chunks))
            try:
                for i in range(0, len(data), step):
                    sock.sendall(data[i:i + step])
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    return b""
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return b""
            out = []
            try:
                while chunk := sock.recv(65536):
                    out.append(chunk)
            except OSError:
                pass
            return b"".join(out)

    def check(self, answer: bytes) -> None:
        """The server is alive, and *answer* is empty or a sequence of valid responses."""
        assert self.crashed is None, f"server crashed: {self.crashed!r}"
        assert self._thread is not None and self._thread.is_alive()
        if not answer:
            return
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(answer)
        event = client.next_event()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue
            event = client.next_event()
        assert isinstance(event, h11.Response), answer[:200]
        assert event.status_code in (202, 404, 405) or 400 <= event.status_code < 600, event


def check_config(text: str) -> None:
    """Loading *text* either works or raises ConfigError: never anything else."""
    from mfo_actors.config import load_config_text

    try:
        load_config_text(text, file="fuzz.yaml", environ={"X": "v", "MFO_PASSWORD": "p" * 20,
                                                            "MFO_EMAIL": "a@b.c"})
    except ConfigError:
        pass


def check_flow(text: str) -> None:
    """Loading a flow file either works or raises ConfigError (FlowLoadError is one)."""
    from mfo_actors.taskflow import default_registry, load_flow_text

    try:
        load_flow_text(text, default_registry(), file="fuzz.yaml")
    except ConfigError:
        pass


def fuzz_minutes() -> float:
    """``MFO_FUZZ_MINUTES`` (long runs); 0 for the bounded run inside the test suite."""
    return float(os.environ.get("MFO_FUZZ_MINUTES", "0") or 0)
