"""Run history plumbing shared by the scheduler actor and ``flows run``: the store recorder.

The taskflow engine knows no store; it reports task state changes to a
:class:`~mfo_actors.taskflow.RunRecorder`. :class:`StoreRecorder` turns them into
``TaskRunRecord`` rows (``store.record_task``) and feeds ``mfo_task_duration_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mfo_actors.metrics import TASK_DURATION
from mfo_actors.store import EventStore, TaskRunRecord

__all__ = ["StoreRecorder"]

# Task states that end a task (the engine calls task_finished exactly once with one of these).
_TIMED_STATES = frozenset({"done", "error"})


class StoreRecorder:
    """Writes one run's task records to the store as the engine reports them.

    Args:
      store: Where the records go.
      run_id: The run's id (the ``RunRecord``'s).
      flow: The flow's name (metric label).
      instance: The instance name (metric label).
      wall: Wall-clock seconds for the ``started_at`` of a running attempt.
    """

    __slots__ = ("_first_start", "_flow", "_instance", "_run_id", "_store", "_wall")

    def __init__(self, store: EventStore, run_id: str, flow: str, *, instance: str,
                 wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self._run_id = run_id
        self._flow = flow
        self._instance = instance
        self._wall = wall
        self._first_start: dict[str, float] = {}

    async def task_started(self, task_id: str, attempt: int) -> None:
        """A task (attempt) starts: its record becomes ``running`` with the attempt count."""
        started = self._first_start.setdefault(task_id, self._wall())
        await self._store.record_task(TaskRunRecord(
            run_id=self._run_id, task_id=task_id, state="running", attempts=attempt,
            started_at=started,
        ))

    async def task_finished(
        self,
        task_id: str,
        state: str,
        attempts: int,
        output: dict[str, Any] | None,
        error: str | None,
        started_at: float | None,
        finished_at: float | None,
    ) -> None:
        """A task's final state (done, error, skipped, cancelled); outputs are capped by the
        store."""
        if started_at is None:
            started_at = self._first_start.get(task_id)
        await self._store.record_task(TaskRunRecord(
            run_id=self._run_id, task_id=task_id, state=state,  # type: ignore[arg-type]
            attempts=attempts, started_at=started_at, finished_at=finished_at, error=error,
            output=output,
        ))
        if state in _TIMED_STATES and started_at is not None and finished_at is not None:
            TASK_DURATION.labels(instance=self._instance, flow=self._flow,
                                 task=task_id).observe(max(0.0, finished_at - started_at))
