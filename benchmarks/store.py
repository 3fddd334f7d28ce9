"""Store append throughput: N concurrent appenders, each append fsync'd before it returns.

Measures ``SQLiteStore.append`` (group commit, WAL, ``synchronous=FULL``) with 64 concurrent
appenders by default, and beside it, in the same run, the naive peer: one ``BEGIN IMMEDIATE /
INSERT / COMMIT`` per event on a single connection in a worker thread, same pragmas. Prints
appends/s, p50/p99 append latency, and how many events one commit carried.

    .venv/bin/python benchmarks/store.py [--seconds 3] [--concurrency 64] [--backend asyncio]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import open_sqlite_store

BODY = b'{"action": "opened", "number": 42, "repository": {"full_name": "acme/widgets"}}' * 8
HEADERS = {"content-type": "application/json", "x-github-event": "pull_request"}


def make_event() -> Event:
    return Event(id=new_id(), source="github", type="pull_request", received_at=time.time(),
                 headers=HEADERS, body=BODY)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_store(path: Path, seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    async with open_sqlite_store(path, max_pending=10**9, max_bytes=10**12) as store:
        deadline = time.perf_counter() + seconds

        async def appender() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await store.append(make_event())
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(appender)
        elapsed = time.perf_counter() - start
        stats = store.statistics()
    return {
        "appends_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "events_per_commit": stats.appends / max(1, stats.batches),
    }


async def bench_naive(path: Path, seconds: float, concurrency: int) -> dict[str, float]:
    """One transaction (one fsync) per event: what a hand-written handler does."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, source TEXT, "
                 "type TEXT, received_at REAL, headers TEXT, body BLOB)")
    limiter = anyio.CapacityLimiter(1)
    latencies: list[float] = []

    def insert(e: Event) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                     (e.id, e.source, e.type, e.received_at, str(e.headers), e.body))
        conn.execute("COMMIT")

    deadline = time.perf_counter() + seconds

    async def appender() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await anyio.to_thread.run_sync(insert, make_event(), limiter=limiter)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(appender)
    elapsed = time.perf_counter() - start
    conn.close()
    return {
        "appends_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "events_per_commit": 1.0,
    }


def fsync_ms(directory: Path) -> float:
    """Median time of one committed single-row transaction: this disk's fsync cost."""
    conn = sqlite3.connect(directory / "fsync.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (x BLOB)")
    times = []
    for _ in range(100):
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (BODY,))
        conn.execute("COMMIT")
        times.append(time.perf_counter() - t)
    conn.close()
    return statistics.median(times) * 1000


RESULTS = Path(__file__).parent / "results" / "store.json"


async def main(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        commit_ms = fsync_ms(d)
        print(f"backend={args.backend} concurrency={args.concurrency} seconds={args.seconds} "
              f"body={len(BODY)}B fsync(commit)={commit_ms:.3f}ms")
        print(f"{'':24}{'appends/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'events/commit':>15}")
        for name, fn in (("SQLiteStore (group)", bench_store), ("naive 1 tx/event", bench_naive)):
            r = await fn(d / f"{name.split()[0]}.db", args.seconds, args.concurrency)
            rows.append({"name": name, **r})
            print(f"{name:24}{r['appends_per_s']:>12,.0f}{r['p50_ms']:>10.2f}"
                  f"{r['p99_ms']:>10.2f}{r['events_per_commit']:>15.1f}")
    RESULTS.parent.mkdir(exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.backend] = {
        "settings": {"concurrency": args.concurrency, "seconds": args.seconds,
                     "body_bytes": len(BODY), "fsync_commit_ms": round(commit_ms, 3)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--dir", default=None, help="where the database goes (default: tmp)")
    args = parser.parse_args()
    anyio.run(main, args, backend=args.backend)
