"""Store append throughput: N concurrent appenders, each append fsync'd before it returns.

Measures ``SQLiteStore.append`` (group commit, WAL, ``synchronous=FULL``) with 64 concurrent
appenders by default, and beside it, in the same run, the naive peer: one ``BEGIN IMMEDIATE /
INSERT / COMMIT`` per event on a single connection in a worker thread, same pragmas. Prints
appends/s, p50/p99 append latency, and how many events one commit carried.

With ``--pg-dsn`` (default ``$MFO_PG_DSN``) it also measures the Postgres store in a schema of
its own (dropped afterwards): appends the same way, then the forwarder's cycle (ordered
``claim_due`` of runs per source + ``mark_delivered``) draining 5,000 pending events over 64
sources with 4 claimers, once on an empty table and once with 1,000,000 delivered rows present,
to show that claims do not slow down as delivered history piles up.

    .venv/bin/python benchmarks/store.py [--seconds 3] [--concurrency 64] [--backend asyncio]
        [--pg-dsn postgresql://postgres@127.0.0.1:5432/test] [--history 1000000]
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
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql

from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import EventStore, open_postgres_store, open_sqlite_store

BODY = b'{"action": "opened", "number": 42, "repository": {"full_name": "acme/widgets"}}' * 8
HEADERS = {"content-type": "application/json", "x-github-event": "pull_request"}


def make_event() -> Event:
    return Event(id=new_id(), source="github", type="pull_request", received_at=time.time(),
                 headers=HEADERS, body=BODY)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_store(path: Path, seconds: float, concurrency: int) -> dict[str, float]:
    async with open_sqlite_store(path, max_pending=10**9, max_bytes=10**12) as store:
        return await bench_appends(store, seconds, concurrency)


async def drive(append: Callable[[Event], Awaitable[Any]], seconds: float,
                concurrency: int) -> dict[str, float]:
    """*concurrency* tasks calling *append* for *seconds*: appends/s and latency."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def appender() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await append(make_event())
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(appender)
    elapsed = time.perf_counter() - start
    return {
        "appends_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "events_per_commit": 1.0,
    }


async def bench_appends(store: EventStore, seconds: float, concurrency: int
                        ) -> dict[str, float]:
    """*concurrency* tasks appending for *seconds*; appends/s, latency, events per commit."""
    result = await drive(store.append, seconds, concurrency)
    stats = store.statistics()  # type: ignore[attr-defined]  # both backends have it
    return {**result, "events_per_commit": stats.appends / max(1, stats.batches)}


async def bench_naive(path: Path, seconds: float, concurrency: int) -> dict[str, float]:
    """One transaction (one fsync) per event: what a hand-written handler does."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, source TEXT, "
                 "type TEXT, received_at REAL, headers TEXT, body BLOB)")
    limiter = anyio.CapacityLimiter(1)

    def insert(e: Event) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                     (e.id, e.source, e.type, e.received_at, str(e.headers), e.body))
        conn.execute("COMMIT")

    try:
        return await drive(partial(anyio.to_thread.run_sync, insert, limiter=limiter),
                           seconds, concurrency)
    finally:
        conn.close()


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


DRAIN_EVENTS, DRAIN_SOURCES, DRAINERS = 5000, 64, 4


async def bench_pg_naive(dsn: str, schema: str, seconds: float, concurrency: int
                         ) -> dict[str, float]:
    """The hand-written peer: a pool of 4 connections, one INSERT + COMMIT per event."""
    from psycopg_pool import ConnectionPool

    table = sql.Identifier(schema, "naive")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, source text, type text, "
                             "received_at float8, headers text, body bytea)").format(table))
    pool = ConnectionPool(dsn, min_size=4, max_size=4, open=False)
    pool.open(wait=True)
    insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(table)
    limiter = anyio.CapacityLimiter(4)

    def one(e: Event) -> None:
        with pool.connection() as conn:  # commits on leaving
            conn.execute(insert, (e.id, e.source, e.type, e.received_at, str(e.headers),
                                  e.body))

    try:
        return await drive(partial(anyio.to_thread.run_sync, one, limiter=limiter),
                           seconds, concurrency)
    finally:
        pool.close()


async def bench_drain(store: EventStore) -> dict[str, float]:
    """Append DRAIN_EVENTS pending events, then time DRAINERS forwarder-like claimers
    (ordered, 8 sources x 4 events per claim) settling them all."""
    for start_at in range(0, DRAIN_EVENTS, 256):
        async with anyio.create_task_group() as tg:
            for n in range(start_at, min(DRAIN_EVENTS, start_at + 256)):
                e = make_event()
                tg.start_soon(store.append, Event(
                    id=e.id, source=f"s{n % DRAIN_SOURCES}", type=e.type,
                    received_at=e.received_at, headers=e.headers, body=e.body))
    done = 0
    claim_times: list[float] = []

    async def drainer() -> None:
        nonlocal done
        while done < DRAIN_EVENTS:
            t = time.perf_counter()
            claimed = await store.claim_due(limit=8, lease=60, per_source=4)
            claim_times.append(time.perf_counter() - t)
            if not claimed:
                await store.wait_for_events(0.01)
                continue
            for c in claimed:
                await store.mark_delivered(c.event.id, c.claim_token or "")
            done += len(claimed)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(DRAINERS):
            tg.start_soon(drainer)
    elapsed = time.perf_counter() - start
    return {
        "delivered_per_s": DRAIN_EVENTS / elapsed,
        "claim_p50_ms": percentile(claim_times, 0.50) * 1000,
        "claim_p99_ms": percentile(claim_times, 0.99) * 1000,
    }


def add_history(dsn: str, schema: str, rows: int) -> float:
    """Insert *rows* delivered events (small bodies) straight in SQL; return seconds taken."""
    t = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(
            "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
            "is_json, size, status, attempts, next_attempt_at, delivered_at) "
            "SELECT 'h' || lpad(g::text, 12, '0'), 's' || (g %% %s), 'bench', 0, '{}', "
            "'{\"n\": 1}', 'application/json', true, 8, 'delivered', 1, 0, 1 "
            "FROM generate_series(1, %s) AS g", (DRAIN_SOURCES, rows))
        conn.execute("VACUUM ANALYZE events")
    return time.perf_counter() - t


async def bench_postgres(dsn: str, seconds: float, concurrency: int, history: int
                         ) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        async with open_postgres_store(dsn, schema=schema, max_pending=10**9,
                                       max_bytes=10**12) as store:
            r = await bench_appends(store, seconds, concurrency)
            rows.append({"name": "PostgresStore (group)", **r})
            print(f"{'PostgresStore (group)':24}{r['appends_per_s']:>12,.0f}"
                  f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['events_per_commit']:>15.1f}")
            await store.prune(delivered_older_than=-1e9)  # start the drains from empty
        r = await bench_pg_naive(dsn, schema, seconds, concurrency)
        rows.append({"name": "PG naive 1 tx/event", **r})
        print(f"{'PG naive 1 tx/event':24}{r['appends_per_s']:>12,.0f}"
              f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['events_per_commit']:>15.1f}")
        print(f"\n{'':34}{'delivered/s':>12}{'claim p50 ms':>14}{'claim p99 ms':>14}")
        for label, extra in (("empty", 0), (f"{history:,} delivered present", history)):
            if extra:
                took = await anyio.to_thread.run_sync(add_history, dsn, schema, extra)
                print(f"(inserted {extra:,} delivered rows in {took:.0f}s)")
            async with open_postgres_store(dsn, schema=schema, max_pending=10**9,
                                           max_bytes=10**12) as store:
                r = await bench_drain(store)
            name = f"PG claim+deliver, {label}"
            rows.append({"name": name, **r})
            print(f"{name:34}{r['delivered_per_s']:>12,.0f}{r['claim_p50_ms']:>14.2f}"
                  f"{r['claim_p99_ms']:>14.2f}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))
    return rows


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
    if args.pg_dsn:
        rows += await bench_postgres(args.pg_dsn, args.seconds, args.concurrency, args.history)
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
    parser.add_argument("--pg-dsn", default=os.environ.get("MFO_PG_DSN"),
                        help="also measure the Postgres store there (default $MFO_PG_DSN)")
    parser.add_argument("--history", type=int, default=1_000_000,
                        help="delivered rows present in the second Postgres drain")
    args = parser.parse_args()
    anyio.run(main, args, backend=args.backend)
