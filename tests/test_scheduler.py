"""The scheduler actor: durable event triggers, cron/interval without double fires, recovery.

In-process tests run on asyncio and trio against a real SQLite store; schedules use a
FakeClock, so no test waits on the wall clock. The kill -9 acceptance test needs the daemon
to wire the scheduler and the listener's ``match_runs``; it skips until it does.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from mfo_actors.actors import scheduler as scheduler_module
from mfo_actors.actors.scheduler import RunMatcher, SchedulerActor, latest_tick
from mfo_actors.config import FlowsConfig, InstanceConfig
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.metrics import FLOW_RUNS
from mfo_actors.runtime import FakeClock, ReadySignal
from mfo_actors.store import EventStore, RunRecord, RunRequest, StoreError, open_sqlite_store
from mfo_actors.taskflow import (
    EmptyConfig,
    Flow,
    TaskContext,
    TaskRegistry,
    UnknownFlowError,
    builtin_registry,
    event_scope,
    load_flow_text,
)
from tests.helpers import free_port, running_daemon, wait_for, write_config

T0 = 1_700_000_000.0  # FakeClock start; interval ticks of 60 s fall on T0 + 40, T0 + 100, ...
FIRST_TICK = 1_700_000_040.0
DEADLINE = 10.0  # seconds any in-process wait may take before the test fails


# -- helpers -------------------------------------------------------------------------------


class Gate:
    """A ``gate`` task type that blocks until released (and counts who is waiting)."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.waiting = 0
        self.max_waiting = 0

    def register(self, registry: TaskRegistry) -> None:
        @registry.task("gate", config=EmptyConfig)
        async def gate(ctx: TaskContext, config: EmptyConfig) -> dict[str, Any]:
            self.waiting += 1
            self.max_waiting = max(self.max_waiting, self.waiting)
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1
            return {"opened": True}


def make_flows(*texts: str, gate: Gate | None = None) -> dict[str, Flow]:
    registry = builtin_registry()
    if gate is not None:
        gate.register(registry)
    flows = [load_flow_text(text, registry, file=f"flow{i}.yaml") for i, text in enumerate(texts)]
    return {f.name: f for f in flows}


def make_cfg(**flows: Any) -> InstanceConfig:
    return InstanceConfig(instance="test-scheduler", flows=FlowsConfig(**flows))


def make_event(source: str = "crm", type: str = "user.signup", payload: Any = None) -> Event:
    body = json.dumps(payload if payload is not None else {"plan": "pro", "id": 7}).encode()
    return Event(id=new_id(), source=source, type=type, received_at=time.time(), headers={},
                 body=body)


@asynccontextmanager
async def open_store(path: Path) -> AsyncIterator[EventStore]:
    async with open_sqlite_store(path / "store.sqlite3") as store:
        yield store


@asynccontextmanager
async def running(actor: SchedulerActor) -> AsyncIterator[SchedulerActor]:
    """Run *actor* until the block ends, then request_stop and wait for ``run`` to return."""
    async with anyio.create_task_group() as tg:
        ready = ReadySignal()
        tg.start_soon(actor.run, ready)
        with anyio.fail_after(DEADLINE):
            await ready.wait()
        try:
            yield actor
        finally:
            actor.request_stop()


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll *check* until it returns something truthy (fails the test after DEADLINE)."""
    try:
        with anyio.fail_after(DEADLINE):
            while True:
                result = await check()
                if result:
                    return result
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def settled_runs(store: EventStore, n: int, **filters: Any) -> list[RunRecord]:
    async def check() -> list[RunRecord] | None:
        runs = await store.list_runs(**filters)
        done = [r for r in runs if r.status in ("done", "error")]
        return done if len(done) >= n else None

    return list(await eventually(check, f"{n} settled runs ({filters})"))


SIGNUP = """
name: Signup
triggers:
  - event: {source: crm, type: "user.*"}
outputs: {greeting: "${greet.text}"}
tasks:
  - id: lookup
    type: set
    config: {values: {id: "${event.payload.id}"}}
  - id: greet
    type: set
    dependencies: [lookup]
    config: {values: {text: "hello ${lookup.id}"}}
"""

PRO_ONLY = """
name: ProOnly
triggers:
  - event: {source: crm, type: user.signup, when: "${event.payload.plan} == 'pro'"}
tasks:
  - {id: a, type: set, config: {values: {x: 1}}}
"""

BILLING = """
name: Billing
triggers:
  - event: {source: "bill*", type: "*"}
tasks:
  - {id: a, type: set, config: {values: {x: 1}}}
"""

EVERY_MINUTE = """
name: Every
triggers:
  - interval: 60s
tasks:
  - {id: a, type: set, config: {values: {run: "${run.id}"}}}
"""

CRON = """
name: Cron
triggers:
  - cron: "*/5 * * * *"
tasks:
  - {id: a, type: set, config: {values: {x: 1}}}
"""

GATED = """
name: Gated
on_interrupt: {policy}
tasks:
  - {{id: wait, type: gate}}
  - {{id: after, type: set, dependencies: [wait], config: {{values: {{x: 1}}}}}}
"""

FAILING = """
name: Failing
tasks:
  - {id: a, type: set, config: {values: {x: 1}}}
  - {id: b, type: set, dependencies: [a], config: {values: {y: "${input.missing}"}}}
"""


# -- RunMatcher (sync) ----------------------------------------------------------------------


def test_matcher_matches_globs_and_when() -> None:
    matcher = RunMatcher(make_flows(SIGNUP, PRO_ONLY, BILLING))
    pro = make_event(payload={"plan": "pro", "id": 1})
    runs = matcher(pro)
    assert sorted(r.flow for r in runs) == ["ProOnly", "Signup"]
    assert all(r.trigger == "event" and r.event_id == pro.id for r in runs)
    assert len({r.run_id for r in runs}) == 2
    free = make_event(payload={"plan": "free", "id": 2})
    assert [r.flow for r in matcher(free)] == ["Signup"]
    assert [r.flow for r in matcher(make_event(source="billing", type="x"))] == ["Billing"]
    assert matcher(make_event(source="other")) == []
    assert not RunMatcher(make_flows(EVERY_MINUTE))
    assert RunMatcher(make_flows(SIGNUP))


def test_matcher_decodes_payload_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = event_scope

    def counting(event: Any) -> Any:
        calls.append(event.id)
        return real(event)

    monkeypatch.setattr(scheduler_module, "event_scope", counting)
    matcher = RunMatcher(make_flows(SIGNUP, PRO_ONLY, BILLING))
    matcher(make_event(source="other"))  # no glob matches: no decoding
    matcher(make_event(type="user.deleted"))  # Signup matches on globs alone
    assert calls == []
    event = make_event()
    matcher(event)  # ProOnly's `when` needs the payload: decoded once
    assert calls == [event.id]
    # A body that is not JSON does not break matching (the `when` just fails).
    bad = Event(id=new_id(), source="crm", type="user.signup", received_at=0.0, headers={},
                body=b"{not json")
    assert [r.flow for r in matcher(bad)] == ["Signup"]


def test_latest_tick() -> None:
    flows = make_flows(EVERY_MINUTE, CRON)
    interval = flows["Every"].schedules[0]
    assert latest_tick(interval, FIRST_TICK + 59) == FIRST_TICK
    assert latest_tick(interval, FIRST_TICK) == FIRST_TICK
    cron = flows["Cron"].schedules[0]
    tick = latest_tick(cron, T0)
    assert tick <= T0 < cron.next_after(tick)
    assert latest_tick(cron, tick) == tick


# -- event triggers ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_event_runs_are_stored_with_the_event_and_executed(tmp_path: Path) -> None:
    flows = make_flows(SIGNUP, PRO_ONLY)
    matcher = RunMatcher(flows)
    before = FLOW_RUNS.labels(instance="test-scheduler", flow="Signup", status="done")._value.get()
    async with open_store(tmp_path) as store:
        event = make_event(payload={"plan": "pro", "id": 42})
        runs = matcher(event)
        await store.append(event, runs=runs)
        # Durable before any scheduler runs: the records are there, status new.
        stored = await store.list_runs()
        assert sorted(r.flow for r in stored) == ["ProOnly", "Signup"]
        assert {r.status for r in stored} == {"new"}
        assert {r.event_id for r in stored} == {event.id}

        actor = SchedulerActor(make_cfg(), store, flows, client=None, clock=FakeClock(T0))
        async with running(actor):
            settled = await settled_runs(store, 2)
        assert {r.status for r in settled} == {"done"}
        signup = next(r for r in settled if r.flow == "Signup")
        assert signup.outputs == {"greeting": "hello 42"}
        found = await store.get_run(signup.run_id)
        assert found is not None
        _, tasks = found
        assert [(t.task_id, t.state, t.attempts) for t in tasks] == [
            ("lookup", "done", 1), ("greet", "done", 1)]
        assert tasks[1].output == {"text": "hello 42"}
        assert all(t.started_at is not None and t.finished_at is not None for t in tasks)
    after = FLOW_RUNS.labels(instance="test-scheduler", flow="Signup", status="done")._value.get()
    assert after == before + 1


@pytest.mark.anyio
async def test_runs_appended_while_running_are_picked_up(tmp_path: Path) -> None:
    flows = make_flows(SIGNUP)
    matcher = RunMatcher(flows)
    async with open_store(tmp_path) as store:
        actor = SchedulerActor(make_cfg(), store, flows, client=None)
        async with running(actor):
            for _ in range(5):
                event = make_event()
                await store.append(event, runs=matcher(event))
            settled = await settled_runs(store, 5)
        assert [r.status for r in settled] == ["done"] * 5
        assert actor.runs_done == 5


class FlakyFinish:
    """A store whose ``finish_run`` fails (StoreError, as while Postgres restarts) its first
    *failures* calls; everything else goes to the real store."""

    def __init__(self, store: EventStore, failures: int) -> None:
        self._store = store
        self.failures = failures
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def finish_run(self, run_id: str, **kwargs: Any) -> None:
        self.calls.append((run_id, kwargs["status"]))
        if self.failures:
            self.failures -= 1
            raise StoreError("postgres store at db:5432/test unreachable: restarting")
        await self._store.finish_run(run_id, **kwargs)


@pytest.mark.anyio
async def test_a_run_result_is_kept_through_a_failing_store(tmp_path: Path) -> None:
    """finish_run failing transiently is retried (backoff) until the store takes it: the
    run is recorded done with its outputs, not error, nor left active to run again."""
    flows = make_flows(SIGNUP)
    matcher = RunMatcher(flows)
    async with open_store(tmp_path) as real:
        store = FlakyFinish(real, failures=3)
        actor = SchedulerActor(make_cfg(), store, flows, client=None)  # type: ignore[arg-type]
        async with running(actor):
            event = make_event()
            await real.append(event, runs=matcher(event))
            (run,) = await settled_runs(real, 1)
        assert (run.status, run.outputs, run.error) == ("done", {"greeting": "hello 7"}, None)
        assert store.calls == [(run.run_id, "done")] * 4  # the same result, four times
        assert actor.runs_done == 1 and actor.runs_failed == 0
        assert run.interrupted == 0


@pytest.mark.anyio
async def test_failing_run_is_recorded_as_error(tmp_path: Path) -> None:
    flows = make_flows(FAILING)
    async with open_store(tmp_path) as store:
        actor = SchedulerActor(make_cfg(), store, flows, client=None)
        async with running(actor):
            run_id = await actor.run_now("Failing", {"other": 1})
            (run,) = await settled_runs(store, 1)
            with pytest.raises(UnknownFlowError):
                await actor.run_now("Nope")
        assert run.run_id == run_id
        assert run.status == "error" and run.trigger == "manual"
        assert run.input == {"other": 1}
        assert run.error is not None and "input.missing" in run.error
        found = await store.get_run(run_id)
        assert found is not None
        states = {t.task_id: (t.state, t.error) for t in found[1]}
        assert states["a"] == ("done", None)
        assert states["b"][0] == "error" and "missing" in (states["b"][1] or "")


@pytest.mark.anyio
async def test_concurrency_limits_active_runs(tmp_path: Path) -> None:
    gate = Gate()
    flows = make_flows(GATED.format(policy="rerun"), gate=gate)
    async with open_store(tmp_path) as store:
        await store.create_runs([RunRequest(run_id=new_id(), flow="Gated", trigger="manual")
                                 for _ in range(5)])
        actor = SchedulerActor(make_cfg(concurrency=2), store, flows, client=None)
        async with running(actor):
            async def two_waiting() -> bool:
                return gate.waiting == 2

            await eventually(two_waiting, "two gated runs")
            # The others wait durably as `new`, not claimed into memory.
            assert len(await store.list_runs(status="active")) == 2
            assert len(await store.list_runs(status="new")) == 3
            gate.release.set()
            settled = await settled_runs(store, 5)
        assert gate.max_waiting == 2
        assert {r.status for r in settled} == {"done"}


# -- shutdown and recovery -----------------------------------------------------------------


@pytest.mark.anyio
async def test_request_stop_lets_running_runs_finish(tmp_path: Path) -> None:
    gate = Gate()
    flows = make_flows(GATED.format(policy="rerun"), gate=gate)
    async with open_store(tmp_path) as store:
        actor = SchedulerActor(make_cfg(), store, flows, client=None)
        returned = anyio.Event()

        async def run_actor() -> None:
            await actor.run(ready)
            returned.set()

        ready = ReadySignal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_actor)
            await ready.wait()
            run_id = await actor.run_now("Gated")

            async def gated() -> bool:
                return gate.waiting == 1

            await eventually(gated, "the run to start")
            actor.request_stop()
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set()  # still draining
            # Stopped: a run created now is not claimed.
            late = await store.create_runs([RunRequest(run_id=new_id(), flow="Gated",
                                                       trigger="manual")])
            gate.release.set()
            with anyio.fail_after(DEADLINE):
                await returned.wait()
        found = await store.get_run(run_id)
        assert found is not None and found[0].status == "done"
        late_run = await store.get_run(late[0])
        assert late_run is not None and late_run[0].status == "new"


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["rerun", "fail"])
async def test_cancelled_run_stays_active_and_is_recovered(tmp_path: Path, policy: str) -> None:
    gate = Gate()
    flows = make_flows(GATED.format(policy=policy), gate=gate)
    async with open_store(tmp_path) as store:
        actor = SchedulerActor(make_cfg(), store, flows, client=None)
        async with anyio.create_task_group() as tg:
            ready = ReadySignal()
            tg.start_soon(actor.run, ready)
            await ready.wait()
            run_id = await actor.run_now("Gated")

            async def gated() -> bool:
                return gate.waiting == 1

            await eventually(gated, "the run to start")
            tg.cancel_scope.cancel()  # the supervisor's deadline passed: a hard stop
        found = await store.get_run(run_id)
        assert found is not None
        run, tasks = found
        assert run.status == "active"  # left for recover_runs
        assert {t.task_id: t.state for t in tasks}["wait"] == "cancelled"

        gate.release.set()
        actor2 = SchedulerActor(make_cfg(), store, flows, client=None)
        async with running(actor2):
            (settled,) = await settled_runs(store, 1)
        assert settled.interrupted == 1
        if policy == "rerun":
            assert settled.status == "done"
            found = await store.get_run(run_id)
            assert found is not None
            assert {t.task_id: t.state for t in found[1]} == {"wait": "done", "after": "done"}
        else:
            assert settled.status == "error" and settled.error == "interrupted"


@pytest.mark.anyio
async def test_crashed_active_run_is_rerun_or_failed_by_policy(tmp_path: Path) -> None:
    rerun = make_flows(EVERY_MINUTE.replace("name: Every", "name: Rerun"))
    fail = make_flows(FAILING.replace("name: Failing", "name: Fail\non_interrupt: fail"))
    flows = {**rerun, **fail}
    async with open_store(tmp_path) as store:
        await store.create_runs([RunRequest(run_id="r1", flow="Rerun", trigger="manual"),
                                 RunRequest(run_id="f1", flow="Fail", trigger="manual"),
                                 RunRequest(run_id="g1", flow="Gone", trigger="manual")])
        assert len(await store.claim_runs(limit=10)) == 3  # then the process "crashed"
        actor = SchedulerActor(make_cfg(), store, flows, client=None, clock=FakeClock(T0))
        async with running(actor):
            await settled_runs(store, 3)
        by_id = {r.run_id: r for r in await store.list_runs()}
        assert (by_id["r1"].status, by_id["r1"].interrupted) == ("done", 1)
        assert (by_id["f1"].status, by_id["f1"].error) == ("error", "interrupted")
        assert (by_id["g1"].status, by_id["g1"].error) == ("error", "interrupted")


# -- schedules -----------------------------------------------------------------------------


async def advance_wall(clock: FakeClock, wall: float) -> None:
    """Move *clock* so that ``now()`` is *wall*, waking sleepers in order."""
    await clock.advance_to(clock.monotonic() + (wall - clock.now()))


async def wait_sleeping(clock: FakeClock, n: int = 1) -> None:
    with anyio.fail_after(DEADLINE):
        await clock.wait_for_sleepers(n)


async def ticks(store: EventStore, flow: str) -> list[float]:
    return sorted(r.tick for r in await store.list_runs(flow=flow) if r.tick is not None)


@pytest.mark.anyio
async def test_interval_fires_each_tick_once_across_restarts(tmp_path: Path) -> None:
    flows = make_flows(EVERY_MINUTE)
    async with open_store(tmp_path) as store:
        clock = FakeClock(T0)
        async with running(SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
            assert await store.list_runs() == []  # the first start fires nothing at once
            await advance_wall(clock, FIRST_TICK)
            (run,) = await settled_runs(store, 1)
            await wait_sleeping(clock)
        assert (run.trigger, run.tick, run.status) == ("interval", FIRST_TICK, "done")
        assert run.schedule_key == flows["Every"].schedules[0].key

        # Restart just after the tick: nothing fires again; the next tick fires once.
        clock = FakeClock(FIRST_TICK + 1)
        async with running(SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
            assert await ticks(store, "Every") == [FIRST_TICK]
            await advance_wall(clock, FIRST_TICK + 60)
            await settled_runs(store, 2)
            await wait_sleeping(clock)
            await advance_wall(clock, FIRST_TICK + 120)
            await settled_runs(store, 3)
            await wait_sleeping(clock)
        assert await ticks(store, "Every") == [FIRST_TICK, FIRST_TICK + 60, FIRST_TICK + 120]


@pytest.mark.anyio
async def test_two_schedulers_on_one_store_fire_a_tick_once(tmp_path: Path) -> None:
    flows = make_flows(EVERY_MINUTE)
    async with open_store(tmp_path) as store:
        clock = FakeClock(T0)
        a = SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)
        b = SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)
        async with running(a), running(b):
            await wait_sleeping(clock, 2)
            await advance_wall(clock, FIRST_TICK)
            await wait_sleeping(clock, 2)  # both fired (or found the tick taken) and sleep
            await settled_runs(store, 1)
        assert await ticks(store, "Every") == [FIRST_TICK]
        assert a.ticks_fired + b.ticks_fired == 1


@pytest.mark.anyio
@pytest.mark.parametrize("catch_up", ["none", "one"])
async def test_missed_ticks_follow_catch_up(tmp_path: Path, catch_up: str) -> None:
    flows = make_flows(EVERY_MINUTE)
    cfg = make_cfg(catch_up=catch_up)
    async with open_store(tmp_path) as store:
        clock = FakeClock(T0)
        async with running(SchedulerActor(cfg, store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
            await advance_wall(clock, FIRST_TICK)
            await settled_runs(store, 1)
            await wait_sleeping(clock)

        # Down for ten minutes (ten ticks missed), then two restarts at the same time.
        down_until = FIRST_TICK + 600 + 30
        for _ in range(2):
            clock = FakeClock(down_until)
            async with running(SchedulerActor(cfg, store, flows, client=None, clock=clock)):
                await wait_sleeping(clock)
                if catch_up == "one":
                    await settled_runs(store, 2)
        expected = [FIRST_TICK] + ([FIRST_TICK + 600] if catch_up == "one" else [])
        assert await ticks(store, "Every") == expected

        # Either way the schedule goes on from now.
        clock = FakeClock(down_until)
        async with running(SchedulerActor(cfg, store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
            await advance_wall(clock, FIRST_TICK + 660)
            await settled_runs(store, len(expected) + 1)
            await wait_sleeping(clock)
        assert await ticks(store, "Every") == [*expected, FIRST_TICK + 660]


@pytest.mark.anyio
async def test_cron_fires_on_schedule(tmp_path: Path) -> None:
    flows = make_flows(CRON)
    trigger = flows["Cron"].schedules[0]
    first = trigger.next_after(T0)
    async with open_store(tmp_path) as store:
        clock = FakeClock(T0)
        async with running(SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
            await advance_wall(clock, first - 1)
            await wait_sleeping(clock)
            assert await store.list_runs() == []
            await advance_wall(clock, first + 1)
            (run,) = await settled_runs(store, 1)
            await wait_sleeping(clock)
        assert (run.trigger, run.tick) == ("cron", first)
        assert first % 300 == 0  # */5 in UTC: on a five-minute boundary

        clock = FakeClock(first + 2)
        async with running(SchedulerActor(make_cfg(), store, flows, client=None, clock=clock)):
            await wait_sleeping(clock)
        assert await ticks(store, "Cron") == [first]


# -- kill -9 acceptance (needs the wired daemon) -------------------------------------------

KILL_FLOW = """
name: OnHook
triggers:
  - event: {source: "*", type: "order.*"}
tasks:
  - {id: hold, type: sleep, config: {duration: 0.5}}
  - {id: done, type: set, dependencies: [hold], config: {values: {id: "${event.payload.n}"}}}
"""


def _daemon_wires_scheduler() -> bool:
    wiring = Path(__file__).parent.parent / "mfo_actors" / "daemon" / "_wiring.py"
    text = wiring.read_text(encoding="utf-8")
    return "SchedulerActor" in text and "RunMatcher" in text


def _runs_json(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "mfo_actors", "runs", "list", "--config", str(config), "--json",
         "--limit", "1000"], capture_output=True, text=True, check=True, timeout=60)
    return list(json.loads(out.stdout))


def post_event(port: int, n: int) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhook", data=json.dumps({"n": n}).encode(),
        headers={"Content-Type": "application/json", "X-Event-Type": "order.created"},
        method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
        return str(json.loads(resp.read())["id"])


def kill9_triggered_runs_survive(tmp_path: Path, *, events: int = 20) -> None:
    """Accepted events with a matching flow -> kill -9 mid-run -> after a restart every
    triggered run exists (one per event) and finishes ``done``."""
    port = free_port()
    config = write_config(tmp_path, webhook_listener={"host": "127.0.0.1", "port": port,
                                                      "path": "/webhook"})
    (tmp_path / "flows" / "onhook.yaml").write_text(KILL_FLOW, encoding="utf-8")
    with running_daemon(config) as daemon:
        daemon.wait_event("listener.started")  # it starts after the scheduler
        ids = [post_event(port, n) for n in range(events)]
        daemon.wait_event("scheduler.run_started")
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit()
    runs = _runs_json(config)
    assert sorted(r["event_id"] for r in runs) == sorted(ids)  # none lost
    assert any(r["status"] != "done" for r in runs)  # the kill did interrupt something
    with running_daemon(config) as daemon:
        daemon.wait_event("scheduler.started")

        def all_done() -> bool:
            return all(r["status"] == "done" for r in _runs_json(config))

        wait_for(all_done, deadline=60, what="every triggered run to finish")
    runs = _runs_json(config)
    assert sorted(r["event_id"] for r in runs) == sorted(ids)  # and none doubled


@pytest.mark.slow
@pytest.mark.skipif(not _daemon_wires_scheduler(), reason="daemon does not wire the scheduler")
def test_kill9_keeps_every_triggered_run(tmp_path: Path) -> None:
    kill9_triggered_runs_survive(tmp_path)
