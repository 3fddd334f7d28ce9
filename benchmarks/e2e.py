"""End-to-end benchmark: webhook in -> durable store -> forwarder -> MFO server receipt.

Measures, with the real daemon (``python -m mfo_actors run``) and the reference MFO server
(``python -m mfo_actors mock-server``) as two subprocesses on this machine:

* **events/s**: events delivered to the upstream per second, from the first webhook sent to
  the last event received by the server;
* **latency p50/p99**, per event, from the moment the webhook POST starts to the moment the
  reference server records the event (its ``received_at``, wall clock, from
  ``GET /_mock/events``); also from the 202 answer (accepted, on disk) to receipt.

The load generator (this process, httpx on asyncio) posts ``--events`` webhooks over
``--connections`` keep-alive connections, spread round-robin over ``--sources`` routes
(``/hooks/s0`` ...) so that ``forwarder.ordering: source`` (one in flight per source) can
use its concurrency. It then polls ``GET /_mock/stats`` until every event arrived.
Results: a table on stdout and ``benchmarks/results/e2e.json``.

Usage::

    .venv/bin/python benchmarks/e2e.py [--events 5000] [--connections 16] [--sources 8]
                                       [--ordering source|none] [--concurrency 8]

Not a test: it is outside pytest's testpaths. Both clocks are this machine's wall clock, so
the latencies are comparable; they include the forwarder's idle wake-up (an append wakes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "e2e.json"
EMAIL = "bench@example.com"
PASSWORD = "bench-password"
START_DEADLINE = 30.0  # seconds for each subprocess to come up
DELIVERY_DEADLINE = 300.0  # seconds for every event to reach the server
PAYLOAD = json.dumps({
    "type": "order.created",
    "data": {
        "customer": {"id": "cus_42", "email": "someone@example.com"},
        "items": [{"sku": f"SKU-{i:04d}", "qty": i % 5 + 1, "price": 1999 + i} for i in range(12)],
        "note": "x" * 200,
    },
}).encode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, *, state_dir: Path, mock_port: int, listen_port: int,
                 admin_port: int, sources: int, ordering: str, concurrency: int) -> None:
    routes = "\n".join(
        f"    - {{path: /hooks/s{i}, source: s{i}}}" for i in range(sources))
    path.write_text(f"""\
instance: e2e-bench
state_dir: {state_dir}
client:
  base_url: http://127.0.0.1:{mock_port}
  timeout: 10s
  retry: {{max_attempts: 8, initial_backoff: 100ms, max_backoff: 5s}}
auth: {{mode: login, email: {EMAIL}, password: {PASSWORD}}}
webhook_listener:
  host: 127.0.0.1
  port: {listen_port}
  routes:
{routes}
admin: {{host: 127.0.0.1, port: {admin_port}}}
forwarder: {{concurrency: {concurrency}, ordering: {ordering}}}
flows: {{enabled: false}}
store: {{max_pending: 10000000, max_bytes: 100GiB}}
logging: {{level: warning, format: json}}
""")


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "mfo_actors", *args], cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ok(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes],
                  log: Path, what: str) -> None:
    """GET *url* until 2xx; fail with the subprocess's log if it dies or takes too long."""
    end = time.monotonic() + START_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if (await client.get(url, timeout=2)).is_success:
                return
        except httpx.TransportError:
            pass
        await anyio.sleep(0.05)
    raise SystemExit(f"{what} not ready after {START_DEADLINE}s ({url}):\n{tail(log)}")


def tail(log: Path) -> str:
    """The end of a subprocess's log, for an error message (we are exiting anyway)."""
    return log.read_bytes()[-3000:].decode("utf-8", "replace")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run_load(args: argparse.Namespace, listen_port: int, mock_url: str
                   ) -> dict[str, Any]:
    sent: dict[str, float] = {}
    accepted: dict[str, float] = {}
    limits = httpx.Limits(max_connections=args.connections,
                          max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        counter = iter(range(args.events))

        async def poster() -> None:
            for n in counter:
                url = f"http://127.0.0.1:{listen_port}/hooks/s{n % args.sources}"
                t0 = time.time()
                resp = await client.post(url, content=PAYLOAD,
                                         headers={"content-type": "application/json"})
                if resp.status_code != 202:
                    raise SystemExit(f"webhook answered {resp.status_code}: {resp.text[:200]}")
                event_id = resp.json()["id"]
                sent[event_id] = t0
                accepted[event_id] = time.time()

        first_send = time.time()
        async with anyio.create_task_group() as tg:
            for _ in range(args.connections):
                tg.start_soon(poster)
        ingest_done = time.time()

        end = time.monotonic() + DELIVERY_DEADLINE
        while True:
            stats = (await client.get(f"{mock_url}/_mock/stats")).json()
            if stats["unique_event_ids"] >= args.events:
                break
            if time.monotonic() > end:
                raise SystemExit(f"only {stats['unique_event_ids']} of {args.events} events "
                                 f"arrived after {DELIVERY_DEADLINE}s")
            await anyio.sleep(0.05)
        events = (await client.get(f"{mock_url}/_mock/events", timeout=60)).json()["events"]

    received = {e["id"]: float(e["received_at"]) for e in events if e["id"] in sent}
    missing = set(sent) - set(received)
    if missing:
        raise SystemExit(f"{len(missing)} accepted events never reached the server")
    e2e = [received[i] - sent[i] for i in sent]
    from_accept = [received[i] - accepted[i] for i in sent]
    last = max(received.values())
    return {
        "events": args.events,
        "ingest_per_s": round(args.events / (ingest_done - first_send), 1),
        "delivered_per_s": round(args.events / (last - first_send), 1),
        "latency_ms": {
            "p50": round(percentile(e2e, 0.50) * 1000, 1),
            "p99": round(percentile(e2e, 0.99) * 1000, 1),
            "mean": round(statistics.fmean(e2e) * 1000, 1),
        },
        "accepted_to_delivered_ms": {
            "p50": round(percentile(from_accept, 0.50) * 1000, 1),
            "p99": round(percentile(from_accept, 0.99) * 1000, 1),
        },
        "server_duplicates": stats.get("duplicates", 0),
    }


async def main_async(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    mock_port, listen_port, admin_port = free_port(), free_port(), free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    cfg = workdir / "e2e.yaml"
    write_config(cfg, state_dir=workdir / "state", mock_port=mock_port,
                 listen_port=listen_port, admin_port=admin_port, sources=args.sources,
                 ordering=args.ordering, concurrency=args.concurrency)
    mock_log, daemon_log = workdir / "mock.log", workdir / "daemon.log"
    mock = start(["mock-server", "--port", str(mock_port), "--email", EMAIL,
                  "--password", PASSWORD, "--log-level", "warning"], mock_log)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        async with httpx.AsyncClient() as probe:
            await wait_ok(probe, f"{mock_url}/_mock/stats", mock, mock_log, "mock-server")
            daemon = start(["run", "--config", str(cfg)], daemon_log)
            await wait_ok(probe, f"http://127.0.0.1:{admin_port}/readyz", daemon, daemon_log,
                          "daemon")
        return await run_load(args, listen_port, mock_url)
    finally:
        if daemon is not None:
            stop(daemon)
        stop(mock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16,
                        help="concurrent webhook senders (keep-alive connections)")
    parser.add_argument("--sources", type=int, default=8, help="routes/sources to spread over")
    parser.add_argument("--ordering", choices=["source", "none"], default="source")
    parser.add_argument("--concurrency", type=int, default=8, help="forwarder.concurrency")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, store)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mfo-e2e-"))
    result = anyio.run(main_async, args, workdir)
    result["settings"] = {k: getattr(args, k) for k in
                          ("events", "connections", "sources", "ordering", "concurrency")}
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "cpus": os.cpu_count()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    lat, acc = result["latency_ms"], result["accepted_to_delivered_ms"]
    print(f"{'events':>8} {'ingest/s':>9} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'acc->del p50':>13} {'acc->del p99':>13}")
    print(f"{result['events']:>8} {result['ingest_per_s']:>9} {result['delivered_per_s']:>12} "
          f"{lat['p50']:>8} {lat['p99']:>8} {acc['p50']:>13} {acc['p99']:>13}")
    print(f"settings: {result['settings']}; results in {RESULTS.relative_to(ROOT)}")
    if not args.keep:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work dir kept: {workdir}")


if __name__ == "__main__":
    main()
