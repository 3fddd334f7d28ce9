"""SystemClock and FakeClock (mfo_actors.runtime)."""

from __future__ import annotations

import time

import anyio
import pytest

from mfo_actors.runtime import Clock, FakeClock, SystemClock

pytestmark = pytest.mark.anyio


class TestSystemClock:
    async def test_follows_the_event_loop_and_wall_clock(self) -> None:
        """monotonic is the loop's clock, now is Unix time, sleep really waits."""
        clock = SystemClock()
        assert isinstance(clock, Clock)
        assert abs(clock.now() - time.time()) < 5
        t0 = clock.monotonic()
        await clock.sleep(0.01)
        assert clock.monotonic() - t0 >= 0.009
        await clock.sleep_until(clock.monotonic() + 0.01)


class TestFakeClock:
    async def test_time_only_moves_when_told(self) -> None:
        """now and monotonic stand still until advance, then move together."""
        clock = FakeClock(start=100.0)
        assert isinstance(clock, Clock)
        assert (clock.monotonic(), clock.now()) == (0.0, 100.0)
        clock.advance(2.5)
        assert (clock.monotonic(), clock.now()) == (2.5, 102.5)
        with pytest.raises(ValueError):
            clock.advance(-1)

    async def test_sleeper_wakes_only_after_its_deadline(self) -> None:
        """advance wakes a sleeper whose deadline passed, and not before."""
        clock = FakeClock()
        woke = anyio.Event()

        async def sleeper() -> None:
            await clock.sleep(10)
            woke.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            with anyio.fail_after(5):
                await clock.wait_for_sleepers(1)
            clock.advance(9.9)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert not woke.is_set()
            assert clock.sleepers == 1
            clock.advance(0.1)
            with anyio.fail_after(5):
                await woke.wait()
        assert clock.sleepers == 0

    async def test_advance_to_wakes_in_deadline_order(self) -> None:
        """Sleepers wake in deadline order (ties by arrival), each at its own deadline."""
        clock = FakeClock()
        order: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            order.append((name, clock.monotonic()))

        async with anyio.create_task_group() as tg:
            plan = [("c", 3.0), ("a", 1.0), ("d", 3.0), ("b", 2.0), ("z", 50.0)]
            for i, (name, seconds) in enumerate(plan):
                tg.start_soon(sleeper, name, seconds)
                with anyio.fail_after(5):
                    await clock.wait_for_sleepers(i + 1)  # so "c" is queued before "d"
            assert clock.next_deadline == 1.0
            with anyio.fail_after(5):
                await clock.advance_to(10.0)
            assert order == [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 3.0)]
            assert clock.monotonic() == 10.0
            assert clock.sleepers == 1
            tg.cancel_scope.cancel()
        assert clock.sleepers == 0  # the cancelled sleeper left the queue

    async def test_advance_to_follows_a_sleeper_that_sleeps_again(self) -> None:
        """A periodic task gets every tick up to the target, in time order."""
        clock = FakeClock()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                await clock.sleep(1.0)
                ticks.append(clock.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            with anyio.fail_after(5):
                await clock.wait_for_sleepers(1)
                await clock.advance_to(3.5)
            assert ticks == [1.0, 2.0, 3.0]
            tg.cancel_scope.cancel()

    async def test_sync_advance_wakes_all_due(self) -> None:
        """advance wakes every sleeper whose deadline passed, leaving later ones asleep."""
        clock = FakeClock()
        woke: set[float] = set()

        async def sleeper(seconds: float) -> None:
            await clock.sleep(seconds)
            woke.add(seconds)

        async with anyio.create_task_group() as tg:
            for s in (1.0, 2.0, 5.0):
                tg.start_soon(sleeper, s)
            with anyio.fail_after(5):
                await clock.wait_for_sleepers(3)
            clock.advance(2.0)
            with anyio.fail_after(5):
                await clock.wait_for_sleepers(0)
                while len(woke) < 2:
                    await anyio.lowlevel.checkpoint()
            assert woke == {1.0, 2.0}
            assert clock.sleepers == 1
            tg.cancel_scope.cancel()

    async def test_past_deadline_returns_at_once(self) -> None:
        """sleep(0) and a past deadline do not wait (but are checkpoints)."""
        clock = FakeClock()
        clock.advance(5)
        with anyio.fail_after(5):
            await clock.sleep(0)
            await clock.sleep_until(1.0)
        assert clock.sleepers == 0
        with pytest.raises(ValueError):
            await clock.advance_to(1.0)

