"""Ingest benchmark: accepted webhooks/s and p50/p99 latency with fsync'd durability.

Measures, in one run and on one machine:

* **ours**: the listener actor (h11 on anyio, asyncio backend) with the SQLite store
  (WAL, ``synchronous=FULL``, group commit), in a subprocess, as the daemon runs them; and,
  when uvloop is installed, **ours_uvloop**: the same on uvloop (as the peer runs);
* **peer**: what a user would write by hand: a FastAPI app on uvicorn (``uvicorn[standard]``:
  httptools + uvloop when installed) whose sync endpoint parses the JSON body and does one
  ``INSERT`` + ``COMMIT`` per request on SQLite with WAL and ``synchronous=FULL`` (one
  connection per worker thread), also in a subprocess.

Both answer 202 only after the commit. The load generator runs in its own process: ``wrk``
(C, one thread, a Lua script for the POST) when it is installed, else a Python raw-socket
generator (asyncio, one process); the report says which. Each level (1, 16, 64 concurrent
keep-alive connections) runs for ``--duration`` seconds after a short warm-up, POSTing the
same ~1 KiB JSON document. Both servers run during the whole benchmark (each idle while the
other is measured); each cell runs ``--rounds`` times, alternating which side goes first, and
the best round counts (on a shared machine, other load only ever slows a run down). At the
end it checks that every accepted request is a row on disk. Results: a table on stdout and
``benchmarks/results/ingest.json`` (every round, the best, the ratio, the row check).

Usage (``apt-get install wrk`` for the C load generator; ``pip install -e '.[bench]'``)::

    .venv/bin/python benchmarks/ingest.py [--duration 10] [--rounds 2] [--connections 1,16,64]
                                          [--loadgen auto|wrk|python] [--no-uvloop]

Not a test: it is outside pytest's testpaths and takes about four minutes with the defaults.
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
webhook_listener: {{host: 127.0.0.1, port: 0, path: /webhook}}
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

    options: dict[str, Any] = {}
    if os.environ.get("INGEST_OURS_LOOP", "asyncio") == "uvloop":
        import uvloop  # noqa: F401  (fails loudly when asked for and missing)

        options = {"use_uvloop": True}
    anyio.run(main, backend="asyncio", backend_options=options)


def serve_peer(state_dir: Path, port_file: Path) -> None:
    import uuid

    import uvicorn
    from fastapi import Body, FastAPI

    db_path = state_dir / "peer.sqlite3"
    setup = sqlite3.connect(db_path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, received_at REAL,"
                  " payload TEXT)")
    setup.commit()
    setup.close()
    local = threading.local()

    def db() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(db_path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            local.conn = conn
        return conn

    app = FastAPI()

    @app.post("/webhook", status_code=202)
    def webhook(payload: dict[str, Any] = Body(...)) -> dict[str, str]:
        event_id = str(uuid.uuid4())
        conn = db()
        conn.execute("INSERT INTO events VALUES (?, ?, ?)",
                     (event_id, time.time(), json.dumps(payload)))
        conn.commit()
        return {"id": event_id}

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


def run_wrk(port: int, connections: int, duration: float, script: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}/webhook"],
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


def _python_loadgen(port: int, connections: int, duration: float) -> dict[str, Any]:
    """Raw-socket keep-alive clients on asyncio; runs in its own process (see run_python)."""
    request = (b"POST /webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(PAYLOAD)).encode() + b"\r\n\r\n" + PAYLOAD)
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


def run_python(port: int, connections: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen-child", str(port), str(connections), str(duration)],
        check=True, capture_output=True, text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------------
# Orchestration


def start_server(kind: str, state_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = state_dir / "port"
    serve, _, loop = kind.partition("_")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", serve, "--state-dir", str(state_dir),
         "--port-file", str(port_file)], cwd=ROOT,
        env={**os.environ, "INGEST_OURS_LOOP": loop or "asyncio"},
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{kind} server did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="skip ours_uvloop (our listener on uvloop)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per cell; the best counts")
    parser.add_argument("--only", choices=["ours", "ours_uvloop", "peer"], default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loadgen-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        (serve_ours if args.serve == "ours" else serve_peer)(args.state_dir, args.port_file)
        return
    if args.loadgen_child:
        port, conns, duration = args.loadgen_child
        print(json.dumps(_python_loadgen(int(port), int(conns), float(duration))))
        return

    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    levels = [int(x) for x in args.connections.split(",")]
    try:
        import uvloop  # noqa: F401

        has_uvloop = not args.no_uvloop
    except ImportError:
        has_uvloop = False
    kinds = [args.only] if args.only else [
        "ours", *(["ours_uvloop"] if has_uvloop else []), "peer"]
    results: dict[str, Any] = {
        "benchmark": "ingest",
        "loadgen": "wrk -t1 (Lua POST script)" if loadgen == "wrk"
        else "python asyncio raw sockets (separate process)",
        "duration_s": args.duration,
        "payload_bytes": len(PAYLOAD),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT % PAYLOAD.decode())
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for kind in kinds:
                state_dir = Path(tmp) / kind
                state_dir.mkdir()
                servers[kind] = start_server(kind, state_dir)

            def run(kind: str, conns: int, seconds: float) -> dict[str, Any]:
                port = servers[kind][1]
                if loadgen == "wrk":
                    return run_wrk(port, conns, seconds, script)
                return run_python(port, conns, seconds)

            warmups: dict[str, int] = {}
            for kind in kinds:  # warm-up: caches, WAL growth, lazy imports
                res = run(kind, min(levels[-1], 16), WARMUP_S)
                warmups[kind] = round(res["accepted_per_s"] * res["seconds"])
            for conns in levels:
                for round_no in range(args.rounds):
                    # Alternate the order so neither side always runs right after the other.
                    order = kinds if round_no % 2 == 0 else kinds[::-1]
                    for kind in order:
                        res = run(kind, conns, args.duration)
                        print(f"{kind:5} c={conns:3} round {round_no + 1}: "
                              f"{res['accepted_per_s']:9.0f}/s  p50 {res['p50_ms']:7.2f} ms  "
                              f"p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}", flush=True)
                        rounds = results["runs"].setdefault(kind, {}).setdefault(str(conns), [])
                        rounds.append(res)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        # Every accepted request must be a row on disk (rows >= accepted: wrk stops with
        # requests in flight that may still commit). Warm-up requests count too.
        for kind in servers:
            db = Path(tmp) / kind / ("peer.sqlite3" if kind == "peer" else "store.sqlite3")
            with sqlite3.connect(db) as conn:
                (rows,) = conn.execute("SELECT count(*) FROM events").fetchone()
            accepted = sum(
                round(r["accepted_per_s"] * r["seconds"])
                for rs in results["runs"][kind].values() for r in rs) + warmups[kind]
            results.setdefault("stored_rows", {})[kind] = {"rows": rows, "accepted": accepted}
            status = "ok" if rows >= accepted else "MISSING ROWS"
            print(f"{kind}: {rows} rows stored, {accepted} accepted: {status}")
    # The best round per cell: other load on a shared machine only ever slows a run down.
    results["best"] = {
        kind: {c: max(rs, key=lambda r: r["accepted_per_s"]) for c, rs in by_level.items()}
        for kind, by_level in results["runs"].items()
    }

    print()
    print(f"load generator: {results['loadgen']}; {args.duration:g}s per run, best of "
          f"{args.rounds}; {len(PAYLOAD)} B JSON; {os.cpu_count()} CPUs; "
          f"load average before: {results['loadavg_before']}")
    best = results["best"]
    ours_kinds = [k for k in kinds if k != "peer"]
    print("| connections | " + " | ".join(
        f"{k} accepted/s | {k} p50 ms | {k} p99 ms" for k in kinds)
        + "".join(f" | {k} / peer" for k in ours_kinds if "peer" in kinds) + " |")
    print("|---:" * (1 + 3 * len(kinds) + (len(ours_kinds) if "peer" in kinds else 0)) + "|")
    for conns in levels:
        cells = [str(conns)]
        for kind in kinds:
            r = best[kind][str(conns)]
            cells += [f"{r['accepted_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        if "peer" in kinds:
            peer_rate = best["peer"][str(conns)]["accepted_per_s"]
            for kind in ours_kinds:
                ratio = best[kind][str(conns)]["accepted_per_s"] / max(peer_rate, 1e-9)
                results.setdefault("ratio", {}).setdefault(kind, {})[str(conns)] = round(ratio, 2)
                cells.append(f"{ratio:.1f}x")
        print("| " + " | ".join(cells) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
