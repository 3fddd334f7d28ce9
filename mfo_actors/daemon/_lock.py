"""One daemon per state dir: an exclusive ``flock`` on ``<state_dir>/daemon.lock``.

The kernel drops a flock when its holder's file descriptor closes, which includes the process
dying from ``kill -9``; so a stale lock file never blocks a restart (unlike a pid file, whose
pid may have been reused). The pid written into the file is only there for the error message.

A flock protects a file, not a path: if the lock file is removed (``rm -rf`` of the state
dir), a second daemon can create a new one and lock it. :meth:`StateDirLock.check` tells
whether the path still names the file we hold, and :meth:`StateDirLock.retake` locks the
path again when it is free (the daemon's state-dir guard calls both every second).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from mfo_actors.errors import UserError

__all__ = ["LOCK_FILE_NAME", "StateDirLock", "StateDirLockedError", "running_daemon_pid"]

LOCK_FILE_NAME = "daemon.lock"


class StateDirLockedError(UserError):
    """Another live process holds the state dir's lock: a second daemon on the same instance."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"another mfo-actors daemon is already running on state_dir {state_dir} ({holder})"
        )
        self.state_dir = state_dir
        self.pid = pid


class StateDirLock:
    """Hold ``<state_dir>/daemon.lock`` for as long as the daemon runs.

    Usage::

        with StateDirLock(state_dir):
            ...  # the only daemon on this state dir

    Raises (on enter):
      StateDirLockedError: another process holds the lock.
      UserError: the state dir cannot be created or the lock file cannot be opened.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE_NAME
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # non-inheritable (PEP 446)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if isinstance(exc, FileExistsError | NotADirectoryError):
                reason = "a file is in the way (the state dir and its parents must be directories)"
            elif isinstance(exc, PermissionError):
                reason = "not writable by this user (the daemon keeps its lock and store there)"
            raise UserError(f"cannot use state_dir {self.state_dir}: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateDirLockedError(self.state_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def check(self) -> str | None:
        """None while ``<state_dir>/daemon.lock`` is the file we hold; else what happened."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "removed" if self.state_dir.is_dir() else "state_dir removed"
        except OSError as exc:
            return f"cannot be checked: {exc.strerror or exc}"
        if (st.st_dev, st.st_ino) != self._identity:
            return "replaced"
        return None

    def retake(self) -> bool:
        """Lock the path again after :meth:`check` found it removed or replaced; True when
        we hold it now. False when the state dir is gone or another process holds the new
        lock file (:class:`StateDirLockedError` is not raised: the caller decides)."""
        if not self.state_dir.is_dir():
            return False
        old = self._fd
        try:
            self.acquire()
        except (StateDirLockedError, UserError):
            return False
        if old is not None:
            os.close(old)
        return True

    def held_by_other(self) -> bool:
        """True when another process holds a lock on the file now at the path."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Unlock; the file stays (removing it would race with a daemon starting now)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding *state_dir*'s lock, or None when no daemon holds it.

    The probe takes a shared lock for an instant when it is free, so a daemon starting at
    that very moment could be told the state dir is busy (it exits 1; systemd restarts it).
    """
    try:
        fd = os.open(state_dir / LOCK_FILE_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
