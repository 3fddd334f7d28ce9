"""Delivery client benchmark: CPU per delivered ``POST /api/events``, three clients, one run.

The reference MFO server (``python -m mfo_actors mock-server``, auth on, dedupe on) runs in
its own process; this process sends events to it one at a time (one request in flight, one
kept-alive connection, as one forwarder worker does) with each client in turn, and measures
its own CPU time (user + system, ``time.process_time``) per delivered event:

* **lean**: the forwarder's sender in the daemon (``LeanSender`` over ``UpstreamPool``: the
  gate with a bearer token, the answer classified, the ``mfo_upstream_*`` metrics);
* **httpx**: the same send through ``ClientSender`` and the MFO ``BaseClient`` on httpx (the
  forwarder's sender before, still the library's), one-connection pool as the daemon had;
* **raw**: hand-written request bytes on one anyio socket, the answer read up to its
  Content-Length (no gate, no classification): the floor for Python on this loop.

Every client sends the same event bodies (a 600-byte webhook, its wire form encoded once)
with fresh ids, and every answer must be a 202 (checked). Rounds alternate the clients;
min/median/max of ``--rounds`` rounds, per backend (asyncio on uvloop, and trio).

Usage::

    .venv/bin/python benchmarks/client.py [--requests 3000] [--rounds 3]
        [--backends uvloop,trio]

Results: a table on stdout and ``benchmarks/results/client.json``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mfo_actors.actors._delivery import ClientSender  # noqa: E402
from mfo_actors.actors._lean_sender import lean_senders  # noqa: E402
from mfo_actors.actors.forwarder import encode_event  # noqa: E402
from mfo_actors.client import BaseClient, PolicyGate, RequestMetrics, StaticTokenAuth  # noqa: E402
from mfo_actors.ids import new_id  # noqa: E402
from mfo_actors.messages import Event  # noqa: E402
from mfo_actors.observability import configure_logging  # noqa: E402
from mfo_actors.runtime import SystemClock  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "client.json"
EMAIL, PASSWORD = "bench@example.com", "bench-pass"
PAYLOAD = json.dumps({"action": "opened", "repository": {"full_name": "acme/widgets", "id": 1},
                      "sender": {"login": "octocat", "id": 2}, "pad": "x" * 420}).encode()
CLIENTS = ("lean", "httpx", "raw")

Send = Callable[[Event, bytes], Awaitable[None]]


def event() -> Event:
    return Event(id=new_id(), source="github", type="push", received_at=time.time(),
                 headers={"x-github-event": "push"}, body=PAYLOAD, is_json=True,
                 content_type="application/json")


def start_mock() -> tuple[subprocess.Popen[bytes], str]:
    """The reference server on a free port (its first stdout line says which)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfo_actors", "mock-server", "--port", "0", "--email", EMAIL,
         "--password", PASSWORD, "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"mock-server did not start: {line!r}")
    return proc, line.removeprefix("listening on ").strip()


async def open_clients(url: str, token: str, stack: Any) -> dict[str, Send]:
    """The three clients, each over its own kept-alive connection."""
    clock = SystemClock()
    gate = PolicyGate(StaticTokenAuth(token))
    far = 1e9

    http = await stack.enter_async_context(httpx.AsyncClient(
        timeout=30.0, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        follow_redirects=False))
    base = BaseClient(url, http=http, gate=gate, metrics=RequestMetrics("bench"))
    httpx_sender = ClientSender(base, clock)
    lean_sender = await stack.enter_async_context(
        lean_senders(base, clock, timeout=30.0)())

    async def lean(ev: Event, body: bytes) -> None:
        sent = await lean_sender.send(ev, body, send_by=clock.monotonic() + far)
        if sent.kind != "delivered":
            raise SystemExit(f"lean: {sent!r}")

    async def via_httpx(ev: Event, body: bytes) -> None:
        sent = await httpx_sender.send(ev, body, send_by=clock.monotonic() + far)
        if sent.kind != "delivered":
            raise SystemExit(f"httpx: {sent!r}")

    host, _, port = url.removeprefix("http://").partition(":")
    head = (f"POST /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n").encode()
    buffer = bytearray()
    socks: list[anyio.abc.SocketStream] = []

    async def raw(ev: Event, body: bytes) -> None:
        if not socks:  # connected at first use: an idle new connection is closed after 10 s
            socks.append(await stack.enter_async_context(
                await anyio.connect_tcp(host, int(port))))
        sock = socks[0]
        await sock.send(b"%sIdempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            head, ev.id.encode(), len(body), body))
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer.extend(await sock.receive())
        start = buffer.find(b"content-length: ", 0, end) + 16
        total = end + 4 + int(buffer[start:buffer.index(b"\r\n", start)])
        while len(buffer) < total:
            buffer.extend(await sock.receive())
        if buffer[9:12] != b"202":
            raise SystemExit(f"raw: {bytes(buffer[:total])!r}")
        del buffer[:total]

    return {"lean": lean, "httpx": via_httpx, "raw": raw}


async def measure(send: Send, n: int) -> dict[str, float]:
    events = [event() for _ in range(n)]
    bodies = [encode_event(ev) for ev in events]
    for ev, body in zip(events[:50], bodies[:50], strict=True):  # warm the connection
        await send(ev, body)
    events, bodies = [event() for _ in range(n)], [encode_event(ev) for ev in events]
    wall, cpu = time.perf_counter(), time.process_time()
    for ev, body in zip(events, bodies, strict=True):
        await send(ev, body)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": cpu / n * 1e6, "req_s": n / wall}


async def run_backend(url: str, token: str, n: int, rounds: int, names: list[str]
                      ) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {c: [] for c in names}
    async with AsyncExitStack() as stack:
        clients = await open_clients(url, token, stack)
        for _ in range(rounds):
            for name in names:
                out[name].append(await measure(clients[name], n))
    return out


def login(url: str) -> str:
    answer = httpx.post(f"{url}/auth/login", json={"email": EMAIL, "password": PASSWORD})
    answer.raise_for_status()
    return str(answer.json()["token"])


def ratio(row: dict[str, Any], peer: dict[str, Any] | None, *, over: bool = False) -> str:
    """``row / peer`` (over) or ``peer / row`` of the median CPU, or blanks without a peer."""
    if peer is None:
        return " " * 7
    a, b = row["cpu_us_median"], peer["cpu_us_median"]
    return f"{(a / b if over else b / a):6.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="uvloop,trio")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="which clients (e.g. one alone, under a profiler)")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON")
    args = parser.parse_args()
    configure_logging(level="info", fmt="json", stream=sys.stderr)  # as the daemon runs
    names = [c for c in args.clients.split(",") if c]
    proc, url = start_mock()
    try:
        token = login(url)
        rows: list[dict[str, Any]] = []
        for backend in args.backends.split(","):
            name, options = (("asyncio", {"use_uvloop": True}) if backend == "uvloop"
                             else (backend, {}))
            results = anyio.run(run_backend, url, token, args.requests, args.rounds, names,
                                backend=name, backend_options=options)
            for client in names:
                cpu = sorted(r["cpu_us"] for r in results[client])
                rate = statistics.median(r["req_s"] for r in results[client])
                rows.append({"backend": backend, "client": client, "cpu_us_min": cpu[0],
                             "cpu_us_median": statistics.median(cpu), "cpu_us_max": cpu[-1],
                             "req_s_median": rate, "rounds": results[client]})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{'backend':8} {'client':6} {'CPU µs/req min / median / max':>32} "
          f"{'req/s':>8} {'/ raw':>6} {'httpx /':>8}")
    for row in rows:
        same = {r["client"]: r for r in rows if r["backend"] == row["backend"]}
        print(f"{row['backend']:8} {row['client']:6} "
              f"{row['cpu_us_min']:9.1f} / {row['cpu_us_median']:7.1f} / "
              f"{row['cpu_us_max']:7.1f}     {row['req_s_median']:8,.0f} "
              f"{ratio(row, same.get('raw'), over=True)} {ratio(row, same.get('httpx'))}")
    if args.no_write:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "requests": args.requests, "rounds": args.rounds,
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
