"""The daemon as a real process: signals, exit codes, the state-dir lock and sd_notify."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mfo_actors.commands.run import EXIT_CONFIG
from mfo_actors.config import load_config
from mfo_actors.daemon import StateDirLock, StateDirLockedError, run_instance, watchdog_interval
from mfo_actors.daemon import _run as daemon_run
from mfo_actors.runtime import ReadySignal, RestartPolicy, Supervisor
from tests.helpers import running_daemon, wait_for, write_config


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd (short path: sun_path is 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="mfo-n-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive_until(sock: socket.socket, wanted: str, *, deadline: float = 20.0) -> list[str]:
    """Datagrams received until one holds the line *wanted*; fail at the deadline."""
    end = time.monotonic() + deadline
    seen: list[str] = []
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted!r} within {deadline}s; got {seen!r}")
        sock.settimeout(left)
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(data)
        if wanted in data.splitlines():
            return seen


@pytest.mark.slow
class TestProcess:
    def test_sigterm_exits_zero_with_a_final_log_line(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        with running_daemon(config) as daemon:
            started = daemon.wait_event("daemon.started")
            assert started["pid"] == daemon.pid
            assert started["instance"] == "test"
            daemon.wait_event("daemon.ready")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0
            events = daemon.events()
            assert events[-1]["event"] == "daemon.stopped"
            assert events[-1]["exit_code"] == 0
            assert any(e["event"] == "daemon.stopping" and e["signal"] == "SIGTERM"
                       for e in events)

    def test_sigint_is_a_graceful_stop_too(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        with running_daemon(config) as daemon:
            daemon.wait_event("daemon.ready")
            daemon.signal(signal.SIGINT)
            assert daemon.wait_exit() == 0
            assert daemon.events()[-1]["event"] == "daemon.stopped"

    def test_trio_backend(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, async_backend="trio")
        with running_daemon(config) as daemon:
            assert daemon.wait_event("daemon.started")["backend"] == "trio"
            daemon.wait_event("daemon.ready")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0

    def test_second_daemon_on_same_state_dir_is_refused(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        with running_daemon(config) as first:
            first.wait_event("daemon.ready")
            with running_daemon(config) as second:
                assert second.wait_exit() == EXIT_CONFIG  # not retried by systemd
                message = second.output()[-1]
                assert message == (
                    "mfo-actors: another mfo-actors daemon is already running on state_dir "
                    f"{tmp_path / 'state'} (pid {first.pid})"
                )
                assert not any("Traceback" in line for line in second.output())
            assert first.proc.poll() is None  # the first one is untouched
            first.signal(signal.SIGTERM)
            assert first.wait_exit() == 0

    @pytest.mark.slow
    def test_restart_after_kill_9(self, tmp_path: Path) -> None:
        """The OS drops the flock of a killed process: the lock file left behind is harmless."""
        config = write_config(tmp_path)
        with running_daemon(config) as first:
            first.wait_event("daemon.ready")
            first.signal(signal.SIGKILL)
            assert first.wait_exit() == -signal.SIGKILL
        assert (tmp_path / "state" / "daemon.lock").exists()
        with running_daemon(config) as second:
            second.wait_event("daemon.ready")
            second.signal(signal.SIGTERM)
            assert second.wait_exit() == 0

    def test_ready_arrives_on_notify_socket(
        self, tmp_path: Path, notify_socket: tuple[socket.socket, str]
    ) -> None:
        sock, path = notify_socket
        config = write_config(tmp_path)
        with running_daemon(config, env={"NOTIFY_SOCKET": path}) as daemon:
            ready = receive_until(sock, "READY=1")[-1].splitlines()
            assert f"MAINPID={daemon.pid}" in ready
            daemon.wait_event("daemon.ready")
            daemon.signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1")
            assert daemon.wait_exit() == 0

    def test_abstract_notify_socket(self, tmp_path: Path) -> None:
        """``@name`` is Linux's abstract namespace, as systemd may hand it out."""
        name = f"mfo-actors-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            config = write_config(tmp_path)
            with running_daemon(config, env={"NOTIFY_SOCKET": "@" + name}) as daemon:
                receive_until(sock, "READY=1")
                daemon.signal(signal.SIGTERM)
                assert daemon.wait_exit() == 0

    def test_watchdog_pings_when_asked(
        self, tmp_path: Path, notify_socket: tuple[socket.socket, str]
    ) -> None:
        sock, path = notify_socket
        config = write_config(tmp_path)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
        with running_daemon(config, env=env) as daemon:
            receive_until(sock, "WATCHDOG=1")
            receive_until(sock, "WATCHDOG=1")  # and it keeps pinging
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0

    def test_no_watchdog_pings_without_watchdog_usec(
        self, tmp_path: Path, notify_socket: tuple[socket.socket, str]
    ) -> None:
        sock, path = notify_socket
        config = write_config(tmp_path)
        with running_daemon(config, env={"NOTIFY_SOCKET": path}) as daemon:
            receive_until(sock, "READY=1")
            daemon.signal(signal.SIGTERM)
            seen = receive_until(sock, "STOPPING=1")
            assert daemon.wait_exit() == 0
        assert not any("WATCHDOG=1" in d for d in seen)

    def test_unreachable_notify_socket_does_not_stop_the_daemon(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
        with running_daemon(config, env=env) as daemon:
            daemon.wait_event("daemon.ready")
            daemon.wait_event("daemon.notify_failed")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0

    def test_bad_config_is_one_line_and_exit_78(self, tmp_path: Path) -> None:
        config = tmp_path / "bad.yaml"
        config.write_text("instance: x\nforwarder:\n  concurrency: lots\n")
        with running_daemon(config) as daemon:
            assert daemon.wait_exit() == EXIT_CONFIG
            assert daemon.output() == [
                f"mfo-actors: {config}:3: forwarder.concurrency: Expected `int`, got `str`"
            ]


class TestLock:
    def test_lock_is_exclusive_and_released(self, tmp_path: Path) -> None:
        with StateDirLock(tmp_path / "s"):
            with pytest.raises(StateDirLockedError) as info:
                StateDirLock(tmp_path / "s").acquire()
            assert info.value.pid == os.getpid()
            assert str(tmp_path / "s") in str(info.value)
        with StateDirLock(tmp_path / "s"):
            pass

    def test_state_dir_that_cannot_be_created(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(Exception, match="cannot use state_dir"):
            StateDirLock(tmp_path / "file" / "sub").acquire()


class TestWatchdogInterval:
    def test_half_the_period(self) -> None:
        assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0

    def test_off(self) -> None:
        assert watchdog_interval({}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None

    def test_for_another_pid(self) -> None:
        env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        assert watchdog_interval(env, pid=2) is None
        assert watchdog_interval(env, pid=1) == 0.5


class _Crasher:
    """An actor that crashes as soon as it is ready."""

    name = "crasher"
    restart = RestartPolicy("permanent")

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        raise RuntimeError("boom")

    def request_stop(self) -> None:
        pass


def _lock_pid(tmp_path: Path) -> str | None:
    """The pid written in the daemon's lock file, or None before the daemon created it."""
    try:
        return (tmp_path / "state" / "daemon.lock").read_text().strip()
    except FileNotFoundError:
        return None


class TestInProcess:
    pytestmark = pytest.mark.anyio

    async def test_stop_event_is_a_graceful_stop(self, tmp_path: Path) -> None:
        cfg = load_config(write_config(tmp_path))
        stop = anyio.Event()
        code: list[int] = []

        async def run() -> None:
            code.append(await run_instance(cfg, environ={}, stop=stop, handle_signals=False))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.to_thread.run_sync(
                    functools.partial(wait_for, lambda: _lock_pid(tmp_path) == str(os.getpid()),
                                      what="lock file with our pid"))
                stop.set()
        assert code == [0]

    async def test_supervisor_gave_up_exits_1(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cfg = load_config(write_config(tmp_path))
        monkeypatch.setattr(daemon_run, "open_instance", _fake_instance(_Crasher()))
        monkeypatch.setattr(
            daemon_run, "Supervisor",
            functools.partial(Supervisor, max_restarts=2, backoff_initial=0.001,
                              backoff_max=0.001),
        )
        with anyio.fail_after(20):
            code = await run_instance(cfg, environ={}, handle_signals=False)
        assert code == 1


def _fake_instance(*actors: Any) -> Any:
    """Stands in for ``open_instance``: yields just *actors*, opens nothing."""

    @contextlib.asynccontextmanager
    async def fake(cfg: Any, ctx: Any) -> AsyncIterator[list[Any]]:
        yield list(actors)

    return fake


class _Stubborn:
    """An actor that ignores request_stop: only cancellation ends it."""

    name = "stubborn"
    restart = RestartPolicy("permanent")

    def __init__(self) -> None:
        self.running = anyio.Event()
        self.stop_requested = anyio.Event()

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        self.running.set()
        await anyio.sleep_forever()

    def request_stop(self) -> None:
        self.stop_requested.set()


class TestSignalsInProcess:
    pytestmark = pytest.mark.anyio

    async def test_second_signal_stops_at_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A drain that would take 60 s ends right away on the second SIGTERM."""
        cfg = load_config(write_config(tmp_path, shutdown_timeout="60s"))
        actor = _Stubborn()
        monkeypatch.setattr(daemon_run, "open_instance", _fake_instance(actor))
        code: list[int] = []

        async def run() -> None:
            code.append(await run_instance(cfg, environ={}))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await actor.running.wait()  # signal handlers are installed by now
                os.kill(os.getpid(), signal.SIGTERM)
                await actor.stop_requested.wait()
                os.kill(os.getpid(), signal.SIGTERM)
        assert code == [128 + signal.SIGTERM]
