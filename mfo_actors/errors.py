"""The root of every error mfo_actors raises on purpose, and the user-facing config error.

Each layer grows its own branch under :class:`MFOError` (``client.errors``, ``store``,
``taskflow.errors``); everything a user can fix by editing a file is a :class:`UserError`
and is shown by the CLI as one line, never a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "MFOError", "UserError"]


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
