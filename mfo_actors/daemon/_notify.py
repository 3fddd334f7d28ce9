"""systemd's notify protocol (``sd_notify``), written by hand on an anyio UNIX datagram socket.

The protocol is a few newline-separated ``KEY=VALUE`` lines in one datagram sent to the socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for Linux's abstract namespace). We send
``READY=1`` once every actor is ready, ``STATUS=...`` as things change, ``RELOADING=1`` (with
``MONOTONIC_USEC``, as ``Type=notify-reload`` requires) then ``READY=1`` around a reload,
``STOPPING=1`` on shutdown and ``WATCHDOG=1`` pings when ``$WATCHDOG_USEC`` asks for them.
Notifications are best effort: a failed send is logged once and never stops the daemon.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import TracebackType

import anyio
from anyio.abc import UNIXDatagramSocket

from mfo_actors.observability import get_logger

__all__ = ["SystemdNotifier", "watchdog_interval"]

log = get_logger(__name__)


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd's watchdog is off for us.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it watches); pinging at
    half the period, as sd_watchdog_enabled(3) recommends, leaves room for one late ping.
    """
    usec = environ.get("WATCHDOG_USEC", "").strip()
    if not usec.isdigit() or int(usec) == 0:
        return None
    watched = environ.get("WATCHDOG_PID", "").strip()
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1_000_000


class SystemdNotifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; a no-op when it is not set.

    Usage::

        async with SystemdNotifier.from_environ() as notifier:
            await notifier.notify(READY=1, STATUS="running")
    """

    def __init__(self, address: str | None) -> None:
        # "@name" is the abstract namespace, written with a leading NUL on the wire.
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._socket: UNIXDatagramSocket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def __aenter__(self) -> SystemdNotifier:
        if self.address is not None:
            try:
                self._socket = await anyio.create_unix_datagram_socket()
            except OSError as exc:
                self._warn(exc)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            await sock.aclose()

    async def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; return whether it was sent."""
        sock, address = self._socket, self.address
        if sock is None or address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = " ".join(str(value).splitlines())  # a newline would start a new field
            lines.append(f"{key}={text}")
        try:
            await sock.sendto("\n".join(lines).encode(), address)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._warn(exc)
            return False
        return True

    async def ready(self, status: str) -> bool:
        return await self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    async def reloading(self, status: str = "reloading configuration") -> bool:
        """``RELOADING=1``; systemd (``Type=notify-reload``, v253+) matches the reload to the
        signal by ``MONOTONIC_USEC``, the CLOCK_MONOTONIC time of the message."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.notify(RELOADING=1, STATUS=status, MONOTONIC_USEC=usec)

    async def stopping(self, status: str) -> bool:
        return await self.notify(STOPPING=1, STATUS=status)

    async def status(self, status: str) -> bool:
        return await self.notify(STATUS=status)

    async def watchdog(self) -> bool:
        return await self.notify(WATCHDOG=1)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:  # once: a missing socket would otherwise log every ping
            self._warned = True
            log.warning("daemon.notify_failed", socket=self.address, error=repr(exc))
