"""Run history plumbing shared by the scheduler actor and ``flows run``: the store recorder,
and settling a run whatever the store's hiccups.

The taskflow engine knows no store; it reports task state changes to a
:class:`~mfo_actors.taskflow.RunRecorder`. :class:`StoreRecorder` turns them into
``TaskRunRecord`` rows (``store.record_task``) and feeds ``mfo_task_duration_seconds``.

:func:`finish_run_retrying` records a run's result, trying again with backoff while the
store fails (Postgres restarting, a lock timeout, a full disk): giving up would leave the run
``active``, to be run again by the next start's recovery (or another node) although it ran,
or record it ``error`` although it succeeded. :func:`retry_store` is the loop itself (the
scheduler also uses it to give back runs whose lease it lost).

Error texts are stored redacted (:func:`stored_error`), like an event's ``last_error``: a
task calling the MFO server fails with the server's error body, which may echo our token.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal, TypeVar

import anyio

from mfo_actors.metrics import TASK_DURATION
from mfo_actors.observability import get_logger, redact
from mfo_actors.store import EventStore, StoreClosedError, StoreError, TaskRunRecord

__all__ = ["SETTLE_BACKOFF_FIRST", "SETTLE_BACKOFF_MAX", "StoreRecorder", "finish_run_retrying",
           "retry_store", "stored_error"]

log = get_logger(__name__)

T = TypeVar("T")

SETTLE_BACKOFF_FIRST = 0.05  # seconds before the first retry of a failed finish_run
SETTLE_BACKOFF_MAX = 5.0  # ... doubling up to this

# Task states that end a task (the engine calls task_finished exactly once with one of these).
_TIMED_STATES = frozenset({"done", "error"})


def stored_error(error: str | None) -> str | None:
    """*error* as a run or task record keeps it: without any secret (a token the upstream
    echoed back in its error body, which an ``mfo.*`` task's error carries)."""
    return None if error is None else str(redact(error))


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
            attempts=attempts, started_at=started_at, finished_at=finished_at,
            error=stored_error(error), output=output,
        ))
        if state in _TIMED_STATES and started_at is not None and finished_at is not None:
            TASK_DURATION.labels(instance=self._instance, flow=self._flow,
                                 task=task_id).observe(max(0.0, finished_at - started_at))


async def retry_store(call: Callable[[], Awaitable[T]], *, what: str, run_id: str,
                      on_retry: Callable[[StoreError], None] | None = None) -> T:
    """``await call()``, tried again (backoff from SETTLE_BACKOFF_FIRST, doubling to
    SETTLE_BACKOFF_MAX) for as long as it raises StoreError: until the store takes it, or the
    caller is cancelled (stop; the run then stays ``active`` and recovery applies the flow's
    ``on_interrupt``). A closed store (StoreClosedError) is not waited for: it is raised.
    *on_retry* is told each failure (the scheduler keeps it for ``/readyz``); *what* names
    the call in the logs (``scheduler.<what>_retry``)."""
    delay = SETTLE_BACKOFF_FIRST
    tries = 0
    while True:
        try:
            result = await call()
        except StoreClosedError:
            raise
        except StoreError as exc:
            tries += 1
            if on_retry is not None:
                on_retry(exc)
            log.warning(f"scheduler.{what}_retry", run_id=run_id, tries=tries, retry_in=delay,
                        error=str(exc))
            await anyio.sleep(delay)
            delay = min(delay * 2, SETTLE_BACKOFF_MAX)
            continue
        if tries:
            log.info(f"scheduler.{what}_recovered", run_id=run_id, tries=tries)
        return result


async def finish_run_retrying(
    store: EventStore, run_id: str, *, status: Literal["done", "error"],
    error: str | None = None, outputs: dict[str, Any] | None = None,
    on_retry: Callable[[StoreError], None] | None = None,
) -> None:
    """``store.finish_run`` under :func:`retry_store`, the error redacted (:func:`stored_error`)."""
    await retry_store(partial(store.finish_run, run_id, status=status,
                              error=stored_error(error), outputs=outputs),
                      what="settle", run_id=run_id, on_retry=on_retry)
