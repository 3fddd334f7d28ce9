"""The circuit breaker: transitions on a fake clock, fail-fast while open, waiting for a probe."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from mfo_actors.client._breaker import CircuitBreaker
from mfo_actors.client.errors import CircuitBreakerError
from mfo_actors.config import CircuitBreakerConfig, Duration
from mfo_actors.messages import BreakerState
from mfo_actors.metrics import BREAKER_STATE
from mfo_actors.runtime import FakeClock

pytestmark = pytest.mark.anyio


def make(
    clock: FakeClock, *, threshold: int = 3, reset: float = 10.0, probes: int = 1
) -> tuple[CircuitBreaker, list[BreakerState]]:
    changes: list[BreakerState] = []
    cfg = CircuitBreakerConfig(
        failure_threshold=threshold, reset_timeout=Duration(reset), half_open_max_calls=probes
    )
    return CircuitBreaker("up", cfg, clock=clock, on_change=changes.append, instance="t"), changes


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        b.before_call()
        b.record(ok=False, failure=True, status=503)


def gauge(upstream: str = "up") -> float:
    return float(BREAKER_STATE.labels(instance="t", upstream=upstream)._value.get())


def state_of(b: CircuitBreaker) -> str:
    """The state, widened to str so the checker does not narrow it between calls."""
    return b.state


class TestTransitions:
    async def test_opens_after_threshold_consecutive_failures(self) -> None:
        """failure_threshold failures in a row open it; fewer do not."""
        clock = FakeClock()
        b, changes = make(clock)
        fail(b, 2)
        assert state_of(b) == "closed"
        fail(b)
        assert state_of(b) == "open"
        assert [c.state for c in changes] == ["open"]
        assert changes[0].retry_at == pytest.approx(clock.now() + 10.0)
        assert gauge() == 2

    async def test_success_resets_the_failure_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        b, _ = make(FakeClock())
        fail(b, 2)
        b.before_call()
        b.record(ok=True, failure=False, status=200)
        fail(b, 2)
        assert state_of(b) == "closed"

    async def test_4xx_is_not_a_failure(self) -> None:
        """A 400 is the caller's fault: it never opens the breaker."""
        b, _ = make(FakeClock())
        for _ in range(10):
            b.before_call()
            b.record(ok=False, failure=False, status=400)
        assert state_of(b) == "closed"

    async def test_open_fails_fast_until_reset_timeout(self) -> None:
        """While open, before_call raises at once with the seconds left until the probe."""
        clock = FakeClock()
        b, _ = make(clock)
        fail(b, 3)
        clock.advance(4.0)
        with pytest.raises(CircuitBreakerError) as info:
            b.before_call()
        assert info.value.state == "open"
        assert info.value.retry_in == pytest.approx(6.0)
        assert info.value.upstream == "up"

    async def test_half_open_probe_success_closes(self) -> None:
        """After reset_timeout one probe goes through; its success closes the breaker."""
        clock = FakeClock()
        b, changes = make(clock)
        fail(b, 3)
        clock.advance(10.0)
        b.before_call()
        assert state_of(b) == "half_open"
        assert gauge() == 1
        with pytest.raises(CircuitBreakerError) as info:
            b.before_call()  # only one probe slot
        assert info.value.state == "half_open"
        b.record(ok=True, failure=False, status=200)
        assert state_of(b) == "closed"
        assert gauge() == 0
        assert [c.state for c in changes] == ["open", "half_open", "closed"]
        b.before_call()  # closed: anything goes

    async def test_half_open_probe_failure_reopens_for_another_timeout(self) -> None:
        """A failed probe opens the breaker again for a full reset_timeout."""
        clock = FakeClock()
        b, changes = make(clock)
        fail(b, 3)
        clock.advance(10.0)
        fail(b)
        assert state_of(b) == "open"
        clock.advance(9.0)
        with pytest.raises(CircuitBreakerError):
            b.before_call()
        clock.advance(1.0)
        b.before_call()
        assert state_of(b) == "half_open"
        assert [c.state for c in changes] == ["open", "half_open", "open", "half_open"]

    async def test_half_open_allows_configured_number_of_probes(self) -> None:
        """half_open_max_calls probes may be in flight at once, no more."""
        clock = FakeClock()
        b, _ = make(clock, probes=3)
        fail(b, 3)
        clock.advance(10.0)
        for _ in range(3):
            b.before_call()
        with pytest.raises(CircuitBreakerError):
            b.before_call()

    async def test_outcomes_while_open_do_not_extend_timeout(self) -> None:
        """Late failures of calls started before opening leave the probe time alone."""
        clock = FakeClock()
        b, _ = make(clock)
        for _ in range(5):
            b.before_call()  # five calls in flight when the upstream dies
        for _ in range(5):
            clock.advance(1.0)
            b.record(ok=False, failure=True, status=None)
        assert state_of(b) == "open"
        assert b.retry_in() == pytest.approx(10.0 - 2.0)

    async def test_lost_probe_is_given_up_after_reset_timeout(self) -> None:
        """A probe whose caller never reports does not wedge the breaker half-open."""
        clock = FakeClock()
        b, _ = make(clock)
        fail(b, 3)
        clock.advance(10.0)
        b.before_call()  # probe taken, never recorded
        clock.advance(10.0)
        b.before_call()  # the slot was freed
        assert state_of(b) == "half_open"

    async def test_state_change_is_logged(self) -> None:
        """Every transition is a breaker.state_changed log line."""
        b, _ = make(FakeClock())
        with capture_logs() as logs:
            fail(b, 3)
        changed = [e for e in logs if e["event"] == "breaker.state_changed"]
        assert changed and changed[0]["state"] == "open" and changed[0]["upstream"] == "up"


class TestWaiting:
    async def test_wait_until_callable_sleeps_until_reset_timeout(self) -> None:
        """The waiter sleeps on the clock (no polling) and wakes when the probe is allowed."""
        clock = FakeClock()
        b, _ = make(clock)
        fail(b, 3)
        woke = anyio.Event()

        async def waiter() -> None:
            await b.wait_until_callable()
            woke.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await clock.wait_for_sleepers(1)
                assert clock.next_deadline == pytest.approx(10.0)
                await clock.advance_to(9.9)
                assert not woke.is_set()
                await clock.advance_to(10.0)
                await woke.wait()
        b.before_call()
        assert state_of(b) == "half_open"

    async def test_wait_until_callable_wakes_when_probe_reports(self) -> None:
        """With the only probe out, a waiter wakes as soon as the probe closes the breaker."""
        clock = FakeClock()
        b, _ = make(clock)
        fail(b, 3)
        clock.advance(10.0)
        b.before_call()
        woke = anyio.Event()

        async def waiter() -> None:
            await b.wait_until_callable()
            woke.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await clock.wait_for_sleepers(1)
                assert not woke.is_set()
                b.record(ok=True, failure=False, status=200)
                await woke.wait()
        assert state_of(b) == "closed"

    async def test_slow_start_window_limits_calls_in_flight(self) -> None:
        """Until threshold calls in a row succeeded, no more calls start than could open it."""
        clock = FakeClock()
        b, _ = make(clock, threshold=3)
        assert b.allowance() == 3  # fresh: as many as it takes to open
        for _ in range(3):
            b.before_call()
        assert b.allowance() == 0
        b.record(ok=True, failure=False, status=200)
        assert b.allowance() == 2  # one done, one more success: window 4, 2 in flight
        b.record(ok=True, failure=False, status=200)
        b.record(ok=True, failure=False, status=200)
        assert b.allowance() is None  # three in a row: no limit
        b.before_call()
        b.record(ok=False, failure=True, status=503)
        assert b.allowance() == 2
        b.before_call()
        b.before_call()
        assert b.allowance() == 0
        woke = anyio.Event()

        async def waiter() -> None:
            await b.wait_until_callable()
            woke.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert not woke.is_set()
                b.record(ok=True, failure=False, status=200)  # a success: window opens
                await woke.wait()
        b.before_call()  # before_call itself never refuses while closed
        b.before_call()
        assert state_of(b) == "closed"

    async def test_wait_returns_at_once_when_closed(self) -> None:
        """The healthy path costs nothing."""
        b, _ = make(FakeClock())
        for _ in range(5):
            b.before_call()
            b.record(ok=True, failure=False, status=200)
        assert b.allowance() is None
        with anyio.fail_after(1):
            await b.wait_until_callable()
