"""What only a shared store has: several nodes on one Postgres schema at once.

Each test opens two or more stores (nodes) on its own schema ($MFO_PG_DSN) in one process;
the contract tests (test_store_contract.py) cover each store alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import (
    AppendResult,
    PostgresStore,
    RunRequest,
    StoredEvent,
    StoreError,
    open_postgres_store,
)
from mfo_actors.store._pg_schema import MIGRATIONS
from tests.helpers import free_port, poll
from tests.test_store_contract import T0, FakeClock

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

Opener = Callable[..., AbstractAsyncContextManager[PostgresStore]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(pg_dsn: str, pg_schema: str, clock: FakeClock) -> Opener:
    """``node(name, **options)`` opens the shared schema as node *name*."""

    def open_(name: str, **options: Any) -> AbstractAsyncContextManager[PostgresStore]:
        options.setdefault("clock", clock)
        return open_postgres_store(pg_dsn, schema=pg_schema, node=name, **options)

    return open_


def event(clock: FakeClock, source: str = "s", dedupe_key: str | None = None) -> Event:
    return Event(id=new_id(), source=source, type="t", received_at=clock(),
                 headers={}, body=b'{"x": 1}', dedupe_key=dedupe_key)


async def test_same_delivery_on_two_nodes_at_once_is_stored_once(
    node: Opener, clock: FakeClock
) -> None:
    """A provider retry reaching two daemons at the same instant: one event, one id."""
    async with node("a") as a, node("b") as b:
        for round_ in range(20):
            key = f"delivery-{round_}"
            results: dict[str, AppendResult] = {}

            async def one(name: str, store: PostgresStore, key: str = key,
                          results: dict[str, AppendResult] = results) -> None:
                results[name] = await store.append(event(clock, dedupe_key=key))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "a", a)
                tg.start_soon(one, "b", b)
            assert results["a"].id == results["b"].id
            assert sorted(r.duplicate for r in results.values()) == [False, True]
        stored = await a.list_events(limit=100)
    assert len(stored) == 20


async def test_nodes_claim_disjoint_events_in_source_order(
    node: Opener, clock: FakeClock
) -> None:
    """Three nodes draining six sources concurrently: every event once, at most one event
    of a source in flight at a time, and each source delivered in acceptance order."""
    sources = [f"s{i}" for i in range(6)]
    accepted: dict[str, list[str]] = {s: [] for s in sources}
    delivered: dict[str, list[str]] = {s: [] for s in sources}
    in_flight: dict[str, int] = dict.fromkeys(sources, 0)
    async with node("a") as a, node("b") as b, node("c") as c:
        for n in range(120):
            e = event(clock, source=sources[n % 6])
            await (a, b, c)[n % 3].append(e)
            accepted[e.source].append(e.id)

        async def drain(store: PostgresStore) -> None:
            while sum(map(len, delivered.values())) < 120:
                claimed = await store.claim_due(limit=3, lease=60, per_source=2)
                if not claimed:
                    await store.wait_for_events(0.05)
                    continue
                by_source: dict[str, list[StoredEvent]] = {}
                for ev in claimed:
                    by_source.setdefault(ev.event.source, []).append(ev)
                for source, run in by_source.items():
                    in_flight[source] += 1
                    assert in_flight[source] == 1, f"{source} claimed by two nodes at once"
                    for i, ev in enumerate(run):
                        await anyio.lowlevel.checkpoint()
                        delivered[source].append(ev.event.id)
                        if i == len(run) - 1:  # settling the last frees the source
                            in_flight[source] -= 1
                        await store.mark_delivered(ev.event.id, ev.claim_token or "")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for store in (a, b, c):
                    tg.start_soon(drain, store)
        assert delivered == accepted

        async def counted() -> bool:  # a's view of the cluster, refreshed every second
            stats = await a.stats()
            return (stats.pending, stats.delivered) == (0, 120)

        await poll(counted, deadline=10)


async def test_another_nodes_claims_come_back_by_lease(node: Opener, clock: FakeClock) -> None:
    """b dies holding a claim: a takes it only once the lease ran out."""
    async with node("a") as a:
        e = event(clock)
        await a.append(e)
        async with node("b") as b:
            (held,) = await b.claim_due(limit=10, lease=30)
        assert await a.recover_claims() == 0  # not a's claim
        assert await a.claim_due(limit=10, lease=30) == []
        clock.now += 31
        (taken,) = await a.claim_due(limit=10, lease=30)
        assert taken.event.id == held.event.id == e.id


async def test_a_dead_nodes_runs_are_rerun_after_its_lease(
    node: Opener, clock: FakeClock
) -> None:
    rerun, fail = RunRequest(run_id=new_id(), flow="r", trigger="manual"), RunRequest(
        run_id=new_id(), flow="f", trigger="manual")
    async with node("a", node_lease=10.0) as a:
        async with node("b", node_lease=10.0) as b:
            await b.create_runs([rerun, fail])
            assert len(await b.claim_runs(limit=10)) == 2
        assert await a.recover_runs(rerun_flows=["r"], orphaned=True) == []  # lease still on
        clock.now += 11
        recovered = {r.run_id: r for r in await a.recover_runs(rerun_flows=["r"], orphaned=True)}
        assert (recovered[rerun.run_id].status, recovered[rerun.run_id].interrupted) == ("new", 1)
        assert recovered[fail.run_id].status == "error"
        (again,) = await a.claim_runs(limit=10)
        assert again.run_id == rerun.run_id
        clock.now += 11  # a's own run is never an orphan for a, however old its lease
        assert await a.recover_runs(rerun_flows=["r"], orphaned=True) == []


async def test_a_live_node_renews_its_run_leases(node: Opener) -> None:
    """With the real clock: a's maintenance renews its active runs, so b never takes them."""
    req = RunRequest(run_id=new_id(), flow="r", trigger="manual")
    async with node("a", node_lease=1.5, clock=_now) as a, node("b", node_lease=1.5,
                                                                clock=_now) as b:
        await a.create_runs([req])
        await a.claim_runs(limit=1)
        with anyio.move_on_after(2.5):  # past one lease: renewals must have happened
            while True:
                assert await b.recover_runs(rerun_flows=["r"], orphaned=True) == []
                await anyio.sleep(0.5)
        got = await a.get_run(req.run_id)
        assert got is not None and got[0].status == "active"


def _now() -> float:
    import time

    return time.time()


async def test_a_cron_tick_fires_once_across_nodes(node: Opener) -> None:
    async with node("a") as a, node("b") as b:
        created: list[list[str]] = []

        async def fire(store: PostgresStore) -> None:
            req = RunRequest(run_id=new_id(), flow="f", trigger="cron", schedule_key="cron:0",
                             tick=T0)
            created.append(await store.create_runs([req]))

        async with anyio.create_task_group() as tg:
            for store in (a, b, a, b):
                tg.start_soon(fire, store)
        assert sum(map(len, created)) == 1
        assert await b.last_tick("f", "cron:0") == T0


async def test_counts_are_the_clusters(node: Opener, clock: FakeClock) -> None:
    """b's backpressure sees what a appended (after a refresh), and no hot row is shared."""
    async with node("a", max_pending=5) as a, node("b", max_pending=5) as b:
        for _ in range(4):
            await a.append(event(clock, source=new_id()))

        async def b_sees_them() -> bool:
            return (await b.stats()).pending == 4

        await poll(b_sees_them, deadline=10)
        await b.append(event(clock))
        with pytest.raises(StoreError):  # StoreFullError: the cluster holds 5
            await b.append(event(clock))


async def test_an_append_wakes_other_nodes(node: Opener, clock: FakeClock) -> None:
    """LISTEN/NOTIFY: b's wait returns when a appends, long before its timeout."""
    async with node("a") as a, node("b") as b:
        await b.wait_for_events(0)
        woke = anyio.Event()

        async def waiter() -> None:
            await b.wait_for_events(30)
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.2)  # let the LISTEN connection come up (a wake-up is fine too)
            await b.wait_for_events(0)
            await a.append(event(clock))
            with anyio.fail_after(5):
                await woke.wait()


async def test_another_nodes_append_wakes_a_waiting_claim(
        node: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim waiting for the next write (``within``) on b runs when a appends (its NOTIFY),
    long before *within*: b's own writes are not the only ones it waits for. (b's upkeep
    write, each second by default, would take the claim along too: made rare here.)"""
    from mfo_actors.store import _postgres

    monkeypatch.setattr(_postgres, "COUNTS_REFRESH", 60.0)  # upkeep every node_lease/3: 10 s
    async with node("a") as a, node("b") as b:
        with anyio.fail_after(10):
            await b.wait_for_events(30)  # b's LISTEN is up
        assert await b.claim_due(limit=8, lease=60) == []
        claimed: list[Any] = []

        async def claim() -> None:
            while not claimed:  # an upkeep write may still come first: then wait again
                claimed.extend(await b.claim_due(limit=8, lease=60, within=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim)
            await anyio.wait_all_tasks_blocked()
            ev = await a.append(event(clock))
            with anyio.fail_after(5):  # not the 30 s of within, nor b's next upkeep
                await poll(lambda: bool(claimed))
        assert [c.event.id for c in claimed] == [ev.id]


async def test_nodes_starting_at_once_migrate_once(node: Opener) -> None:
    opened: list[str] = []
    all_open = anyio.Event()

    async def start(name: str) -> None:
        async with node(name) as store:
            opened.append(store.node)
            if len(opened) == 4:
                all_open.set()
            await all_open.wait()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(start, f"n{i}")
    assert sorted(opened) == ["n0", "n1", "n2", "n3"]


async def test_missing_schema_and_unreachable_server_are_store_errors(
    pg_dsn: str, pg_schema: str
) -> None:
    with pytest.raises(StoreError, match="no event store"):
        async with open_postgres_store(pg_dsn, schema=pg_schema, must_exist=True):
            pass
    port = free_port()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        async with open_postgres_store(f"postgresql://postgres@127.0.0.1:{port}/test"):
            pass


async def test_a_newer_schema_is_refused(pg_dsn: str, pg_schema: str) -> None:
    async with open_postgres_store(pg_dsn, schema=pg_schema):
        pass
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {pg_schema}.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer"):
        async with open_postgres_store(pg_dsn, schema=pg_schema):
            pass


async def test_a_lock_held_elsewhere_times_out_and_the_batch_is_retried(
    node: Opener, pg_dsn: str, pg_schema: str, clock: FakeClock
) -> None:
    """A DBA's LOCK TABLE (or a long migration) on events: with store.lock_timeout, a write
    waits at most that long per try, is run again (the lock may be gone by then), and fails
    with a transient StoreError only after its tries; never hangs, never half-written."""
    async with node("a", lock_timeout=0.2, statement_timeout=5.0) as a:
        settings = await a._read(lambda c: c.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
        ).fetchone())
        assert settings == ("200ms", "5s")
        first = event(clock)
        await a.append(first)

        def lock() -> psycopg.Connection[Any]:
            conn = psycopg.connect(pg_dsn)
            conn.execute(f"LOCK TABLE {pg_schema}.events IN ACCESS EXCLUSIVE MODE")
            return conn  # in its transaction, holding the lock until commit

        # 1. The lock stays: every try times out, the caller gets a transient error.
        holder = await anyio.to_thread.run_sync(lock)
        try:
            blocked = event(clock)
            with anyio.fail_after(10):
                with pytest.raises(StoreError, match="transient"):
                    await a.append(blocked)
            assert a.statistics().transient_retries == 2
            # 2. The lock goes while the writer retries: the write goes through.
            retries = a.statistics().transient_retries
            later = event(clock)
            result: list[AppendResult] = []

            async def append() -> None:
                result.append(await a.append(later))

            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                await poll(lambda: a.statistics().transient_retries > retries)
                await anyio.to_thread.run_sync(holder.commit)
            assert result == [AppendResult(later.id)]
        finally:
            await anyio.to_thread.run_sync(holder.close)
        ids = {s.event.id for s in await a.list_events(limit=10)}
        assert ids == {first.id, later.id}  # the failed append left nothing
        assert (await a.stats()).writable


async def test_a_version_1_schema_keeps_its_order_per_source(
    pg_dsn: str, pg_schema: str
) -> None:
    """Version 2 (ordering keys) turns each ``sources`` row into its source's lane, cursor
    kept: the waiting events of an older schema are claimed in order, one per source."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(f"CREATE SCHEMA {pg_schema}")
        conn.execute(f"SET LOCAL search_path TO {pg_schema}")
        MIGRATIONS[0](conn)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        for n, (source, status) in enumerate(
                [("a", "delivered"), ("a", "pending"), ("a", "pending"), ("b", "pending")]):
            conn.execute(
                "INSERT INTO events (id, source, type, received_at, headers, body, "
                "content_type, is_json, size, status, next_attempt_at) "
                "VALUES (%s, %s, 't', 0, '{}', '', 'text/plain', false, 0, %s, 0)",
                (f"0{n}", source, status))
        conn.execute("INSERT INTO sources (source, cursor, ready_at) "
                     "VALUES ('a', 1, 0), ('b', 0, 0)")
    async with open_postgres_store(pg_dsn, schema=pg_schema) as store:
        first = await store.claim_due(limit=10, lease=30)
        assert [c.event.id for c in first] == ["01", "03"]
        await store.mark_delivered("01", first[0].claim_token or "")
        (second,) = await store.claim_due(limit=10, lease=30)
    assert second.event.id == "02"
