"""The actor contract the supervisor runs: name, restart policy, run and request_stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import anyio
import msgspec

__all__ = ["Actor", "ActorState", "ActorStatus", "ReadySignal", "RestartMode", "RestartPolicy"]

RestartMode = Literal["permanent", "transient", "temporary"]
ActorState = Literal["starting", "ready", "restarting", "stopping", "stopped", "failed"]

_MODES: frozenset[str] = frozenset({"permanent", "transient", "temporary"})


class RestartPolicy(msgspec.Struct, frozen=True):
    """When the supervisor restarts an actor whose ``run`` ended (never while stopping).

    - ``permanent``: always, whether ``run`` returned or raised (long-lived services).
    - ``transient``: only when ``run`` raised (a job that may finish on its own).
    - ``temporary``: never (a crash leaves the actor ``failed``).
    """

    mode: RestartMode = "permanent"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"restart mode must be one of {sorted(_MODES)}, got {self.mode!r}")


class ActorStatus(msgspec.Struct, frozen=True):
    """A snapshot of one supervised actor, as ``/readyz`` reports it."""

    state: ActorState
    """starting, ready, restarting (waiting out backoff), stopping, stopped or failed."""
    restarts: int
    """How many times the supervisor has restarted it."""
    last_error: str | None
    """``repr`` of the last crash (secrets redacted), or None."""
    since: float
    """Wall-clock Unix seconds (from the supervisor's clock) when it entered *state*."""


class ReadySignal:
    """Handed to :meth:`Actor.run`; the actor calls :meth:`set` once it can take work.

    The supervisor starts the next actor only after this is set. Tests that run an actor
    without a supervisor can make their own ``ReadySignal()`` and ``await ready.wait()``.
    """

    __slots__ = ("_event", "_on_set", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event = anyio.Event()
        self._on_set: Callable[[], None] | None = None

    def set(self) -> None:
        """Mark the actor ready (calling it again does nothing)."""
        if self._set:
            return
        self._set = True
        self._event.set()
        if self._on_set is not None:
            self._on_set()

    @property
    def is_set(self) -> bool:
        """Whether :meth:`set` has been called."""
        return self._set

    async def wait(self) -> None:
        """Wait until the actor is ready."""
        await self._event.wait()

    def __repr__(self) -> str:
        return f"<ReadySignal is_set={self._set}>"


@runtime_checkable
class Actor(Protocol):
    """What the supervisor runs. Plain attributes satisfy the two properties.

    ``run`` calls ``ready.set()`` once it can take work and returns after
    :meth:`request_stop` once in-flight work is finished. Raising from ``run`` is a crash:
    the supervisor restarts the actor by its :attr:`restart` policy, with backoff.
    """

    @property
    def name(self) -> str:
        """Unique within a supervisor; bound as ``actor`` on every log line of the actor."""
        ...

    @property
    def restart(self) -> RestartPolicy:
        """When to restart the actor after ``run`` ends."""
        ...

    async def run(self, ready: ReadySignal) -> None:
        """Do the actor's work until asked to stop (or cancelled)."""
        ...

    def request_stop(self) -> None:
        """Graceful stop: take no new work, finish what is in flight, return from ``run``.

        Sync, and must not block: the supervisor calls it from its own task and then waits
        for ``run`` to return, cancelling it when its share of the shutdown time is up.
        """
        ...
