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
from mfo_actors.observability import get_logger
from mfo_actors.store import EventStore, StoreError, TaskRunRecord

__all__ = ["StoreRecorder"]

log = get_logger(__name__)

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

    async def _write(self, record: TaskRunRecord) -> None:
        # History must not crash the run: a failed write (disk full, store closing) is logged
        # and the run goes on; its final state is settled by finish_run, or by recover_runs.
        try:
            await self._store.record_task(record)
        except StoreError as exc:
            log.error("scheduler.task_record_failed", run_id=self._run_id,
                      task=record.task_id, state=record.state, error=str(exc))

    async def task_started(self, task_id: str, attempt: int) -> None:
        """A task (attempt) starts: its record becomes ``running`` with the attempt count."""
        started = self._first_start.setdefault(task_id, self._wall())
        await self._write(TaskRunRecord(
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
        await self._write(TaskRunRecord(
            run_id=self._run_id, task_id=task_id, state=state,  # type: ignore[arg-type]
            attempts=attempts, started_at=started_at, finished_at=finished_at, error=error,
            output=output,
        ))
        if state in _TIMED_STATES and started_at is not None and finished_at is not None:
            TASK_DURATION.labels(instance=self._instance, flow=self._flow,
                                 task=task_id).observe(max(0.0, finished_at - started_at))
