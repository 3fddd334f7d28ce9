"""The token bucket: burst then steady rate, FIFO waiters, no busy waiting, real-time rate."""

from __future__ import annotations

import anyio
import pytest

from mfo_actors.client._ratelimit import TokenBucket
from mfo_actors.runtime import FakeClock

pytestmark = pytest.mark.anyio


async def test_burst_goes_at_once_then_one_per_interval() -> None:
    """A full bucket lets `burst` calls through without waiting; the next waits 1/rate."""
    clock = FakeClock()
    bucket = TokenBucket(10, 3, clock=clock)
    with anyio.fail_after(5):
        for _ in range(3):
            await bucket.acquire()
        assert clock.monotonic() == 0.0
        done = anyio.Event()

        async def fourth() -> None:
            await bucket.acquire()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(fourth)
            await clock.wait_for_sleepers(1)
            # One computed sleep for exactly one token's worth of time: no polling.
            assert clock.next_deadline == pytest.approx(0.1)
            await clock.advance_to(0.1)
            await done.wait()


async def test_waiters_are_served_in_arrival_order() -> None:
    """Fair: callers get their tokens first come, first served."""
    clock = FakeClock()
    bucket = TokenBucket(1, 1, clock=clock)
    order: list[int] = []
    with anyio.fail_after(5):
        await bucket.acquire()  # empty the bucket

        async def caller(i: int, started: anyio.Event) -> None:
            started.set()
            await bucket.acquire()
            order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                started = anyio.Event()
                tg.start_soon(caller, i, started)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
            for step in range(1, 6):
                await clock.wait_for_sleepers(1)
                await clock.advance_to(float(step))
                while len(order) < step:
                    await anyio.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]


async def test_refill_is_capped_at_burst() -> None:
    """A long quiet spell saves up at most `burst` tokens."""
    clock = FakeClock()
    bucket = TokenBucket(100, 5, clock=clock)
    assert bucket.available() == 5
    await bucket.acquire()
    clock.advance(60.0)
    assert bucket.available() == 5
    assert bucket.try_acquire()
    assert bucket.available() == pytest.approx(4)


async def test_cancelled_waiter_takes_nothing() -> None:
    """A caller cancelled while waiting leaves the token for the next caller."""
    clock = FakeClock()
    bucket = TokenBucket(1, 1, clock=clock)
    await bucket.acquire()
    with anyio.move_on_after(0.05):
        await bucket.acquire()  # never advanced: times out on the real clock
    clock.advance(1.0)
    assert bucket.try_acquire()


def test_rejects_nonsense() -> None:
    """A rate of 0 or a burst below 1 is a programming error, caught at construction."""
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(10, 0)
    assert TokenBucket(0.5).burst == 1


async def test_real_rate_holds() -> None:
    """On the real clock, 40 calls at 200/s with burst 10 take at least 30/200 s."""
    bucket = TokenBucket(200, 10)
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(bucket.acquire)
    elapsed = anyio.current_time() - start
    assert elapsed >= 30 / 200 - 0.005
    assert elapsed < 1.0
