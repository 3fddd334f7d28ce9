"""The one-for-one supervisor: start order, restarts, intensity, shutdown (mfo_actors.runtime)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from mfo_actors.errors import UserError
from mfo_actors.runtime import (
    Actor,
    ActorStatus,
    ChannelReceiver,
    ChannelSender,
    FakeClock,
    ReadySignal,
    RestartPolicy,
    Supervisor,
    SupervisorGaveUp,
    open_channel,
)
from mfo_actors.runtime import _supervisor as supervisor_module
from tests.helpers import poll

pytestmark = pytest.mark.anyio

WAIT = 5.0  # upper bound for anything that should happen "now"; only hit when a test fails


class Boom(RuntimeError):
    """The crash our test actors raise on purpose."""


class Job(msgspec.Struct, frozen=True):
    n: int


class Worker:
    """A test actor: becomes ready (optionally after a gate), then waits for stop or a crash.

    Everything it does is appended to the shared *journal* as (event, name).
    """

    def __init__(
        self,
        name: str,
        journal: list[tuple[str, str]],
        *,
        restart: RestartPolicy | None = None,
        gate: anyio.Event | None = None,
        ignore_stop: bool = False,
        crash_at_start: bool = False,
        return_at_start: bool = False,
    ) -> None:
        self.name = name
        self.restart = restart or RestartPolicy()
        self.journal = journal
        self.gate = gate
        self.ignore_stop = ignore_stop
        self.crash_at_start = crash_at_start
        self.return_at_start = return_at_start
        self.runs = 0
        self._stop = anyio.Event()
        self._crash = anyio.Event()

    async def run(self, ready: ReadySignal) -> None:
        self.runs += 1
        self._stop = anyio.Event()
        self._crash = anyio.Event()
        self.journal.append(("run", self.name))
        if self.crash_at_start:
            raise Boom(f"{self.name} failed to start (run {self.runs})")
        if self.gate is not None:
            await self.gate.wait()
        ready.set()
        ready.set()  # idempotent
        if self.return_at_start:
            return
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._crash_watch, tg)
                if self.ignore_stop:
                    await anyio.sleep_forever()
                await self._stop.wait()
                tg.cancel_scope.cancel()
            self.journal.append(("stopped", self.name))
        except anyio.get_cancelled_exc_class():
            self.journal.append(("cancelled", self.name))
            raise

    async def _crash_watch(self, tg: Any) -> None:
        await self._crash.wait()
        raise Boom(f"{self.name} crashed (run {self.runs})")

    def crash(self) -> None:
        self._crash.set()

    def request_stop(self) -> None:
        self.journal.append(("stop_requested", self.name))
        self._stop.set()


class Echo:
    """A sibling that keeps serving requests; proves it survives other actors' crashes."""

    name = "echo"
    restart = RestartPolicy("permanent")

    def __init__(self, requests: ChannelReceiver[Job], replies: ChannelSender[Job]) -> None:
        self.requests = requests
        self.replies = replies
        self.runs = 0

    async def run(self, ready: ReadySignal) -> None:
        self.runs += 1
        ready.set()
        structlog.get_logger("test").info("echo.serving")
        async for job in self.requests:
            await self.replies.send(Job(job.n * 10))

    def request_stop(self) -> None:
        self.requests.close()


async def wait_state(sup: Supervisor, name: str, state: str) -> ActorStatus:
    """Poll (with a deadline) until *name* is in *state*."""
    with anyio.fail_after(WAIT):
        while sup.statuses()[name].state != state:
            await anyio.lowlevel.checkpoint()
    return sup.statuses()[name]


async def wait_runs(sup: Supervisor, worker: Worker, runs: int) -> None:
    """Poll (with a deadline) until *worker* is ready in its *runs*-th run."""
    with anyio.fail_after(WAIT):
        while worker.runs < runs or sup.statuses()[worker.name].state != "ready":
            await anyio.lowlevel.checkpoint()
    assert worker.runs == runs


def only_error(exc: BaseException) -> BaseException:
    """The single error inside (possibly nested) task-group exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        assert len(exc.exceptions) == 1, exc
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Run *sup* until the block ends, then shut it down and wait for run to return."""
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(WAIT):
            await tg.start(sup.run)
        yield tg
        sup.shutdown(WAIT)


def test_actor_protocol_accepts_plain_attributes() -> None:
    """A class with name/restart attributes and the two methods is an Actor."""
    assert isinstance(Worker("w", []), Actor)
    assert isinstance(Echo.__new__(Echo), Actor)
    with pytest.raises(ValueError):
        RestartPolicy("sometimes")  # type: ignore[arg-type]


class TestStartup:
    async def test_start_order_waits_for_readiness(self) -> None:
        """The next actor starts only once the previous one called ready.set()."""
        journal: list[tuple[str, str]] = []
        gate = anyio.Event()
        a, b = Worker("a", journal, gate=gate), Worker("b", journal)
        sup = Supervisor([a, b])
        started = anyio.Event()

        async def start() -> None:
            await tg.start(sup.run)
            started.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await wait_state(sup, "a", "starting")
            with anyio.fail_after(WAIT):
                while a.runs == 0:
                    await anyio.lowlevel.checkpoint()
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert b.runs == 0, "b started before a was ready"
            assert not started.is_set() and not sup.ready.is_set()
            assert sup.statuses()["b"].state == "starting"
            gate.set()
            with anyio.fail_after(WAIT):
                await started.wait()
            assert sup.ready.is_set()
            assert {n: s.state for n, s in sup.statuses().items()} == {"a": "ready", "b": "ready"}
            assert journal == [("run", "a"), ("run", "b")]
            sup.shutdown(WAIT)

    async def test_actor_not_ready_in_time_is_a_crash(self) -> None:
        """start_timeout cancels a hung start; by policy it is failed and startup moves on."""
        journal: list[tuple[str, str]] = []
        hung = Worker("hung", journal, gate=anyio.Event(), restart=RestartPolicy("temporary"))
        after = Worker("after", journal)
        sup = Supervisor([hung, after], start_timeout=0.05)
        async with running(sup):
            status = sup.statuses()["hung"]
            assert status.state == "failed"
            assert status.last_error is not None and "TimeoutError" in status.last_error
            assert sup.statuses()["after"].state == "ready"

    async def test_gave_up_during_startup_raises_from_start(self) -> None:
        """An actor that never manages to start makes tg.start raise SupervisorGaveUp."""
        journal: list[tuple[str, str]] = []
        first = Worker("first", journal)
        broken = Worker("broken", journal, crash_at_start=True)
        never = Worker("never", journal)
        sup = Supervisor([first, broken, never], max_restarts=2, backoff_initial=0.0)
        with anyio.fail_after(WAIT), pytest.raises(BaseException) as info:
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
        err = only_error(info.value)
        assert isinstance(err, SupervisorGaveUp)
        assert err.actor == "broken" and err.restarts == 3
        assert isinstance(err.__cause__, Boom)
        assert broken.runs == 3 and never.runs == 0
        assert ("stopped", "first") in journal
        assert sup.statuses()["never"].state == "stopped"
        assert sup.statuses()["broken"].state == "failed"


class TestRestarts:
    async def test_crashed_actor_is_restarted_while_sibling_keeps_working(self) -> None:
        """One-for-one: a crash restarts only that actor, after backoff; echo keeps serving."""
        clock = FakeClock()
        journal: list[tuple[str, str]] = []
        req_send, req_recv = open_channel(Job, 1)
        rep_send, rep_recv = open_channel(Job, 1)
        echo = Echo(req_recv, rep_send)
        crasher = Worker("crasher", journal)
        sup = Supervisor([echo, crasher], clock=clock, backoff_initial=0.5)

        async def ask(n: int) -> int:
            with anyio.fail_after(WAIT):
                await req_send.send(Job(n))
                return (await rep_recv.receive()).n

        with capture_logs(processors=[merge_contextvars]) as logs, \
                req_send, req_recv, rep_send, rep_recv:
            async with running(sup):
                assert await ask(1) == 10
                crasher.crash()
                status = await wait_state(sup, "crasher", "restarting")
                assert status.restarts == 1
                assert status.last_error is not None and "Boom" in status.last_error
                with anyio.fail_after(WAIT):
                    await clock.wait_for_sleepers(1)
                assert await ask(2) == 20  # during the backoff
                assert crasher.runs == 1
                clock.advance(0.49)
                assert crasher.runs == 1 and clock.sleepers == 1
                clock.advance(0.01)
                await wait_state(sup, "crasher", "ready")
                assert crasher.runs == 2
                assert await ask(3) == 30  # and after
                assert echo.runs == 1, "the sibling was restarted too"
                assert sup.statuses()["echo"].state == "ready"
        events = [(e["event"], e.get("actor")) for e in logs]
        assert ("actor.crashed", "crasher") in events
        assert ("echo.serving", "echo") in events  # the actor's own lines carry its name
        scheduled = [e for e in logs if e["event"] == "actor.restart_scheduled"]
        assert [(e["actor"], e["attempt"], e["wait_s"]) for e in scheduled] == [
            ("crasher", 1, 0.5)
        ]
        crashed = next(e for e in logs if e["event"] == "actor.crashed")
        assert "Boom" in crashed["error"]
        ready = [e["actor"] for e in logs if e["event"] == "actor.ready"]
        assert ready == ["echo", "crasher", "crasher"]
        assert {e["actor"] for e in logs if e["event"] == "actor.started"} == {"echo", "crasher"}

    async def test_backoff_doubles_up_to_max(self) -> None:
        """Each further restart of the same actor waits twice as long, capped."""
        clock = FakeClock()
        journal: list[tuple[str, str]] = []
        w = Worker("w", journal)
        sup = Supervisor(
            [w], clock=clock, backoff_initial=1.0, backoff_max=3.0, max_restarts=10
        )
        waits: list[float] = []
        async with running(sup):
            for run in range(1, 5):
                await wait_runs(sup, w, run)
                w.crash()
                with anyio.fail_after(WAIT):
                    await clock.wait_for_sleepers(1)
                deadline = clock.next_deadline
                assert deadline is not None
                waits.append(deadline - clock.monotonic())
                await clock.advance_to(deadline)
        assert waits == [1.0, 2.0, 3.0, 3.0]

    async def test_transient_restarts_on_crash_only(self) -> None:
        """transient: a crash restarts it; returning normally leaves it stopped."""
        journal: list[tuple[str, str]] = []
        w = Worker("t", journal, restart=RestartPolicy("transient"))
        sup = Supervisor([w], backoff_initial=0.0)
        async with running(sup):
            w.crash()
            await wait_state(sup, "t", "ready")
            with anyio.fail_after(WAIT):
                while w.runs < 2:
                    await anyio.lowlevel.checkpoint()
            w.return_at_start = True
            w.crash()
            await wait_state(sup, "t", "stopped")
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert w.runs == 3
            assert sup.statuses()["t"].restarts == 2

    async def test_permanent_restarts_after_normal_return(self) -> None:
        """permanent: even a normal return is followed by a restart."""
        journal: list[tuple[str, str]] = []
        w = Worker("p", journal, return_at_start=True)
        sup = Supervisor([w], backoff_initial=0.0, max_restarts=100, within=1e-9)
        async with running(sup):
            with anyio.fail_after(WAIT):
                while w.runs < 3:
                    await anyio.lowlevel.checkpoint()
            w.return_at_start = False

    async def test_temporary_is_never_restarted(self) -> None:
        """temporary: a crash leaves it failed with the error; siblings are untouched."""
        journal: list[tuple[str, str]] = []
        w = Worker("tmp", journal, restart=RestartPolicy("temporary"))
        other = Worker("other", journal)
        sup = Supervisor([other, w], backoff_initial=0.0)
        async with running(sup):
            w.crash()
            status = await wait_state(sup, "tmp", "failed")
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert w.runs == 1 and status.restarts == 0
            # a crash out of the actor's task group is shown as the one error inside it
            assert status.last_error == "Boom('tmp crashed (run 1)')"
            assert sup.statuses()["other"].state == "ready"
        assert ("stopped", "other") in journal

    async def test_intensity_exceeded_stops_everything_and_raises(self) -> None:
        """More than max_restarts within the window: all actors stop (reverse), run raises."""
        clock = FakeClock()
        journal: list[tuple[str, str]] = []
        a, flaky, c = Worker("a", journal), Worker("flaky", journal), Worker("c", journal)
        sup = Supervisor([a, flaky, c], clock=clock, max_restarts=2, within=10.0,
                         backoff_initial=0.0)

        async def drive() -> None:
            for run in range(1, 4):
                await wait_runs(sup, flaky, run)
                clock.advance(1.0)
                flaky.crash()

        with anyio.fail_after(WAIT), pytest.raises(BaseException) as info:
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
                tg.start_soon(drive)
        err = only_error(info.value)
        assert isinstance(err, SupervisorGaveUp)
        assert (err.actor, err.restarts, err.within) == ("flaky", 3, 10.0)
        assert "gave up" in str(err) and "'flaky'" in str(err) and "10s" in str(err)
        assert err.__cause__ is not None  # the actor's crash, as raised (from a task group)
        cause = only_error(err.__cause__)
        assert isinstance(cause, Boom) and "run 3" in str(cause)
        stops = [name for what, name in journal if what == "stop_requested"]
        assert stops == ["c", "a"]
        states = {n: s.state for n, s in sup.statuses().items()}
        assert states == {"a": "stopped", "flaky": "failed", "c": "stopped"}

    async def test_restarts_outside_the_window_are_forgotten(self) -> None:
        """Only restarts within `within` seconds count towards the limit."""
        clock = FakeClock()
        journal: list[tuple[str, str]] = []
        w = Worker("w", journal)
        sup = Supervisor([w], clock=clock, max_restarts=1, within=10.0, backoff_initial=0.0)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
                for run in range(1, 4):
                    await wait_runs(sup, w, run)
                    clock.advance(11.0)
                    w.crash()
                await wait_runs(sup, w, 4)
                assert sup.statuses()["w"].restarts == 3
                sup.shutdown(WAIT)


class TestShutdown:
    async def test_stops_in_reverse_order(self) -> None:
        """request_stop goes to the last-started actor first, each waited for in turn."""
        journal: list[tuple[str, str]] = []
        actors = [Worker(n, journal) for n in ("a", "b", "c")]
        sup = Supervisor(actors)
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with running(sup):
                journal.clear()
        assert journal == [
            ("stop_requested", "c"), ("stopped", "c"),
            ("stop_requested", "b"), ("stopped", "b"),
            ("stop_requested", "a"), ("stopped", "a"),
        ]
        assert all(s.state == "stopped" for s in sup.statuses().values())
        assert [e["actor"] for e in logs if e["event"] == "actor.stopped"] == ["c", "b", "a"]

    async def test_actor_ignoring_stop_is_cancelled_within_deadline(self) -> None:
        """A stubborn actor is cancelled when its share is up; shutdown ends by the deadline."""
        journal: list[tuple[str, str]] = []
        a = Worker("a", journal)
        stubborn = Worker("stubborn", journal, ignore_stop=True)
        c = Worker("c", journal)
        sup = Supervisor([a, stubborn, c])
        timeout = 0.4
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(WAIT):
                await tg.start(sup.run)
            journal.clear()
            t0 = anyio.current_time()
            with anyio.fail_after(WAIT):
                sup.shutdown(timeout)
                sup.shutdown(timeout)  # twice is harmless
                await wait_state(sup, "a", "stopped")
            elapsed = anyio.current_time() - t0
        assert elapsed < timeout + 0.25, f"shutdown took {elapsed:.3f}s"
        # c stopped at once, so the stubborn one had half the time before being cancelled
        assert elapsed >= timeout / 2 - 0.02, f"stubborn actor cancelled after {elapsed:.3f}s"
        assert journal == [
            ("stop_requested", "c"), ("stopped", "c"),
            ("stop_requested", "stubborn"), ("cancelled", "stubborn"),
            ("stop_requested", "a"), ("stopped", "a"),  # a still got a graceful stop
        ]
        assert sup.statuses()["stubborn"].state == "stopped"

    async def test_first_to_stop_may_use_most_of_the_deadline(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The first actor to stop (the listener, in the daemon) gets all the time but a
        small reserve per actor after it, not an equal share."""
        monkeypatch.setattr(supervisor_module, "STOP_RESERVE", 0.1)
        journal: list[tuple[str, str]] = []
        a, b = Worker("a", journal), Worker("b", journal)
        stubborn = Worker("stubborn", journal, ignore_stop=True)
        sup = Supervisor([a, b, stubborn])
        timeout = 0.9
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(WAIT):
                await tg.start(sup.run)
            t0 = anyio.current_time()
            with anyio.fail_after(WAIT):
                sup.shutdown(timeout)
                await wait_state(sup, "stubborn", "stopped")
            held = anyio.current_time() - t0
            with anyio.fail_after(WAIT):
                await wait_state(sup, "a", "stopped")
        # 0.9 s less 0.1 s kept for each of a and b (an equal share would be 0.3 s).
        assert 0.65 <= held < 0.9, f"stubborn actor held {held:.3f}s"
        assert sup.statuses()["a"].state == sup.statuses()["b"].state == "stopped"

    async def test_no_restart_after_shutdown(self) -> None:
        """An actor waiting out its backoff is not restarted once shutdown began."""
        clock = FakeClock()
        journal: list[tuple[str, str]] = []
        w, other = Worker("w", journal), Worker("other", journal)
        sup = Supervisor([w, other], clock=clock, backoff_initial=5.0)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
                w.crash()
                await wait_state(sup, "w", "restarting")
                await clock.wait_for_sleepers(1)
                sup.shutdown(WAIT)
            clock.advance(10.0)
        assert w.runs == 1
        assert sup.statuses()["w"].state == "stopped"
        assert sup.statuses()["other"].state == "stopped"

    async def test_crash_while_stopping_is_not_restarted(self) -> None:
        """An actor that raises on its way out ends failed, not restarted."""
        journal: list[tuple[str, str]] = []

        class Sloppy(Worker):
            def request_stop(self) -> None:
                self.crash()

        w = Sloppy("sloppy", journal)
        sup = Supervisor([w], backoff_initial=0.0)
        async with running(sup):
            pass
        assert w.runs == 1
        assert sup.statuses()["sloppy"].state == "failed"

    async def test_kill_cancels_everything_now(self) -> None:
        """kill cancels every actor without asking; run returns."""
        journal: list[tuple[str, str]] = []
        a, b = Worker("a", journal), Worker("b", journal, ignore_stop=True)
        sup = Supervisor([a, b])
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
                journal.clear()
                sup.kill()
        assert sorted(journal) == [("cancelled", "a"), ("cancelled", "b")]
        assert all(s.state == "stopped" for s in sup.statuses().values())

    async def test_shutdown_before_run(self) -> None:
        """A supervisor shut down before it ran starts nothing and returns."""
        journal: list[tuple[str, str]] = []
        sup = Supervisor([Worker("a", journal)])
        sup.shutdown(1.0)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
        assert journal == [] and not sup.ready.is_set()
        assert sup.statuses()["a"].state == "stopped"
        with pytest.raises(RuntimeError):
            await sup.run()


class TestStatuses:
    async def test_statuses_follow_the_lifecycle(self) -> None:
        """starting -> ready -> restarting -> ready -> stopping -> stopped, with times."""
        clock = FakeClock(start=1000.0)
        journal: list[tuple[str, str]] = []
        gate = anyio.Event()
        w = Worker("w", journal, gate=gate)
        stubborn = Worker("s", journal, ignore_stop=True)
        sup = Supervisor([stubborn, w], clock=clock, backoff_initial=1.0)
        assert sup.statuses()["w"] == ActorStatus("starting", 0, None, 1000.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.run)
            await wait_state(sup, "s", "ready")
            assert sup.statuses()["w"].state == "starting"
            clock.advance(5)
            gate.set()
            assert await wait_state(sup, "w", "ready") == ActorStatus("ready", 0, None, 1005.0)
            w.crash()
            status = await wait_state(sup, "w", "restarting")
            assert status.restarts == 1 and status.last_error is not None
            with anyio.fail_after(WAIT):
                await clock.wait_for_sleepers(1)
            clock.advance(1)
            status = await wait_state(sup, "w", "ready")
            assert (status.restarts, status.since) == (1, 1006.0)
            assert "Boom" in (status.last_error or "")
            sup.shutdown(30.0)
            await wait_state(sup, "s", "stopping")
            assert sup.statuses()["w"].state == "stopped"
            sup.kill()
        assert sup.statuses()["s"].state == "stopped"
        encoded = msgspec.json.encode(sup.statuses())
        assert b'"restarts":1' in encoded


class PortTaken(UserError):
    """What a server actor raises when its port is in use."""


class TestStartFailures:
    async def test_user_error_at_start_is_not_restarted(self) -> None:
        """A failure to start is not a crash: no restart, the others stop, run raises it."""
        journal: list[tuple[str, str]] = []
        first = Worker("first", journal)
        broken = Worker("broken", journal)
        never = Worker("never", journal)

        async def refuse(ready: ReadySignal) -> None:
            broken.runs += 1
            raise PortTaken("listener: cannot listen on 127.0.0.1:8080: address already in use")

        broken.run = refuse  # type: ignore[method-assign]
        sup = Supervisor([first, broken, never], max_restarts=5, backoff_initial=0.0)
        with capture_logs() as logs, anyio.fail_after(WAIT), \
                pytest.raises(BaseException) as info:
            async with anyio.create_task_group() as tg:
                await tg.start(sup.run)
        err = only_error(info.value)
        assert isinstance(err, PortTaken)
        assert broken.runs == 1 and never.runs == 0
        assert ("stopped", "first") in journal
        assert sup.statuses()["broken"].state == "failed"
        events = [e["event"] for e in logs]
        assert "actor.restart_scheduled" not in events
        assert not any("exc_info" in e for e in logs)
        assert events.count("supervisor.start_failed") == 1

    async def test_user_error_after_start_follows_the_restart_policy(self) -> None:
        """Once running, the same error is a crash like any other (restarted by policy)."""
        journal: list[tuple[str, str]] = []
        calls = 0
        flaky = Worker("flaky", journal)
        real_run = flaky.run

        async def run(ready: ReadySignal) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise PortTaken("port taken on restart")
            await real_run(ready)

        flaky.run = run  # type: ignore[method-assign]
        sup = Supervisor([flaky], backoff_initial=0.0)
        async with running(sup):
            flaky.crash()
            await poll(lambda: calls >= 3 and sup.statuses()["flaky"].state == "ready",
                       deadline=WAIT)
            assert sup.statuses()["flaky"].restarts == 2
