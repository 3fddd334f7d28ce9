"""End-to-end benchmark: webhook in -> durable store -> forwarder -> MFO server receipt.

Runs the real daemon (``python -m mfo_actors run``) and the reference MFO server
(``python -m mfo_actors mock-server``) as subprocesses on this machine and drives the webhook
listener at full speed from a separate load generator: ``wrk -t1 -c<connections>`` with a Lua
script whose ``request()`` spreads the POSTs round-robin over ``--sources`` routes
(``/hooks/s0`` ...), so that ``forwarder.ordering: source`` (one in flight per source) can use
its concurrency. Without ``wrk`` (``apt-get install wrk``) a Python raw-socket generator in
``--python-procs`` separate processes stands in; the report says which one ran.

It sends a fixed number of events (``--events``; the Lua script stops wrk once every POST is
answered) or runs for a fixed time (``--duration``), then waits until the reference server
holds every event the daemon accepted (``mfo_events_received_total`` from ``/metrics``).
Reported per row:

* **ingest/s**: webhooks answered 202 per second, as the load generator saw them;
* **delivered/s**: unique events received by the reference server / (its last receipt - the
  daemon's first accept);
* **accept->delivered p50/p99**: per event, the server's ``received_at`` (``GET
  /_mock/events``, Unix seconds) minus the forwarded body's ``received_at`` (RFC 3339 UTC, when
  the daemon accepted the webhook). Both are this machine's wall clock; no client timestamps.

By default it runs ``--ordering source`` and ``--ordering none`` (one row each), each with a
fresh state dir and a fresh reference server. Results: a table on stdout and
``benchmarks/results/e2e.json`` (settings, machine, rows).

Usage::

    .venv/bin/python benchmarks/e2e.py [--events 10000 | --duration 10] [--connections 16]
        [--sources 8] [--ordering both|source|none] [--concurrency 8]
        [--loadgen auto|wrk|python] [--keep]

Not a test: it is outside pytest's testpaths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "e2e.json"
EMAIL = "bench@example.com"
PASSWORD = "bench-password"
START_DEADLINE = 30.0  # seconds for each subprocess to come up
DELIVERY_DEADLINE = 300.0  # seconds, after the load stops, for every event to reach the server
PAYLOAD = json.dumps({
    "type": "order.created",
    "data": {
        "customer": {"id": "cus_42", "email": "someone@example.com"},
        "items": [{"sku": f"SKU-{i:04d}", "qty": i % 5 + 1, "price": 1999 + i} for i in range(12)],
        "note": "x" * 200,
    },
}).encode()

# --------------------------------------------------------------------------------------------
# Load generators

# Fill-ins: %(events)d (0 = no limit, the -d duration ends the run), %(sources)d, %(body)s.
# After the last POST is sent, the free connections send a slow trickle of GETs to an unknown
# path (404 from the listener's head check, no event) until every POST has its answer; then
# the thread stops. `done` (main Lua state) sums the thread's counters.
WRK_SCRIPT = """
local N, S = %(events)d, %(sources)d
local posts, idle = {}, nil
sent, answered, accepted, refused = 0, 0, 0, 0
local threads = {}

function setup(thread) table.insert(threads, thread) end

function init(args)  -- wrk.host is known from here on (wrk.format adds the Host header)
  for i = 0, S - 1 do
    posts[i] = wrk.format("POST", "/hooks/s" .. i, {["Content-Type"] = "application/json"},
                          [==[%(body)s]==])
  end
  idle = wrk.format("GET", "/_e2e_idle", {})
end

local checked = false
function request()
  if not checked then  -- wrk calls request() once before the run to check it: not sent
    checked = true
    return posts[0]
  end
  if N == 0 or sent < N then
    local r = posts[sent %% S]
    sent = sent + 1
    return r
  end
  return idle
end

function delay()
  if N ~= 0 and sent >= N then return 20 end
  return 0
end

function response(status, headers, body)
  if status == 404 then return end
  answered = answered + 1
  if status == 202 then accepted = accepted + 1 else refused = refused + 1 end
  if N ~= 0 and answered == N then
    -- wrk's main thread sleeps for -d regardless: tell the parent, which sends SIGINT.
    io.write("E2E_ALL_ANSWERED\\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local s, a, r = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); a = a + t:get("accepted"); r = r + t:get("refused")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"sent":%%d,"accepted":%%d,"refused":%%d,"duration_us":%%d,"p50_us":%%d,' ..
    '"p99_us":%%d,"socket_errors":%%d}\\n', s, a, r, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout))
end
"""


def run_wrk(port: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """wrk at full speed; its -d is the run time (duration mode) or a safety cap."""
    script = workdir / "e2e.lua"
    script.write_text(WRK_SCRIPT % {"events": 0 if args.duration else args.events,
                                    "sources": args.sources, "body": PAYLOAD.decode()})
    cap = args.duration or max(60, args.events // 50)
    with subprocess.Popen(
        ["wrk", "-t1", f"-c{args.connections}", f"-d{max(1, round(cap))}s", "--timeout", "30s",
         "-s", str(script), f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, text=True,
    ) as wrk:
        assert wrk.stdout is not None
        lines = []
        for text in wrk.stdout:
            lines.append(text)
            if text.strip() == "E2E_ALL_ANSWERED":
                wrk.send_signal(signal.SIGINT)  # ends its sleep; it then reports and exits
    if wrk.returncode != 0:
        raise SystemExit(f"wrk exited with {wrk.returncode}:\n{''.join(lines)}")
    out = "".join(lines)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no RESULT line:\n{out}")
    raw = json.loads(line[len("RESULT "):])
    seconds = raw["duration_us"] / 1e6
    return {"sent": raw["sent"], "accepted": raw["accepted"], "refused": raw["refused"],
            "socket_errors": raw["socket_errors"], "seconds": seconds,
            "ingest_per_s": raw["accepted"] / seconds,
            "client_p50_ms": raw["p50_us"] / 1000, "client_p99_ms": raw["p99_us"] / 1000}


def _python_child(port: int, sources: int, connections: int, indices: range,
                  duration: float) -> dict[str, Any]:
    """One load process: raw keep-alive sockets on asyncio, POSTing event numbers *indices*
    (or for *duration* seconds when it is > 0)."""
    requests = [b"POST /hooks/s%d HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (i, len(PAYLOAD), PAYLOAD)
                for i in range(sources)]
    todo = iter(indices) if not duration else iter(range(indices.start, sys.maxsize,
                                                         indices.step))
    counts = {"sent": 0, "accepted": 0, "refused": 0}

    async def client(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in todo:
                if duration and time.monotonic() >= deadline:
                    break
                writer.write(requests[n % sources])
                counts["sent"] += 1
                head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                await reader.readexactly(int(match.group(1)) if match else 0)
                counts["accepted" if head[9:12] == b"202" else "refused"] += 1
        finally:
            writer.close()

    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(client(start + duration) for _ in range(connections)))
        return time.monotonic() - start

    seconds = asyncio.run(main())
    return {**counts, "seconds": seconds}


def run_python(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """``--python-procs`` child processes, the connections and event numbers split evenly."""
    procs = max(1, min(args.python_procs, args.connections))
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--loadgen-child", json.dumps({
                "port": port, "sources": args.sources,
                "connections": args.connections // procs + (k < args.connections % procs),
                "start": k, "stop": args.events, "step": procs,
                "duration": args.duration or 0.0})],
            stdout=subprocess.PIPE, text=True)
        for k in range(procs)]
    parts = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"python load generator failed ({child.returncode})")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(p["seconds"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    return {"sent": sum(p["sent"] for p in parts), "accepted": accepted,
            "refused": sum(p["refused"] for p in parts), "socket_errors": 0,
            "seconds": seconds, "ingest_per_s": accepted / seconds}


# --------------------------------------------------------------------------------------------
# Subprocesses


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
    with log.open("wb") as out:
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


def tail(log: Path) -> str:
    """The end of a subprocess's log, for an error message (we are exiting anyway)."""
    return log.read_bytes()[-3000:].decode("utf-8", "replace")


def wait_ok(client: httpx.Client, url: str, proc: subprocess.Popen[bytes], log: Path,
            what: str) -> None:
    """GET *url* until 2xx; fail with the subprocess's log if it dies or takes too long."""
    end = time.monotonic() + START_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if client.get(url, timeout=2).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a subprocess's start-up, not a test
    raise SystemExit(f"{what} not ready after {START_DEADLINE}s ({url}):\n{tail(log)}")


def received_total(client: httpx.Client, admin_url: str) -> int:
    """Sum of ``mfo_events_received_total`` over sources: every event the daemon stored."""
    text = client.get(f"{admin_url}/metrics", timeout=10).text
    return round(sum(float(m) for m in re.findall(
        r"^mfo_events_received_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))


# --------------------------------------------------------------------------------------------
# One row


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_row(args: argparse.Namespace, ordering: str, loadgen: str, workdir: Path
            ) -> dict[str, Any]:
    mock_port, listen_port, admin_port = free_port(), free_port(), free_port()
    mock_url, admin_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{admin_port}"
    cfg = workdir / "e2e.yaml"
    write_config(cfg, state_dir=workdir / "state", mock_port=mock_port,
                 listen_port=listen_port, admin_port=admin_port, sources=args.sources,
                 ordering=ordering, concurrency=args.concurrency)
    mock_log, daemon_log = workdir / "mock.log", workdir / "daemon.log"
    mock = start(["mock-server", "--port", str(mock_port), "--email", EMAIL,
                  "--password", PASSWORD, "--log-level", "warning"], mock_log)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        with httpx.Client() as client:
            wait_ok(client, f"{mock_url}/_mock/stats", mock, mock_log, "mock-server")
            client.post(f"{mock_url}/_mock/reset").raise_for_status()
            daemon = start(["run", "--config", str(cfg)], daemon_log)
            wait_ok(client, f"{admin_url}/readyz", daemon, daemon_log, "daemon")

            load = (run_wrk(listen_port, args, workdir) if loadgen == "wrk"
                    else run_python(listen_port, args))
            if load["accepted"] == 0:
                raise SystemExit(f"no webhook was accepted: {load}\n{tail(daemon_log)}")

            # Wait for every stored event (a POST cut off when the load stopped may still
            # have been stored, so the daemon's counter, not the client's, says how many).
            end = time.monotonic() + DELIVERY_DEADLINE
            while True:
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited with {daemon.returncode}:\n"
                                     f"{tail(daemon_log)}")
                stored = received_total(client, admin_url)
                stats = client.get(f"{mock_url}/_mock/stats").json()
                if stats["unique_event_ids"] >= max(stored, load["accepted"]):
                    if received_total(client, admin_url) == stored:
                        break
                elif time.monotonic() > end:
                    raise SystemExit(
                        f"only {stats['unique_event_ids']} of {stored} stored events reached "
                        f"the server {DELIVERY_DEADLINE}s after the load stopped\n"
                        f"{tail(daemon_log)}")
                time.sleep(0.1)  # polling another process's progress
            events = client.get(f"{mock_url}/_mock/events", timeout=120).json()["events"]
    finally:
        if daemon is not None:
            stop(daemon)
        stop(mock)

    accepted_at = [datetime.fromisoformat(e["body"]["received_at"]).timestamp()
                   for e in events]
    delivered_at = [float(e["received_at"]) for e in events]
    latency = [d - a for a, d in zip(accepted_at, delivered_at, strict=True)]
    first, last = min(accepted_at), max(delivered_at)
    return {
        "ordering": ordering,
        "events_stored": stored,
        "events_delivered": len(events),
        "server_duplicates": stats.get("duplicates", 0),
        "ingest_per_s": round(load["ingest_per_s"], 1),
        # Cross-check from the daemon's own accept stamps (first to last accept).
        "ingest_per_s_daemon": round(len(events) / max(1e-9, max(accepted_at) - first), 1),
        "delivered_per_s": round(len(events) / (last - first), 1),
        "delivery_span_s": round(last - first, 3),
        "accept_to_delivered_ms": {
            "p50": round(percentile(latency, 0.50) * 1000, 1),
            "p99": round(percentile(latency, 0.99) * 1000, 1),
            "max": round(max(latency) * 1000, 1),
            "mean": round(statistics.fmean(latency) * 1000, 1),
        },
        "loadgen": {k: round(v, 3) if isinstance(v, float) else v for k, v in load.items()},
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000, help="webhooks to send")
    parser.add_argument("--duration", type=float, default=None,
                        help="send for this many seconds instead of --events")
    parser.add_argument("--connections", type=int, default=16,
                        help="concurrent keep-alive connections of the load generator")
    parser.add_argument("--sources", type=int, default=8, help="routes/sources to spread over")
    parser.add_argument("--ordering", choices=["both", "source", "none"], default="both")
    parser.add_argument("--concurrency", type=int, default=8, help="forwarder.concurrency")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--python-procs", type=int, default=2,
                        help="processes of the python load generator (without wrk)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work dirs (logs, store)")
    parser.add_argument("--loadgen-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.loadgen_child:
        c = json.loads(args.loadgen_child)
        print(json.dumps(_python_child(c["port"], c["sources"], c["connections"],
                                       range(c["start"], c["stop"], c["step"]),
                                       c["duration"])))
        return

    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    loadgen_desc = (f"wrk -t1 -c{args.connections} (Lua request() round-robin over routes)"
                    if loadgen == "wrk" else
                    f"python asyncio raw sockets, {args.python_procs} processes")
    orderings = ["source", "none"] if args.ordering == "both" else [args.ordering]
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "loadgen": loadgen_desc,
        "settings": {"events": None if args.duration else args.events,
                     "duration_s": args.duration, "connections": args.connections,
                     "sources": args.sources, "concurrency": args.concurrency,
                     "payload_bytes": len(PAYLOAD)},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "rows": [],
    }
    for ordering in orderings:
        workdir = Path(tempfile.mkdtemp(prefix=f"mfo-e2e-{ordering}-"))
        try:
            row = run_row(args, ordering, loadgen, workdir)
        finally:
            if args.keep:
                print(f"work dir kept: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        result["rows"].append(row)
        print(f"ordering={ordering}: {row['events_delivered']} delivered, "
              f"{row['delivered_per_s']}/s", flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    print(f"\nload generator: {loadgen_desc}; "
          + (f"{args.duration:g}s" if args.duration else f"{args.events} events")
          + f"; {s['sources']} sources; forwarder.concurrency {s['concurrency']}; "
          f"{os.cpu_count()} CPUs; load average before: {result['machine']['loadavg_before']}")
    print("| ordering | delivered | ingest/s | delivered/s | accept->delivered p50 ms "
          "| p99 ms | server dups | refused/errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        lat, lg = r["accept_to_delivered_ms"], r["loadgen"]
        print(f"| {r['ordering']} | {r['events_delivered']} | {r['ingest_per_s']:.0f} "
              f"| {r['delivered_per_s']:.0f} | {lat['p50']} | {lat['p99']} "
              f"| {r['server_duplicates']} | {lg['refused']}/{lg['socket_errors']} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
