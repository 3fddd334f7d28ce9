"""A live node cut off from the store for longer than ``store.node_lease``: it stops its runs
before their lease can run out (so another node never runs them while it still does), and
gives them back by their flow's ``on_interrupt`` once the store answers again. Both store
backends, both anyio backends, real clocks (the lease is short)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mfo_actors.actors.scheduler import SchedulerActor
from mfo_actors.config import Duration, FlowsConfig, InstanceConfig, StoreConfig
from mfo_actors.store import EventStore, StoreError, open_postgres_store, open_sqlite_store
from tests.helpers import poll
from tests.test_scheduler import Gate, make_flows, running

pytestmark = pytest.mark.anyio

LEASE = 6.0  # seconds: fenced at 0.8 of it after the last renewal, expired at 1.0

GATED = """
name: Gated
on_interrupt: {policy}
tasks:
  - {{id: wait, type: gate}}
"""

Opener = Callable[[str], AbstractAsyncContextManager[EventStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """``opener(node)`` opens one shared store as *node*, with the short lease."""
    if request.param == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return lambda node: open_postgres_store(dsn, schema=schema, node=node,
                                                node_lease=LEASE)
    return lambda node: open_sqlite_store(tmp_path / "store.sqlite3", node=node,
                                          node_lease=LEASE)


@asynccontextmanager
async def outage(store: EventStore) -> AsyncIterator[None]:
    """Every write of *store* fails while the block runs (the database is away for this
    node); reads still work, so the test can look."""

    def fail(batch: list[Any]) -> None:
        store._fail_all(batch, StoreError("store unreachable (test outage)"))  # type: ignore[attr-defined]

    store._apply_batch = fail  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del store._apply_batch  # type: ignore[attr-defined]


# Real lease expiry (about 5 s each, 8 variants): the slow set.
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "rerun"])
async def test_a_node_cut_off_stops_its_runs_before_their_lease_runs_out(
    opener: Opener, policy: str
) -> None:
    gate = Gate()
    flows = make_flows(GATED.format(policy=policy), gate=gate)
    cfg = InstanceConfig(instance="leases", flows=FlowsConfig(),
                         store=StoreConfig(node_lease=Duration(LEASE)))
    async with opener("a") as a, opener("b") as b:
        actor = SchedulerActor(cfg, a, flows, client=None)
        async with running(actor):
            run_id = await actor.run_now("Gated")
            await poll(lambda: gate.waiting == 1)
            async with outage(a):
                # a cannot renew: it stops the run while the lease still holds, so b
                # finds nothing to take over at that moment ...
                await poll(lambda: gate.waiting == 0, deadline=2 * LEASE)
                assert await b.recover_runs(rerun_flows=["Gated"], orphaned=True) == []
                got = await a.get_run(run_id)
                assert got is not None and got[0].status == "active"
            # ... and gives it back by on_interrupt once its writes go through again.
            want = "error" if policy == "fail" else "done"
            if policy == "rerun":
                await poll(lambda: gate.waiting == 1)  # run again, from the start
                gate.release.set()

            async def settled() -> bool:
                got = await a.get_run(run_id)
                return got is not None and got[0].status == want

            await poll(settled, deadline=2 * LEASE)
        record, tasks = await a.get_run(run_id)  # type: ignore[misc]
        assert record.interrupted == 1
        if policy == "fail":
            assert record.error == "interrupted"
            assert [t.state for t in tasks] == ["cancelled"]
        assert await b.recover_runs(rerun_flows=["Gated"], orphaned=True) == []
        assert gate.max_waiting == 1  # never two executions at once
