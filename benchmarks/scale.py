"""Scale-out benchmark: delivered events/s with 1, 2 and 3 daemons sharing one PostgreSQL
store, beside one daemon on its SQLite file, in the same run and against the same upstream.

Each row: the store is preloaded with ``--events`` events over ``--sources`` sources (through
the store API, so ingest speed is not what is measured), a fresh reference MFO server starts
with ``--latency`` seconds added to every request (a real upstream is not instant; this is
what lets more daemons deliver more), then N daemons (``python -m mfo_actors run``, real
processes, own state dirs and ports) start at once and drain it. Reported:

* **delivered/s**: unique events the reference server received / (its last receipt - its
  first), from ``GET /_mock/events``;
* **x one**: delivered/s over the 1-daemon Postgres row;
* **dups**: events the server received more than once (there should be none without a crash).

Usage::

    MFO_PG_DSN=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python benchmarks/scale.py [--events 6000] [--sources 64]
        [--latency 0.02] [--concurrency 8] [--daemons 1,2,3]

Each Postgres row uses its own schema (dropped afterwards). Results: a table on stdout and
``benchmarks/results/scale.json``. Not a test: it is outside pytest's testpaths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import free_port, start, stop, tail, wait_ok

from mfo_actors.config import load_config
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import open_store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PAYLOAD = json.dumps({"type": "bench.event", "pad": "x" * 400}).encode()


def write_config(path: Path, *, state_dir: Path, mock_port: int, store: str,
                 concurrency: int) -> Path:
    path.write_text(f"""\
instance: scale-bench
state_dir: {state_dir}
client:
  base_url: http://127.0.0.1:{mock_port}
  timeout: 10s
auth: {{mode: none}}
webhook_listener: {{host: 127.0.0.1, port: {free_port()}, path: /webhook}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
forwarder: {{concurrency: {concurrency}, ordering: source}}
flows: {{enabled: false}}
store: {store}
logging: {{level: warning, format: json}}
""")
    return path


async def preload(config: Path, events: int, sources: int) -> None:
    """Append *events* round-robin over *sources* through the store, 64 at a time."""
    cfg = load_config(config)
    async with open_store(cfg) as store:
        for start_at in range(0, events, 64):
            async with anyio.create_task_group() as tg:
                for n in range(start_at, min(events, start_at + 64)):
                    tg.start_soon(store.append, Event(
                        id=new_id(), source=f"s{n % sources}", type="bench.event",
                        received_at=time.time(), headers={"content-type": "application/json"},
                        body=PAYLOAD))


def run_row(args: argparse.Namespace, backend: str, daemons: int, workdir: Path
            ) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    store = ("{backend: sqlite}" if backend == "sqlite" else
             f"{{backend: postgres, dsn: '{args.dsn}', schema: {schema}, "
             f"max_pending: 10000000}}")
    mock_port = free_port()
    mock_log = workdir / "mock.log"
    mock = start(["mock-server", "--port", str(mock_port), "--no-auth", "--latency",
                  str(args.latency), "--log-level", "warning"], mock_log)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        with httpx.Client() as client:
            wait_ok(client, f"http://127.0.0.1:{mock_port}/_mock/stats", mock, mock_log,
                    "reference server")
            configs = [write_config(workdir / f"n{i}.yaml", state_dir=workdir / f"state{i}",
                                    mock_port=mock_port, store=store,
                                    concurrency=args.concurrency) for i in range(daemons)]
            anyio.run(preload, configs[0], args.events, args.sources)
            for i, config in enumerate(configs):
                log = workdir / f"n{i}.log"
                procs.append((start(["run", "--config", str(config)], log), log))
            deadline = time.monotonic() + args.timeout
            while True:
                stats = client.get(f"http://127.0.0.1:{mock_port}/_mock/stats").json()
                if stats["unique_event_ids"] >= args.events:
                    break
                for proc, log in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"a daemon exited ({proc.returncode}):\n{tail(log)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {stats['unique_event_ids']} delivered in time")
                time.sleep(0.2)  # polling a subprocess's progress, not a test
            received = client.get(f"http://127.0.0.1:{mock_port}/_mock/events",
                                  timeout=60).json()["events"]
    finally:
        for proc, _ in procs:
            stop(proc)
        stop(mock)
        if backend == "postgres":
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(schema)))
    first_last = _receipt_span(received)
    return {
        "backend": backend, "daemons": daemons, "events": args.events,
        "delivered_per_s": round(args.events / first_last, 1),
        "span_s": round(first_last, 2),
        "server_duplicates": int(stats.get("duplicates", 0)),
    }


def _receipt_span(received: list[dict[str, Any]]) -> float:
    """Seconds between the reference server's first and last receipt."""
    stamps = [float(e["received_at"]) for e in received if "received_at" in e]
    if len(stamps) < 2:
        raise SystemExit("the reference server did not report receipt times")
    return max(stamps) - min(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--sources", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02,
                        help="seconds the reference server adds to every request")
    parser.add_argument("--concurrency", type=int, default=8, help="forwarder.concurrency")
    parser.add_argument("--daemons", default="1,2,3", help="Postgres rows: daemons per row")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--dsn", default=os.environ.get("MFO_PG_DSN"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.dsn:
        raise SystemExit("set MFO_PG_DSN (or --dsn) to a PostgreSQL database")

    plan = [("sqlite", 1)] + [("postgres", int(n)) for n in args.daemons.split(",")]
    result: dict[str, Any] = {
        "benchmark": "scale",
        "settings": {"events": args.events, "sources": args.sources,
                     "latency_s": args.latency, "concurrency": args.concurrency,
                     "payload_bytes": len(PAYLOAD)},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "rows": [],
    }
    for backend, daemons in plan:
        workdir = Path(tempfile.mkdtemp(prefix=f"mfo-scale-{backend}{daemons}-"))
        try:
            row = run_row(args, backend, daemons, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result["rows"].append(row)
        print(f"{backend} x{daemons}: {row['delivered_per_s']}/s", flush=True)
    one = next((r["delivered_per_s"] for r in result["rows"]
                if r["backend"] == "postgres" and r["daemons"] == 1), None)
    for row in result["rows"]:
        row["x_one_postgres"] = round(row["delivered_per_s"] / one, 2) if one else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    print(f"\n{s['events']} events over {s['sources']} sources, upstream latency "
          f"{s['latency_s'] * 1000:.0f} ms, forwarder.concurrency {s['concurrency']} "
          f"(ordering: source), {os.cpu_count()} CPUs; load average before: "
          f"{result['machine']['loadavg_before']}")
    print("| store | daemons | delivered/s | x one (postgres) | span s | server dups |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['backend']} | {r['daemons']} | {r['delivered_per_s']:.0f} "
              f"| {r['x_one_postgres']} | {r['span_s']} | {r['server_duplicates']} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
