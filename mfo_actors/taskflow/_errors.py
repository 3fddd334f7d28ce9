"""The taskflow error tree.

::

    MFOError
    ├── UserError
    │   └── ConfigError                 (mfo_actors.errors: file, key, line)
    │   │   └── FlowLoadError           several problems in flow files, in ``.errors``
    │   └── ExpressionSyntaxError       a ``when:`` / branch expression does not parse
    └── TaskflowError                   something went wrong while running a flow
        ├── TemplateError               a ``${...}`` reference has no value at run time
        ├── ExpressionError             a ``when:`` expression failed to evaluate
        ├── TaskOutputError             a task function returned something not a dict
        ├── ClientUnavailableError      an ``mfo.*`` task ran without an MFO client
        ├── SessionsUnavailableError    ``mfo.chat`` with ``session:`` ran without a store
        ├── TaskFailure                 a task failed and says what it did (``output``)
        │   └── JobFailedError          ``mfo.job.create`` waited for a job that ended in error
        ├── UnknownFlowError            ``run``/``subflow`` named a flow that is not loaded
        └── SubflowError                a subflow run ended in error
"""

from __future__ import annotations

from typing import Any

from mfo_actors.errors import ConfigError, MFOError, UserError

__all__ = [
    "ClientUnavailableError",
    "ExpressionError",
    "ExpressionSyntaxError",
    "FlowLoadError",
    "JobFailedError",
    "SessionsUnavailableError",
    "SubflowError",
    "TaskFailure",
    "TaskOutputError",
    "TaskflowError",
    "TemplateError",
    "UnknownFlowError",
]


class TaskflowError(MFOError):
    """A run-time failure inside the engine (as opposed to a bad flow file)."""


class TemplateError(TaskflowError):
    """A ``${...}`` reference names a value that does not exist in this run."""


class ExpressionError(TaskflowError):
    """A ``when:`` or branch expression could not be evaluated (e.g. ``"a" < 1``)."""


class TaskOutputError(TaskflowError):
    """A task function returned something other than a dict (or None)."""


class ClientUnavailableError(TaskflowError):
    """An ``mfo.*`` task ran, but the executor was given no MFO client."""

    def __init__(self, task_type: str) -> None:
        super().__init__(
            f"task type {task_type} needs an MFO client, but the executor has none "
            "(pass client= to FlowExecutor)"
        )
        self.task_type = task_type


class SessionsUnavailableError(TaskflowError):
    """``mfo.chat`` with ``session:`` ran, but the executor was given no session keeper."""

    def __init__(self) -> None:
        super().__init__("chat sessions need a store: this executor has none "
                         "(pass sessions= to FlowExecutor)")


class TaskFailure(TaskflowError):
    """A task failed; *output* says what it did before (kept in the task's record).

    Raise it (or a subclass) from a task so that ``runs show`` has more than the message:
    the id of a job and its state history, say.
    """

    def __init__(self, message: str, *, output: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.output = output


class JobFailedError(TaskFailure):
    """A job ``mfo.job.create`` waited for ended in ``error``; the message is the job's."""


class UnknownFlowError(TaskflowError):
    """A flow was asked for by name and is not loaded."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown flow {name!r} (loaded: {', '.join(sorted(known)) or 'none'})")
        self.name = name


class SubflowError(TaskflowError):
    """A subflow's run ended with status error; the message carries its error."""


class ExpressionSyntaxError(UserError):
    """An expression does not parse; ``column`` is 1-based within the expression text."""

    def __init__(self, message: str, *, column: int | None = None) -> None:
        self.message = message if column is None else f"{message} (column {column})"
        super().__init__(self.message)
        self.column = column


class FlowLoadError(ConfigError):
    """One or more flow files are invalid; every problem is in :attr:`errors`.

    ``str()`` is the first problem, plus how many more there are, so the CLI's one line
    stays useful; ``check`` prints every entry of :attr:`errors`.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.message, file=first.file, key=first.key, line=first.line)
        self.errors = errors
        if len(errors) > 1:
            self.args = (f"{self.args[0]} (and {len(errors) - 1} more problems)",)
