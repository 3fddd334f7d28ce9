"""The retention actor prunes old delivered events, hourly, and keeps everything else."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mfo_actors.actors.retention import PRUNE_INTERVAL, RetentionActor
from mfo_actors.config import load_config_text
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.runtime import FakeClock, ReadySignal
from mfo_actors.store import EventStore, open_sqlite_store
from tests.helpers import poll

pytestmark = pytest.mark.anyio

DAY = 86400.0


def event(received_at: float, source: str = "s") -> Event:
    return Event(id=new_id(), source=source, type="t", received_at=received_at, headers={},
                 body=b"{}")


async def deliver(store: EventStore, ev: Event) -> None:
    await store.append(ev)
    claimed = {c.event.id: c for c in await store.claim_due(limit=10, lease=30)}
    await store.mark_delivered(ev.id, claimed[ev.id].claim_token or "")


async def test_old_delivered_events_are_pruned_at_start_and_every_interval(
    tmp_path: Path,
) -> None:
    """Delivered past retention: gone at start, and again one interval later; pending stays."""
    now = [1_000_000.0]
    cfg = load_config_text("store: {retention: 1d}\n")
    clock = FakeClock()
    async with open_sqlite_store(tmp_path / "s.db", clock=lambda: now[0],
                                 dedupe_window=60) as store:
        first = event(now[0])
        await deliver(store, first)
        waiting = event(now[0])
        await store.append(waiting)
        now[0] += DAY + 1  # `first` is now past retention
        actor = RetentionActor(cfg, store, clock=clock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run, ReadySignal())
            with anyio.fail_after(10):
                await clock.wait_for_sleepers(1)
            assert actor.pruned == 1
            assert await store.get_event(first.id) is None
            assert await store.get_event(waiting.id) is not None  # pending: never pruned

            second = event(now[0], source="other")  # `waiting` would block its own source
            await deliver(store, second)  # (claims `waiting` too, and leaves it undelivered)
            now[0] += DAY + 1
            await clock.advance_to(clock.monotonic() + PRUNE_INTERVAL)
            await poll(lambda: actor.pruned == 2)
            assert await store.get_event(second.id) is None
            assert await store.get_event(waiting.id) is not None
            actor.request_stop()


async def test_zero_retention_keeps_everything(tmp_path: Path) -> None:
    """`retention: 0` never prunes; the actor just waits for its stop."""
    cfg = load_config_text("store: {retention: 0}\n")
    async with open_sqlite_store(tmp_path / "s.db") as store:
        actor = RetentionActor(cfg, store, clock=FakeClock())
        ready = ReadySignal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run, ready)
            await ready.wait()
            actor.request_stop()
        assert actor.pruned == 0


async def test_sessions_closed_past_retention_are_pruned(tmp_path: Path) -> None:
    """Closed sessions go with the same retention as delivered events; active ones stay."""
    now = [1_000_000.0]
    cfg = load_config_text("store: {retention: 1d}\n")
    async with open_sqlite_store(tmp_path / "s.db", clock=lambda: now[0]) as store:
        await store.open_session("gone", thread_id="t1", ttl=60, max_active=10)
        await store.close_session("gone")
        await store.open_session("idle", thread_id="t2", ttl=10 * DAY, max_active=10)
        now[0] += DAY + 1
        actor = RetentionActor(cfg, store, clock=FakeClock())
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run, ReadySignal())
            await poll(lambda: actor.pruned_sessions == 1)
            actor.request_stop()
        assert [s.key for s in await store.list_sessions()] == ["idle"]
