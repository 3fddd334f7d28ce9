"""``run_instance``: one instance from config to exit code, the way systemd expects it.

Order of events: take the state-dir lock, check that every listening address can be bound,
open the store and load the flows, start the actors under the supervisor, tell systemd
``READY=1`` once all are ready, and on the first SIGTERM/SIGINT drain gracefully within
``shutdown_timeout`` (``STOPPING=1``); a second signal stops at once. SIGHUP reloads the
config and the flows (``daemon/_reload.py``), one reload at a time: signals that arrive during
a reload are folded into one more. Exit codes: 0 after a
graceful stop, 1 when the supervisor gave up (restart intensity exceeded) or the daemon
crashed, 128+N when a second signal N cut the drain short.

Everything that can fail because of the machine rather than the code (the state dir not
writable or locked, a port in use or not permitted, a store file that is corrupt or not a
store, a store server out of reach, a flow file with an error) fails before READY=1 as a
:class:`~mfo_actors.errors.UserError`: one line, no traceback, no restart. The checks that
need no running loop come before the first log line, so such a start prints that one line
and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import anyio
import anyio.abc
import structlog

from mfo_actors import __version__
from mfo_actors.config import InstanceConfig
from mfo_actors.daemon._lock import StateDirLock
from mfo_actors.daemon._notify import SystemdNotifier
from mfo_actors.daemon._preflight import check_listen_addresses
from mfo_actors.daemon._reload import Reloader
from mfo_actors.daemon._wiring import DaemonContext, open_instance
from mfo_actors.errors import UserError
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Supervisor, SupervisorGaveUp

__all__ = ["EXIT_FAILED", "EXIT_OK", "run_instance"]

log = get_logger("mfo_actors.daemon")

EXIT_OK = 0
EXIT_FAILED = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP


class _Outcome:
    """How the run ended, filled in by whichever task saw it."""

    def __init__(self) -> None:
        self.exit_code = EXIT_OK
        self.signalled = False
        self.started = False  # the actors were about to start (daemon.started is logged)
        self.start_error: UserError | None = None  # an actor could not start: no restart


async def run_instance(
    cfg: InstanceConfig,
    *,
    environ: Mapping[str, str] | None = None,
    stop: anyio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run one instance until it is told to stop; return the process exit code.

    Args:
      cfg: The loaded instance config.
      environ: Where ``NOTIFY_SOCKET``/``WATCHDOG_*`` are read (default ``os.environ``).
      stop: Setting it stops the instance like a first SIGTERM (for embedding and tests).
      handle_signals: Handle SIGTERM/SIGINT/SIGHUP (only possible in the main thread). The
        handlers are installed first thing, so a signal that arrives while the store opens
        waits for the actors instead of killing the process.

    Raises:
      UserError: the instance cannot start: another daemon holds the state dir or it cannot
        be created, a listening address is in use or not permitted, the store cannot be
        opened, a flow is invalid, or an actor failed to start for a reason of that kind.
    """
    env = os.environ if environ is None else environ
    state_dir = cfg.effective_state_dir
    with contextlib.ExitStack() as stack:
        signals = (
            stack.enter_context(anyio.open_signal_receiver(*STOP_SIGNALS, RELOAD_SIGNAL))
            if handle_signals else None
        )
        return await _run_locked(cfg, state_dir=state_dir, env=env, stop=stop,
                                 signals=signals)


async def _run_locked(
    cfg: InstanceConfig,
    *,
    state_dir: Path,
    env: Mapping[str, str],
    stop: anyio.Event | None,
    signals: AsyncIterator[int] | None,
) -> int:
    with StateDirLock(state_dir) as lock, \
            structlog.contextvars.bound_contextvars(actor="daemon"):
        check_listen_addresses(cfg)
        outcome = _Outcome()
        try:
            async with SystemdNotifier.from_environ(env) as notifier:
                await _serve(cfg, state_dir=state_dir, env=env, notifier=notifier, stop=stop,
                             signals=signals, outcome=outcome, lock=lock)
        except UserError:
            outcome.exit_code = EXIT_FAILED
            raise
        except Exception as exc:
            outcome.exit_code = EXIT_FAILED
            log.error("daemon.crashed", error=repr(exc), exc_info=exc)
        finally:
            if outcome.started:
                log.info("daemon.stopped", exit_code=outcome.exit_code)
        return outcome.exit_code


async def _serve(
    cfg: InstanceConfig,
    *,
    state_dir: Path,
    env: Mapping[str, str],
    notifier: SystemdNotifier,
    stop: anyio.Event | None,
    signals: AsyncIterator[int] | None,
    outcome: _Outcome,
    lock: StateDirLock | None = None,
) -> None:
    ctx = DaemonContext(state_dir=state_dir, notifier=notifier, environ=env, lock=lock)
    async with open_instance(cfg, ctx) as actors:
        outcome.started = True
        log.info(
            "daemon.started", instance=cfg.instance, pid=os.getpid(), version=__version__,
            state_dir=str(state_dir), config=cfg.source_file, backend=cfg.async_backend,
        )
        supervisor = Supervisor(actors)
        ctx.supervisor = supervisor
        reloader = Reloader(cfg, actors, notifier=notifier, state_dir=state_dir, environ=env)
        await _supervise(cfg, supervisor, len(actors), reloader=reloader, notifier=notifier,
                         stop=stop, signals=signals, outcome=outcome, ctx=ctx)
    if outcome.start_error is not None:
        raise outcome.start_error


async def _supervise(
    cfg: InstanceConfig,
    supervisor: Supervisor,
    count: int,
    *,
    reloader: Reloader,
    notifier: SystemdNotifier,
    stop: anyio.Event | None,
    signals: AsyncIterator[int] | None,
    outcome: _Outcome,
    ctx: DaemonContext | None = None,
) -> None:
    stopping = anyio.Event()

    def begin_shutdown(reason: str) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("daemon.stopping", signal=reason, timeout_s=cfg.shutdown_timeout)
        supervisor.shutdown(cfg.shutdown_timeout)

    # Size 1: a SIGHUP arriving while one is pending is folded into it.
    reloads_tx, reloads_rx = anyio.create_memory_object_stream[str](1)

    def request_reload(reason: str) -> None:
        if stopping.is_set():
            return
        log.info("daemon.reload_requested", signal=reason)
        try:
            reloads_tx.send_nowait(reason)
        except anyio.WouldBlock:
            pass

    with contextlib.ExitStack() as stack:
        stack.enter_context(reloads_tx)
        stack.enter_context(reloads_rx)
        async with anyio.create_task_group() as tg:
            if signals is not None:
                tg.start_soon(_watch_signals, signals, supervisor, begin_shutdown,
                              request_reload, outcome)
            tg.start_soon(_reload_loop, reloads_rx, supervisor, reloader, stopping)
            if stop is not None:
                tg.start_soon(_watch_event, stop, begin_shutdown)
            if ctx is not None:
                tg.start_soon(_watch_failure, ctx, begin_shutdown, outcome)
            tg.start_soon(_announce_ready, supervisor, notifier, count)
            tg.start_soon(_announce_stopping, stopping, notifier)
            try:
                await supervisor.run()
            except UserError as exc:  # raised outside this task group, not wrapped by it
                outcome.exit_code = EXIT_FAILED
                outcome.start_error = exc
            except SupervisorGaveUp as exc:
                outcome.exit_code = EXIT_FAILED
                log.error("daemon.failed", error=str(exc), cause=repr(exc.__cause__))
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await notifier.notify(STOPPING=1, STATUS=f"failed: {exc}")
            finally:
                tg.cancel_scope.cancel()


async def _watch_signals(
    signals: AsyncIterator[int],
    supervisor: Supervisor,
    begin_shutdown: Callable[[str], None],
    request_reload: Callable[[str], None],
    outcome: _Outcome,
) -> None:
    """SIGHUP: reload. First stop signal: graceful drain. Second: cancel everything now."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == RELOAD_SIGNAL:
            request_reload(name)
        elif not outcome.signalled:
            outcome.signalled = True
            begin_shutdown(name)
        else:
            log.warning("daemon.killing", signal=name)
            outcome.exit_code = 128 + signum
            supervisor.kill()


async def _reload_loop(
    requests: anyio.abc.ObjectReceiveStream[str],
    supervisor: Supervisor,
    reloader: Reloader,
    stopping: anyio.Event,
) -> None:
    """Reloads, one at a time, once every actor has started."""
    await supervisor.ready.wait()
    async for _reason in requests:
        if not stopping.is_set():
            await reloader.reload()


async def _watch_event(stop: anyio.Event, begin_shutdown: Callable[[str], None]) -> None:
    await stop.wait()
    begin_shutdown("stop-event")


async def _watch_failure(ctx: DaemonContext, begin_shutdown: Callable[[str], None],
                         outcome: _Outcome) -> None:
    """Something the daemon cannot run without is gone (the state dir): stop, exit 1."""
    await ctx.failed.wait()
    outcome.exit_code = EXIT_FAILED
    log.error("daemon.failed", error=ctx.failure)
    begin_shutdown("failure")


async def _announce_ready(supervisor: Supervisor, notifier: SystemdNotifier, count: int) -> None:
    await supervisor.ready.wait()
    log.info("daemon.ready", actors=list(supervisor.statuses()))
    await notifier.ready(f"running: {count} actors ready")


async def _announce_stopping(stopping: anyio.Event, notifier: SystemdNotifier) -> None:
    await stopping.wait()
    await notifier.stopping("stopping: draining in-flight work")
