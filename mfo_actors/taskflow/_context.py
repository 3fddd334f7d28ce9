"""What a task function receives: :class:`TaskContext`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from mfo_actors.taskflow._template import compile_template

if TYPE_CHECKING:
    from mfo_actors.taskflow._executor import _Run
    from mfo_actors.taskflow._flow import Node
    from mfo_actors.taskflow._sessions import ChatSessions

__all__ = ["TaskContext", "event_scope"]


class TaskContext:
    """Everything one execution (attempt) of a task may use.

    Attributes:
      run_id: The run's id (``${run.id}``).
      flow: The flow's name (``${flow.name}``).
      task_id: This task's id.
      attempt: 1 for the first attempt, 2 for the first retry, ...
      config: The task's validated config Struct (templates already rendered).
      event: The triggering event as a dict (``id source type received_at headers payload``),
        or None for a manual, cron or subflow run.
      input: The run's input (manual ``--input``, a subflow's ``input``), a dict.
      outputs: The template scope: outputs of finished tasks by id (its ancestors' are
        always there), plus ``event``/``input``/``flow``/``run``. Read-only by convention.
      client: The MFO client (``mfo_actors.client.MFOClient``) or None.
      sessions: The chat session keeper (:class:`ChatSessions`) or None.
    """

    __slots__ = ("_node", "_run", "attempt", "config")

    def __init__(self, run: _Run, node: Node, attempt: int, config: Any) -> None:
        self._run = run
        self._node = node
        self.attempt = attempt
        self.config = config

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def flow(self) -> str:
        return self._run.flow.name

    @property
    def task_id(self) -> str:
        return self._node.id

    @property
    def task_type(self) -> str:
        return self._node.type

    @property
    def event(self) -> dict[str, Any] | None:
        return self._run.event

    @property
    def input(self) -> dict[str, Any]:
        return self._run.input

    @property
    def outputs(self) -> Mapping[str, Any]:
        return self._run.scope

    @property
    def client(self) -> Any:
        return self._run.executor.client

    @property
    def sessions(self) -> ChatSessions | None:
        return self._run.executor.sessions

    def set_session(self, session: Mapping[str, Any]) -> None:
        """Make *session* the run's ``${session.…}`` (the last one a task talked in)."""
        self._run.scope["session"] = dict(session)

    @property
    def log(self) -> Any:
        """A structlog logger bound with flow, run_id and task."""
        return self._run.log.bind(task=self._node.id)

    def render(self, text: str) -> Any:
        """Render a ``${...}`` template against this run (compiled on each call)."""
        compiled = compile_template(text)
        return compiled if isinstance(compiled, str) else compiled.render(self._run.scope)

    async def run_subflow(self, name: str, input: Mapping[str, Any] | None = None
                          ) -> dict[str, Any]:
        """Run flow *name* to completion as a child of this run; returns its ``outputs:``.

        Raises:
          SubflowError: the subflow ended in error.
          UnknownFlowError: no flow of that name is loaded in the executor.
        """
        return await self._run.run_subflow(name, dict(input or {}))


_DECODE: Any = object()  # event_scope's payload: decode the body


def event_scope(event: Any, *, payload: Any = _DECODE) -> dict[str, Any] | None:
    """The ``${event.…}`` view of an event: a dict, a msgspec Struct or ``messages.Event``.

    For a stored :class:`~mfo_actors.messages.Event` the JSON body becomes ``payload`` (a raw
    body becomes text), as the forwarder sends it. *payload*: the body already decoded
    (the listener decodes it once for the event type and the flow triggers).
    """
    if event is None:
        return None
    if isinstance(event, Mapping):
        return dict(event)
    body = getattr(event, "body", None)
    if isinstance(body, bytes | bytearray) and hasattr(event, "source"):
        if payload is not _DECODE:
            pass
        elif getattr(event, "is_json", True):
            try:
                payload = msgspec.json.decode(body) if body else None
            except msgspec.DecodeError:
                payload = body.decode("utf-8", "replace")
        else:
            payload = body.decode("utf-8", "replace")
        return {
            "id": event.id, "source": event.source, "type": event.type,
            "received_at": event.received_at, "headers": dict(event.headers), "payload": payload,
        }  # fmt: skip
    if isinstance(event, msgspec.Struct):
        out = msgspec.to_builtins(event)
        return out if isinstance(out, dict) else {"value": out}
    raise TypeError(f"cannot use {type(event).__name__} as an event")
