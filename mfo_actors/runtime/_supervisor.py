"""The supervisor: starts actors in order, restarts crashed ones, stops them all in reverse.

OTP-style one-for-one supervision under structured concurrency. Each actor runs in its own
cancel scope inside the supervisor's task group, so a crash or a cancellation of one actor
never touches its siblings; too many restarts in a short window mean something is wrong
beyond one actor, and the supervisor stops everything and raises :class:`SupervisorGaveUp`.

A failure to start is not a crash: an actor that raises a
:class:`~mfo_actors.errors.UserError` (a port in use, a file it cannot read) before the
supervisor is ready is not restarted, since trying again cannot fix what the user must; the
supervisor stops the actors already started and :meth:`Supervisor.run` raises that error.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ..errors import MFOError, UserError
from ..observability import get_logger, redact
from ._actor import Actor, ActorState, ActorStatus, ReadySignal
from ._clock import Clock, SystemClock

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

__all__ = ["Supervisor", "SupervisorGaveUp"]

log = get_logger("mfo_actors.runtime.supervisor")

# After giving up, actors get this long in total to stop gracefully before being cancelled.
# Generous because it only runs on the way out, and a stop that drains in-flight work is
# worth a few seconds.
GIVE_UP_STOP_TIMEOUT = 10.0
STOP_RESERVE = 1.0  # seconds kept for each actor still to stop (they stop fast once asked)


class SupervisorGaveUp(MFOError):
    """Actors crashed more often than the restart intensity allows; all were stopped.

    The last crash is ``__cause__``. A process manager (systemd) restarting the whole
    daemon is the next line of defence.

    Attributes:
      actor: The actor whose restart went over the limit.
      restarts: Restarts (of all actors) counted within the window.
      within: The window, in seconds.
    """

    def __init__(self, actor: str, restarts: int, within: float) -> None:
        super().__init__(
            f"supervisor gave up: {restarts} actor restarts within {within:g}s is more than "
            f"allowed (the last for actor {actor!r}); every actor has been stopped"
        )
        self.actor = actor
        self.restarts = restarts
        self.within = within


def _describe(error: BaseException) -> str:
    """``repr`` of a crash, seeing through task-group wrappers that hold a single error."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return repr(error)


class _Child:
    """The supervisor's book-keeping for one actor."""

    __slots__ = (
        "actor", "backoff_scope", "done", "last_error", "launched", "name", "restart_times",
        "restarts", "scope", "settled", "since", "state", "stop_requested",
    )

    def __init__(self, actor: Actor, since: float) -> None:
        self.actor = actor
        self.name = actor.name
        self.state: ActorState = "starting"
        self.since = since
        self.restarts = 0
        self.last_error: str | None = None
        self.launched = False
        self.stop_requested = False
        self.scope: anyio.CancelScope | None = None  # the current run's scope
        self.backoff_scope: anyio.CancelScope | None = None
        self.restart_times: deque[float] = deque()  # for this actor's backoff
        self.settled = anyio.Event()  # startup may move on: ready, finished or stopping
        self.done = anyio.Event()  # no run is active and none will be


class Supervisor:
    """Run actors one-for-one: start in order, restart by policy, stop in reverse order.

    Args:
      actors: Started in this order, each once the previous one is ready; stopped in
        reverse. Names must be unique.
      max_restarts: More restarts than this (all actors together) within *within* seconds
        and the supervisor gives up. 0 means the first restart already gives up.
      within: The restart-intensity window, in seconds.
      backoff_initial: Wait before an actor's first restart; it doubles with each restart
        of that actor within *within* seconds, up to *backoff_max*.
      backoff_max: The longest wait before a restart.
      start_timeout: Seconds an actor has to call ``ready.set()`` after ``run`` starts;
        past that it is cancelled and treated as crashed (``TimeoutError``).
      clock: Used for backoff and the restart window (a :class:`FakeClock` in tests).
        Start and shutdown deadlines are on the event loop's clock.

    Example::

        supervisor = Supervisor([store_actor, listener, forwarder])
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)      # every actor is ready now
            ...                                 # on SIGTERM: supervisor.shutdown(10.0)
    """

    def __init__(
        self,
        actors: Sequence[Actor],
        *,
        max_restarts: int = 5,
        within: float = 60.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        start_timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        names = [a.name for a in actors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"actor names must be unique, repeated: {duplicates}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts!r}")
        if within <= 0:
            raise ValueError(f"within must be > 0, got {within!r}")
        if backoff_initial < 0 or backoff_max < backoff_initial:
            raise ValueError(
                f"need 0 <= backoff_initial <= backoff_max, got {backoff_initial!r}, "
                f"{backoff_max!r}"
            )
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0, got {start_timeout!r}")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._max_restarts = max_restarts
        self._within = within
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._start_timeout = start_timeout
        now = self._clock.now()
        self._children = [_Child(a, now) for a in actors]
        self._restart_times: deque[float] = deque()  # restart intensity, all actors
        self._stopping = False
        self._stop_timeout = 0.0
        self._stop_event = anyio.Event()
        self._tg: TaskGroup | None = None
        self._ran = False
        self._gave_up: tuple[SupervisorGaveUp, BaseException | None] | None = None
        self._start_failed: UserError | None = None
        self.ready = anyio.Event()
        """Set once every actor has become ready at startup (it stays set afterwards)."""

    # -- public ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every actor, supervise them, and return once shutdown has completed.

        Calls ``task_status.started()`` when every actor is ready, so ``await tg.start(
        supervisor.run)`` returns at that moment. If shutdown comes first, ``started()`` is
        called as ``run`` returns (check :attr:`ready`).

        Raises:
          UserError: an actor failed to start for a reason the user must fix (raised by its
            ``run`` before the supervisor was ready); every actor has been stopped.
          SupervisorGaveUp: restart intensity exceeded; every actor has been stopped.
          RuntimeError: ``run`` was already called on this supervisor.
        """
        if self._ran:
            raise RuntimeError("Supervisor.run can only be called once")
        self._ran = True
        started = False
        try:
            if not self._stopping:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._stopper)
                    for child in self._children:
                        if self._stopping:
                            break
                        child.launched = True
                        tg.start_soon(self._supervise, child)
                        await child.settled.wait()
                    if not self._stopping:
                        self.ready.set()
                        log.info("supervisor.ready", actors=[c.name for c in self._children])
                        task_status.started()
                        started = True
        finally:
            self._tg = None
            self._stopping = True
            for child in self._children:
                if not child.launched:
                    self._set_state(child, "stopped")
                child.done.set()
        if self._start_failed is not None:
            raise self._start_failed
        if self._gave_up is not None:
            error, cause = self._gave_up
            raise error from cause
        log.info("supervisor.stopped")
        if not started:
            task_status.started()

    def shutdown(self, timeout: float) -> None:
        """Stop every actor gracefully, in reverse start order, within *timeout* seconds.

        For each actor in turn: ``request_stop()``, then wait for its ``run`` to return.
        Each actor may use the time still left but a reserve of up to ``STOP_RESERVE`` for
        each actor after it (an equal share when time is shorter than that), so a prompt one
        leaves more for the rest; one still running when its share is up is cancelled.
        Returns at once (the work happens in the supervisor's task); :meth:`run` returns
        when it is done.
        No restarts happen after this. Calling it again does nothing.
        """
        if timeout < 0 or math.isnan(timeout):
            raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        if self._begin_stop(timeout):
            log.info("supervisor.shutdown_requested", timeout_s=timeout)

    def kill(self) -> None:
        """Cancel every actor now, without ``request_stop``; :meth:`run` then returns."""
        self._begin_stop(0.0, graceful=False)
        for child in self._children:
            child.stop_requested = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def statuses(self) -> dict[str, ActorStatus]:
        """A snapshot per actor name, in start order."""
        return {
            c.name: ActorStatus(
                state=c.state, restarts=c.restarts, last_error=c.last_error, since=c.since
            )
            for c in self._children
        }

    # -- internals ---------------------------------------------------------------------------

    def _begin_stop(self, timeout: float, *, graceful: bool = True) -> bool:
        if self._stopping:
            return False
        self._stopping = True
        self._stop_timeout = timeout
        for child in self._children:
            child.settled.set()
        if graceful:  # wakes the stopper; kill() cancels it instead
            self._stop_event.set()
        return True

    def _set_state(self, child: _Child, state: ActorState) -> None:
        child.state = state
        child.since = self._clock.now()

    async def _stopper(self) -> None:
        """Wait for a stop request, then stop the started actors in reverse order."""
        await self._stop_event.wait()
        deadline = anyio.current_time() + self._stop_timeout
        order = [c for c in reversed(self._children) if c.launched]
        for i, child in enumerate(order):
            if child.done.is_set():
                continue
            others = sum(1 for c in order[i + 1:] if not c.done.is_set())
            now = anyio.current_time()
            remaining = max(deadline - now, 0.0)
            # Everything left but a reserve for the actors still to stop: the first to stop
            # (the listener, draining requests in flight) may use most of the deadline.
            reserve = min(STOP_RESERVE, remaining / (others + 1))
            self._stop_child(child, now + remaining - reserve * others)
            await child.done.wait()

    def _stop_child(self, child: _Child, deadline: float) -> None:
        child.stop_requested = True
        if child.backoff_scope is not None:
            child.backoff_scope.cancel()
        scope = child.scope
        if scope is None:
            return  # between runs: its loop sees stop_requested and ends
        self._set_state(child, "stopping")
        with structlog.contextvars.bound_contextvars(actor=child.name):
            log.info("actor.stopping", timeout_s=round(max(deadline - anyio.current_time(), 0), 3))
            try:
                child.actor.request_stop()
            except Exception as exc:
                log.warning("actor.request_stop_failed", error=repr(exc))
                scope.cancel()
        scope.deadline = min(scope.deadline, deadline)

    async def _supervise(self, child: _Child) -> None:
        """Run one actor again and again, as its restart policy says, until stopping."""
        try:
            while not (self._stopping or child.stop_requested):
                error = await self._run_once(child)
                if isinstance(error, UserError) and not self.ready.is_set():
                    self._fail_start(child, error)
                    break
                if self._stopping or child.stop_requested:
                    self._set_state(child, "failed" if error is not None else "stopped")
                    break
                mode = child.actor.restart.mode
                restart = mode != "temporary" if error is not None else mode == "permanent"
                if not restart:
                    self._set_state(child, "failed" if error is not None else "stopped")
                    break
                if not self._count_restart(child, error):
                    break
                await self._backoff(child)
        finally:
            child.scope = None
            child.backoff_scope = None
            if child.state not in ("stopped", "failed"):
                self._set_state(child, "stopped")
                with structlog.contextvars.bound_contextvars(actor=child.name):
                    log.info("actor.stopped", cancelled=True)
            child.settled.set()
            child.done.set()

    async def _run_once(self, child: _Child) -> BaseException | None:
        """One call of ``actor.run``; returns the crash, or None if it returned or was stopped."""
        ready = ReadySignal()
        scope = anyio.CancelScope(deadline=anyio.current_time() + self._start_timeout)
        ready._on_set = lambda: self._on_ready(child, scope)
        child.scope = scope
        self._set_state(child, "starting")
        error: BaseException | None = None
        with structlog.contextvars.bound_contextvars(actor=child.name):
            log.info("actor.started", restarts=child.restarts)
            try:
                with scope:
                    await child.actor.run(ready)
            except Exception as exc:  # cancellation is a BaseException and propagates
                error = exc
            finally:
                child.scope = None
            stopping = self._stopping or child.stop_requested
            if error is None and scope.cancelled_caught and not stopping:
                # Only the start deadline cancels this scope outside a stop.
                error = TimeoutError(
                    f"actor {child.name!r} was not ready within {self._start_timeout:g}s"
                )
            if isinstance(error, UserError):
                # The user's problem, in words: no traceback. At start-up, _fail_start says it.
                child.last_error = str(redact(str(error)))
                if self.ready.is_set():
                    log.error("actor.crashed", error=child.last_error)
            elif error is not None:
                child.last_error = str(redact(_describe(error)))
                log.error("actor.crashed", error=child.last_error, exc_info=error)
            else:
                log.info("actor.stopped", cancelled=scope.cancelled_caught)
        return error

    def _fail_start(self, child: _Child, error: UserError) -> None:
        """Stop everything, without a restart: the user must fix what *error* says."""
        self._set_state(child, "failed")
        if self._start_failed is None:
            self._start_failed = error
        log.error("supervisor.start_failed", actor=child.name, error=child.last_error)
        self._begin_stop(GIVE_UP_STOP_TIMEOUT)

    def _on_ready(self, child: _Child, scope: anyio.CancelScope) -> None:
        if child.scope is not scope:
            return  # a run that already ended
        if not child.stop_requested:
            scope.deadline = math.inf
        if child.state == "starting":
            self._set_state(child, "ready")
        with structlog.contextvars.bound_contextvars(actor=child.name):
            log.info("actor.ready")
        child.settled.set()

    def _count_restart(self, child: _Child, error: BaseException | None) -> bool:
        """Record a restart; False (and give up) if it breaks the restart intensity."""
        now = self._clock.monotonic()
        horizon = now - self._within
        for times in (self._restart_times, child.restart_times):
            while times and times[0] <= horizon:
                times.popleft()
            times.append(now)
        if len(self._restart_times) > self._max_restarts:
            gave_up = SupervisorGaveUp(
                actor=child.name, restarts=len(self._restart_times), within=self._within
            )
            self._gave_up = (gave_up, error)
            self._set_state(child, "failed")
            log.error(
                "supervisor.gave_up", actor=child.name, restarts=len(self._restart_times),
                within_s=self._within, max_restarts=self._max_restarts,
            )
            self._begin_stop(GIVE_UP_STOP_TIMEOUT)
            return False
        child.restarts += 1
        return True

    async def _backoff(self, child: _Child) -> None:
        attempt = len(child.restart_times)
        wait = min(self._backoff_initial * 2 ** (attempt - 1), self._backoff_max)
        self._set_state(child, "restarting")
        with structlog.contextvars.bound_contextvars(actor=child.name):
            log.warning("actor.restart_scheduled", attempt=attempt, wait_s=round(wait, 3))
        with anyio.CancelScope() as scope:
            child.backoff_scope = scope
            await self._clock.sleep(wait)
        child.backoff_scope = None

    def __repr__(self) -> str:
        states: dict[str, Any] = {c.name: c.state for c in self._children}
        return f"<Supervisor {states}>"
