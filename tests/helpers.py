"""Shared test helpers: free ports, a real daemon subprocess, waits with deadlines.

Nothing here sleeps to paper over a race: every wait polls a condition until a deadline and
fails with what it saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

__all__ = [
    "DaemonProcess",
    "free_port",
    "poll",
    "process_fds",
    "process_rss",
    "running_daemon",
    "start_daemon",
    "wait_for",
    "wait_http_ok",
    "write_config",
]

DEFAULT_DEADLINE = 20.0  # seconds; generous for a loaded CI machine, never reached when healthy
POLL_INTERVAL = 0.02


@pytest.fixture(name="anyio_backend", params=[
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
])
def uvloop_asyncio_trio(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """``anyio_backend`` on uvloop (the daemon's default) as well as plain asyncio and trio,
    for a module that imports it."""
    return request.param  # type: ignore[no-any-return]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; others run tests here too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], *, deadline: float = DEFAULT_DEADLINE, what: str = "condition"
) -> Any:
    """Poll *condition* until it returns something truthy; fail the test at *deadline*."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


async def poll(cond: Callable[[], Awaitable[bool] | bool], *, deadline: float = 10.0) -> None:
    """Re-check *cond* (sync or async) until it holds; fail the test after *deadline* seconds."""
    with anyio.fail_after(deadline):
        while True:
            result = cond()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.005)


def process_rss(pid: int) -> int:
    """Resident memory of process *pid* in bytes (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def process_fds(pid: int) -> int:
    """Open file descriptors of process *pid* (Linux ``/proc``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_http_ok(url: str, *, deadline: float = DEFAULT_DEADLINE) -> bytes:
    """GET *url* until it answers 2xx; return the body."""

    def attempt() -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bytes(resp.read()) or b" "
        except (urllib.error.URLError, OSError):
            return None

    return bytes(wait_for(attempt, deadline=deadline, what=f"HTTP 2xx from {url}"))


def write_config(directory: Path, *, name: str = "test", **sections: Any) -> Path:
    """Write a minimal instance config under *directory* (free ports, own state dir).

    Keyword arguments replace top-level keys (``store={"backend": "sqlite"}``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "instance": name,
        "state_dir": str(directory / "state"),
        "shutdown_timeout": "10s",
        "client": {"base_url": f"http://127.0.0.1:{free_port()}"},
        "auth": {"mode": "none"},
        "webhook_listener": {"host": "127.0.0.1", "port": free_port(), "path": "/webhook"},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "flows": {"dir": str(directory / "flows")},
        "logging": {"level": "info", "format": "json"},
    }
    cfg.update(sections)
    (directory / "flows").mkdir(exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")  # JSON is YAML
    return path


class DaemonProcess:
    """A running ``python -m mfo_actors run --config FILE``, its stderr collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr as stream:  # closed at EOF: an open pipe left to the GC warns
            for line in stream:
                with self._lock:
                    self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines parsed (other lines are skipped)."""
        out = []
        for line in self.output():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def find_event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def wait_event(self, name: str, *, deadline: float = DEFAULT_DEADLINE) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                found = self.find_event(name)
                if found is None:
                    raise AssertionError(
                        f"daemon exited ({self.proc.returncode}) before {name!r}:\n"
                        + "\n".join(self.output())
                    )
                return found
            return self.find_event(name)

        return dict(wait_for(seen, deadline=deadline, what=f"log event {name!r}"))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, *, deadline: float = DEFAULT_DEADLINE) -> int:
        try:
            code = self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon still running after {deadline}s:\n" + "\n".join(self.output())
            ) from None
        self._reader.join(timeout=5)
        return code

    def terminate(self) -> None:
        """Stop the process whatever its state (test cleanup)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


def start_daemon(
    config: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    args: tuple[str, ...] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> DaemonProcess:
    """Start the daemon as a real subprocess (no NOTIFY_SOCKET/WATCHDOG_* unless *env* has them).

    *preexec_fn* runs in the child before the daemon starts (resource limits in tests).
    """
    environ = {k: v for k, v in os.environ.items()
               if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    environ.update(env or {})
    environ["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfo_actors", "run", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=cwd,
        preexec_fn=preexec_fn,
    )
    return DaemonProcess(proc)


@contextlib.contextmanager
def running_daemon(config: Path, **kwargs: Any) -> Iterator[DaemonProcess]:
    """``start_daemon`` that always kills the process when the test ends."""
    daemon = start_daemon(config, **kwargs)
    try:
        yield daemon
    finally:
        daemon.terminate()


class AuthView:
    """The auth actor as a client sees it through the daemon's gate: ``header()``,
    ``invalidate(token)`` (a 401), ``token`` (the watch's value)."""

    def __init__(self, actor: Any) -> None:
        from mfo_actors.actors._gate import UpstreamGate
        from mfo_actors.actors.breaker import BreakerActor

        self.actor = actor
        breaker = BreakerActor(actor._cfg)
        breaker.close()  # never run: a view asks for tokens and reports no outcomes
        self.gate = UpstreamGate(breaker, actor)

    @property
    def token(self) -> str | None:
        issued = self.actor.tokens.value
        return None if issued is None else str(issued.token)

    async def header(self) -> str | None:
        return await self.gate.header()

    async def invalidate(self, token: str | None) -> None:
        await self.gate.replace_token(f"Bearer {token}")
