"""The summary actor: one info line per interval with what changed, silent when idle."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest
from structlog.testing import capture_logs

from mfo_actors.actors.summary import STUCK_EVERY, SummaryActor
from mfo_actors.config import load_config_text
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.metrics import EVENTS_FORWARDED, EVENTS_RECEIVED, EVENTS_REJECTED
from mfo_actors.runtime import FakeClock, ReadySignal
from mfo_actors.store import open_sqlite_store

pytestmark = pytest.mark.anyio


async def tick(clock: FakeClock, seconds: float) -> None:
    """Move time on and let the actor finish its report (it is asleep again)."""
    await clock.advance_to(clock.monotonic() + seconds)
    with anyio.fail_after(5):
        await clock.wait_for_sleepers(1)


async def start(tg: anyio.abc.TaskGroup, actor: SummaryActor, clock: FakeClock) -> None:
    """Run *actor* in *tg* until it sleeps through its first interval."""
    tg.start_soon(actor.run, ReadySignal())
    with anyio.fail_after(5):
        await clock.wait_for_sleepers(1)


async def test_one_line_per_interval_only_when_something_changed(tmp_path: Path) -> None:
    instance = f"sum{new_id().lower()}"  # metric labels of its own
    cfg = load_config_text(f"instance: {instance}\nlogging: {{summary_interval: 10s}}\n")
    clock = FakeClock()
    EVENTS_RECEIVED.labels(instance, "github").inc(7)  # before start: not news
    async with open_sqlite_store(tmp_path / "s.db", clock=clock.now) as store:
        actor = SummaryActor(cfg, store, clock=clock)
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await start(tg, actor, clock)
                await tick(clock, 10)
                assert logs == []  # idle: silent

                EVENTS_RECEIVED.labels(instance, "github").inc(3)
                EVENTS_FORWARDED.labels(instance).inc(2)
                EVENTS_REJECTED.labels(instance, "github", "signature").inc()
                EVENTS_REJECTED.labels(instance, "github", "duplicate").inc(4)
                await store.append(Event(id=new_id(), source="github", type="push",
                                         received_at=clock.now(), headers={}, body=b"{}"))
                await tick(clock, 10)
                await tick(clock, 10)  # nothing new: no second line
                actor.request_stop()
    assert [
        {k: v for k, v in e.items() if k not in ("log_level", "interval_s")} for e in logs
    ] == [{"event": "instance.summary", "received": 3, "delivered": 2, "retried": 0,
           "dead": 0, "rejected": 1, "pending": 1, "oldest_pending_s": 10.0}]
    assert logs[0]["log_level"] == "info"


async def test_zero_interval_turns_it_off(tmp_path: Path) -> None:
    cfg = load_config_text("logging: {summary_interval: 0}\n")
    clock = FakeClock()
    async with open_sqlite_store(tmp_path / "s.db") as store:
        actor = SummaryActor(cfg, store, clock=clock)
        ready = ReadySignal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run, ready)
            await ready.wait()
            assert clock.sleepers == 0
            actor.request_stop()


async def test_a_stuck_backlog_is_still_reported(tmp_path: Path) -> None:
    """An outage with no new traffic moves no counter and leaves pending as it was: the line
    still comes every STUCK_EVERY intervals, with the oldest pending age growing."""
    instance = f"sum{new_id().lower()}"
    cfg = load_config_text(f"instance: {instance}\nlogging: {{summary_interval: 10s}}\n")
    clock = FakeClock()
    async with open_sqlite_store(tmp_path / "s.db", clock=clock.now) as store:
        await store.append(Event(id=new_id(), source="github", type="push",
                                 received_at=clock.now(), headers={}, body=b"{}"))
        actor = SummaryActor(cfg, store, clock=clock)
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await start(tg, actor, clock)
                for _ in range(2 * STUCK_EVERY + 1):
                    await tick(clock, 10)
                actor.request_stop()
    ages = [e["oldest_pending_s"] for e in logs if e["event"] == "instance.summary"]
    interval = 10.0 * STUCK_EVERY
    assert ages == [10.0, 10.0 + interval, 10.0 + 2 * interval]  # first: the backlog found
    assert all(e["pending"] == 1 for e in logs)
