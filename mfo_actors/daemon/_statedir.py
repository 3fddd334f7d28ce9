"""The state-dir guard: notices the state dir vanishing under a running daemon.

``rm -rf`` of the state dir (or a remount over it) leaves the daemon holding open files that
no path names any more: it would go on acknowledging webhooks into a deleted store, stay
ready, and a second daemon could create a fresh lock file and start on the same dir. Every
:data:`CHECK_INTERVAL` seconds the guard checks that the lock file and the store file still
are the files the daemon opened (same device and inode):

* the lock file alone was removed (the dir is there): it is locked again at once;
* otherwise the dir is **lost**: an error log line (``daemon.state_dir_lost``), ``/readyz``
  not ready (the ``state_dir`` check), and, since the SQLite store makes the same check
  before each write, webhooks are answered 503;
* lost for :data:`LOST_GRACE` seconds, or at once when another daemon holds the lock file
  now at the path: the daemon stops and exits 1 (``Restart=on-failure`` then starts it on a
  fresh dir). If the files come back (a remount of the same filesystem) before that, the
  daemon goes on (``daemon.state_dir_restored``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.daemon._lock import StateDirLock
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock

__all__ = ["CHECK_INTERVAL", "LOST_GRACE", "StateDirGuard"]

log = get_logger(__name__)

CHECK_INTERVAL = 1.0  # seconds between checks: two stat calls
LOST_GRACE = 30.0  # seconds a lost state dir may take to come back before the daemon exits
TAKEN_OVER = "another daemon holds the lock file now at this path"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class StateDirGuard:
    """Checks the state dir every *interval*; calls *fail* when it is lost for good.

    Args:
      lock: The daemon's held lock (its file is checked, and retaken when only it was removed).
      files: Other files the daemon keeps open there (the SQLite store), checked likewise.
      fail: Called once with the reason when the daemon must stop and exit non-zero.
      clock: Time source (tests pass a FakeClock).
      interval: Seconds between checks.
      grace: Seconds a lost dir may take to come back.
    """

    name = "statedir"
    restart = RestartPolicy("permanent")

    def __init__(self, lock: StateDirLock, *, files: Sequence[Path] = (),
                 fail: Callable[[str], None], clock: Clock | None = None,
                 interval: float = CHECK_INTERVAL, grace: float = LOST_GRACE) -> None:
        self._lock = lock
        self._files = {path: _identity(path) for path in files}
        self._fail = fail
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._interval = interval
        self._grace = grace
        self._stop = anyio.Event()
        self._problem: str | None = None
        self._lost_since: float | None = None
        self._failed = False

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: not ok while the state dir is lost."""
        return {"ok": self._problem is None, "state_dir": str(self._lock.state_dir),
                "problem": self._problem}

    @property
    def ok(self) -> bool:
        return self._problem is None

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
            while True:
                await self.check()
                await self._clock.sleep(self._interval)

    def request_stop(self) -> None:
        self._stop.set()

    async def check(self) -> None:
        """One check (stat calls in a worker thread: a hung mount must not stall the loop)."""
        problem = await anyio.to_thread.run_sync(self._find_problem)
        now = self._clock.monotonic()
        if problem is None:
            if self._problem is not None:
                log.info("daemon.state_dir_restored", state_dir=str(self._lock.state_dir))
            self._problem = self._lost_since = None
            return
        if self._problem is None:
            self._lost_since = now
            log.error("daemon.state_dir_lost", state_dir=str(self._lock.state_dir),
                      problem=problem, grace_s=self._grace,
                      hint="webhooks are refused (503) and /readyz is not ready; the daemon "
                           "exits unless the state dir comes back")
        self._problem = problem
        assert self._lost_since is not None
        if not self._failed and (problem == TAKEN_OVER or now - self._lost_since >= self._grace):
            self._failed = True
            self._fail(f"state_dir {self._lock.state_dir} lost: {problem}")

    def _find_problem(self) -> str | None:
        lock = self._lock.check()
        if lock == "replaced" and self._lock.held_by_other():
            return TAKEN_OVER
        files_ok = all(_identity(path) == ident for path, ident in self._files.items())
        if lock is not None and files_ok and self._lock.retake():
            log.warning("daemon.state_dir_lock_retaken", path=str(self._lock.path), was=lock)
            lock = None
        if lock is not None:
            return f"lock file {lock}"
        for path, ident in self._files.items():
            if _identity(path) != ident:
                return f"{path.name} removed or replaced"
        return None
