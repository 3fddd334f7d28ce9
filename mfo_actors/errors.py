"""The root of every error mfo_actors raises on purpose, and the user-facing config error.

Each layer grows its own branch under :class:`MFOError` (``client.errors``, ``store``,
``taskflow.errors``); everything a user can fix by editing a file is a :class:`UserError`
and is shown by the CLI as one line, never a traceback.
"""

from __future__ import annotations

import errno

__all__ = ["ConfigError", "ListenError", "MFOError", "UserError"]


class MFOError(Exception):
    """Root of every error mfo_actors raises on purpose."""


class UserError(MFOError):
    """Something the user can fix (a file, a flag, a key): the CLI prints it and exits 1."""


class ConfigError(UserError):
    """A config or flow file is wrong: names the file, the key path and the YAML line.

    Args:
      message: What is wrong, in words a user understands.
      file: The file that holds the problem, when there is one.
      key: The dotted key path (``client.retry.max_attempts``), when known.
      line: The 1-based YAML line of that key, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: " + (f"{key}: " if key else "")
        super().__init__(prefix + message)


_LISTEN_REASONS = {
    errno.EADDRINUSE: "address already in use (is another daemon or program on this port?)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "no such address on this host",
}


class ListenError(UserError):
    """A listening socket could not be opened: the port is in use, not permitted, or the
    address is not one of this host's.

    Args:
      where: What wanted to listen, e.g. ``crm.yaml: webhook_listener``.
      host: The configured address.
      port: The configured port.
      error: The OS error ``bind``/``listen`` (or the address lookup) raised.
    """

    def __init__(self, where: str, host: str, port: int, error: OSError) -> None:
        reason = _LISTEN_REASONS.get(error.errno or 0) or error.strerror or str(error)
        super().__init__(f"{where}: cannot listen on {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.errno = error.errno
