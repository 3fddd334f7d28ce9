"""Ingest benchmark: accepted webhooks/s, p50/p99 latency and CPU per request, fsync'd.

Measures, in one run and on one machine:

* **ours**: the listener actor (httptools on anyio) with the SQLite store (WAL,
  ``synchronous=FULL``, group commit), in a subprocess, as the daemon runs them: on
  asyncio + uvloop (the daemon's default, ``ours_uvloop``) and on trio (``ours_trio``), each on
  an unsigned route (``/webhook``) and a signed one (``_signed``: GitHub's HMAC-SHA256 over
  the body, checked on every request);
* **peer**: what a user would write by hand: a Starlette app on uvicorn
  (``uvicorn[standard]``: httptools + uvloop) whose endpoint parses the JSON body and does one
  ``INSERT`` + ``COMMIT`` per request on SQLite with WAL and ``synchronous=FULL`` (one
  connection per worker thread, in Starlette's thread pool); and **fastapi**, the same
  endpoint as a FastAPI sync route, for reference.

All answer 202 only after the commit. The load generator runs in its own process: ``wrk``
(C, one thread, a Lua script for the POST) when it is installed, else a Python raw-socket
generator (asyncio, one process); the report says which. Each level (1, 16, 64 concurrent
keep-alive connections) runs for ``--duration`` seconds after a short warm-up, POSTing the
same ~1 KiB JSON document. Every server runs during the whole benchmark (each idle while the
others are measured); each cell runs ``--rounds`` times (alternating the order of the
servers), and the report gives min / median / max of the rounds. CPU per request is the
server process's user + system time over the run (``/proc/PID/stat``) divided by the
requests answered. At the end it checks that every accepted request is a row on disk.
Results: a table on stdout and ``benchmarks/results/ingest.json`` (every round).

Usage (``apt-get install wrk`` for the C load generator; ``pip install -e '.[bench]'``)::

    .venv/bin/python benchmarks/ingest.py [--duration 5] [--rounds 3] [--connections 1,16,64]
                                          [--loadgen auto|wrk|python] [--only KIND,KIND]

Not a test: it is outside pytest's testpaths and takes about eight minutes with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"
WARMUP_S = 2.0
PAYLOAD = json.dumps({
    "type": "order.created",
    "id": "evt_0001",
    "created": 1_700_000_000,
    "data": {
        "customer": {"id": "cus_42", "email": "someone@example.com", "name": "A. Customer"},
        "items": [{"sku": f"SKU-{i:04d}", "qty": i % 5 + 1, "price": 1999 + i} for i in range(12)],
        "note": "x" * 200,
    },
}).encode()

# --------------------------------------------------------------------------------------------
# Servers (each runs in its own subprocess: `ingest.py --serve ours|peer ...`)


SECRET = "bench-signing-secret-0123456789"  # GitHub scheme: an HMAC over the body alone


def serve_ours(state_dir: Path, port_file: Path) -> None:
    import anyio

    from mfo_actors.actors.listener import ListenerActor
    from mfo_actors.config import load_config_text
    from mfo_actors.observability import configure_logging
    from mfo_actors.runtime import ReadySignal
    from mfo_actors.store import open_store

    configure_logging(level="warning", fmt="json")
    cfg = load_config_text(f"""
instance: bench
state_dir: {state_dir}
webhook_listener:
  host: 127.0.0.1
  port: 0
  routes:
    - {{path: /webhook, source: plain}}
    - {{path: /signed, source: signed, verify: {{scheme: github, secret: "{SECRET}"}}}}
store: {{max_pending: 100000000, max_bytes: 1000GiB}}
""")

    async def main() -> None:
        async with open_store(cfg) as store:
            actor = ListenerActor(cfg, store)
            ready = ReadySignal()
            async with anyio.create_task_group() as tg:
                tg.start_soon(actor.run, ready)
                await ready.wait()
                await anyio.Path(port_file).write_text(str(actor.port))
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        actor.request_stop()
                        break

    loop = os.environ.get("INGEST_OURS_LOOP", "uvloop")
    if loop == "trio":
        anyio.run(main, backend="trio")
        return
    options: dict[str, Any] = {}
    if loop == "uvloop":
        import uvloop  # noqa: F401  (fails loudly when asked for and missing)

        options = {"use_uvloop": True}
    anyio.run(main, backend="asyncio", backend_options=options)


def _peer_db(state_dir: Path) -> Any:
    """The peers' storage: one SQLite connection per thread, WAL, synchronous=FULL."""
    db_path = state_dir / "peer.sqlite3"
    setup = sqlite3.connect(db_path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, received_at REAL,"
                  " payload TEXT)")
    setup.commit()
    setup.close()
    local = threading.local()

    def insert(event_id: str, payload: Any) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(db_path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            local.conn = conn
        conn.execute("INSERT INTO events VALUES (?, ?, ?)",
                     (event_id, time.time(), json.dumps(payload)))
        conn.commit()

    return insert


def serve_peer(state_dir: Path, port_file: Path) -> None:
    """Starlette, the toolkit under FastAPI, written the way its docs show."""
    import uuid

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    insert = _peer_db(state_dir)

    async def webhook(request: Request) -> JSONResponse:
        payload = await request.json()
        event_id = str(uuid.uuid4())
        await run_in_threadpool(insert, event_id, payload)
        return JSONResponse({"id": event_id}, status_code=202)

    _run_uvicorn(Starlette(routes=[Route("/webhook", webhook, methods=["POST"])]), port_file)


def serve_fastapi(state_dir: Path, port_file: Path) -> None:
    import uuid

    from fastapi import Body, FastAPI

    insert = _peer_db(state_dir)
    app = FastAPI()

    @app.post("/webhook", status_code=202)
    def webhook(payload: dict[str, Any] = Body(...)) -> dict[str, str]:
        event_id = str(uuid.uuid4())
        insert(event_id, payload)
        return {"id": event_id}

    _run_uvicorn(app, port_file)


def _run_uvicorn(app: Any, port_file: Path) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port_file.write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------------------------
# Load generators

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Hub-Signature-256"] = "%s"
wrk.body = [==[%s]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d,' ..
    '"err_connect":%%d,"err_read":%%d,"err_write":%%d,"err_status":%%d,"err_timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(port: int, path: str, connections: int, duration: float, script: Path
            ) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}{path}"],
        check=True, capture_output=True, text=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    raw = json.loads(line[len("RESULT "):])
    errors = sum(v for k, v in raw.items() if k.startswith("err_"))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"], "errors": errors,
        "accepted_per_s": (raw["requests"] - raw["err_status"]) / seconds, "seconds": seconds,
        "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }


def _python_loadgen(port: int, path: str, connections: int, duration: float
                    ) -> dict[str, Any]:
    """Raw-socket keep-alive clients on asyncio; runs in its own process (see run_python)."""
    request = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n"
               b"Content-Type: application/json\r\nX-Hub-Signature-256: "
               + _signature().encode() + b"\r\nContent-Length: "
               + str(len(PAYLOAD)).encode() + b"\r\n\r\n" + PAYLOAD)
    latencies: list[float] = []
    counts = {"ok": 0, "bad": 0}

    async def client(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                counts["ok" if head[9:10] == b"2" else "bad"] += 1
        finally:
            writer.close()

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(start + duration) for _ in range(connections)))
        return time.perf_counter() - start

    seconds = asyncio.run(main())
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {"requests": counts["ok"] + counts["bad"], "errors": counts["bad"],
            "accepted_per_s": counts["ok"] / seconds, "seconds": seconds,
            "p50_ms": pct(50), "p99_ms": pct(99),
            "max_ms": latencies[-1] * 1000}


def run_python(port: int, path: str, connections: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen-child", str(port), path, str(connections),
         str(duration)],
        check=True, capture_output=True, text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------------
# Orchestration

# Cell kind -> (server, path). Our two routes on one server per loop.
KINDS: dict[str, tuple[str, str]] = {
    "ours_uvloop": ("ours_uvloop", "/webhook"),
    "ours_uvloop_signed": ("ours_uvloop", "/signed"),
    "ours_trio": ("ours_trio", "/webhook"),
    "ours_trio_signed": ("ours_trio", "/signed"),
    "peer": ("peer", "/webhook"),
    "fastapi": ("fastapi", "/webhook"),
}
RATIO_PEER = "peer"


def _signature() -> str:
    import hashlib
    import hmac

    return "sha256=" + hmac.new(SECRET.encode(), PAYLOAD, hashlib.sha256).hexdigest()


def start_server(server: str, state_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = state_dir / "port"
    serve, _, loop = server.partition("_")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", serve, "--state-dir", str(state_dir),
         "--port-file", str(port_file)], cwd=ROOT,
        env={**os.environ, "INGEST_OURS_LOOP": loop or "uvloop"},
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{server} server did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max of the rounds' rates; latency and CPU of the median round."""
    ordered = sorted(rounds, key=lambda r: r["accepted_per_s"])
    median = ordered[len(ordered) // 2]
    return {"min": ordered[0]["accepted_per_s"], "median": median["accepted_per_s"],
            "max": ordered[-1]["accepted_per_s"], "p50_ms": median["p50_ms"],
            "p99_ms": median["p99_ms"], "cpu_us": median.get("cpu_us_per_request")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell (min/median/max)")
    parser.add_argument("--only", default=None, help="comma-separated kinds: " + ", ".join(KINDS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=["ours", "peer", "fastapi"], help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loadgen-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve = {"ours": serve_ours, "peer": serve_peer, "fastapi": serve_fastapi}[args.serve]
        serve(args.state_dir, args.port_file)
        return
    if args.loadgen_child:
        port, path, conns, duration = args.loadgen_child
        print(json.dumps(_python_loadgen(int(port), path, int(conns), float(duration))))
        return

    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    levels = [int(x) for x in args.connections.split(",")]
    kinds = args.only.split(",") if args.only else list(KINDS)
    servers_needed = sorted({KINDS[k][0] for k in kinds})
    results: dict[str, Any] = {
        "benchmark": "ingest",
        "loadgen": "wrk -t1 (Lua POST script)" if loadgen == "wrk"
        else "python asyncio raw sockets (separate process)",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "payload_bytes": len(PAYLOAD),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT % (_signature(), PAYLOAD.decode()))
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        warmups: dict[str, int] = {}
        try:
            for server in servers_needed:
                state_dir = Path(tmp) / server
                state_dir.mkdir()
                servers[server] = start_server(server, state_dir)

            def run(kind: str, conns: int, seconds: float) -> dict[str, Any]:
                server, path = KINDS[kind]
                proc, port = servers[server]
                cpu = cpu_seconds(proc.pid)
                if loadgen == "wrk":
                    res = run_wrk(port, path, conns, seconds, script)
                else:
                    res = run_python(port, path, conns, seconds)
                used = cpu_seconds(proc.pid) - cpu
                res["cpu_us_per_request"] = round(used / max(res["requests"], 1) * 1e6, 1)
                return res

            for kind in kinds:  # warm-up: caches, WAL growth, lazy imports
                res = run(kind, min(levels[-1], 16), WARMUP_S)
                server = KINDS[kind][0]
                warmups[server] = warmups.get(server, 0) + round(
                    res["accepted_per_s"] * res["seconds"])
            for conns in levels:
                for round_no in range(args.rounds):
                    # Alternate the order so no side always runs right after the same other.
                    order = kinds if round_no % 2 == 0 else kinds[::-1]
                    for kind in order:
                        res = run(kind, conns, args.duration)
                        print(f"{kind:18} c={conns:3} round {round_no + 1}: "
                              f"{res['accepted_per_s']:9.0f}/s  p50 {res['p50_ms']:7.2f} ms  "
                              f"p99 {res['p99_ms']:7.2f} ms  cpu {res['cpu_us_per_request']:6.1f}"
                              f" us/req  errors {res['errors']}", flush=True)
                        rounds = results["runs"].setdefault(kind, {}).setdefault(str(conns), [])
                        rounds.append(res)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        # Every accepted request must be a row on disk (rows >= accepted: wrk stops with
        # requests in flight that may still commit). Warm-up requests count too.
        for server in servers:
            db = Path(tmp) / server / ("store.sqlite3" if server.startswith("ours")
                                       else "peer.sqlite3")
            with sqlite3.connect(db) as conn:
                (rows,) = conn.execute("SELECT count(*) FROM events").fetchone()
            accepted = warmups.get(server, 0) + sum(
                round(r["accepted_per_s"] * r["seconds"])
                for kind, by_level in results["runs"].items() if KINDS[kind][0] == server
                for rs in by_level.values() for r in rs)
            results.setdefault("stored_rows", {})[server] = {"rows": rows, "accepted": accepted}
            status = "ok" if rows >= accepted else "MISSING ROWS"
            print(f"{server}: {rows} rows stored, {accepted} accepted: {status}")
    results["summary"] = {
        kind: {c: summarise(rs) for c, rs in by_level.items()}
        for kind, by_level in results["runs"].items()
    }

    print()
    print(f"load generator: {results['loadgen']}; {args.duration:g}s per run, {args.rounds} "
          f"rounds; {len(PAYLOAD)} B JSON; {os.cpu_count()} CPUs; "
          f"load average before: {results['loadavg_before']}")
    summary = results["summary"]
    print("| kind | conns | accepted/s min / median / max | p50 ms | p99 ms | CPU µs/req "
          "| median / peer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for conns in levels:
        peer = summary.get(RATIO_PEER, {}).get(str(conns))
        for kind in kinds:
            r = summary[kind][str(conns)]
            ratio = "" if peer is None else f"{r['median'] / max(peer['median'], 1e-9):.1f}x"
            if peer is not None:
                results.setdefault("ratio", {}).setdefault(kind, {})[str(conns)] = round(
                    r["median"] / max(peer["median"], 1e-9), 2)
            print(f"| {kind} | {conns} | {r['min']:,.0f} / {r['median']:,.0f} / "
                  f"{r['max']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['cpu_us'] or 0:.0f} | {ratio} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
