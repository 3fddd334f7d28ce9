"""The store recorder: task history that cannot be written never crashes the run."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from mfo_actors.actors._runs import StoreRecorder
from mfo_actors.store import StoreError, TaskRunRecord
from mfo_actors.taskflow import FlowExecutor, default_registry, load_flow_text

pytestmark = pytest.mark.anyio

FLOW = """
name: TwoSteps
tasks:
  - id: a
    type: set
    config: {values: {x: 1}}
  - id: b
    type: set
    dependencies: [a]
    config: {values: {y: "${a.x}"}}
"""


class FullDiskStore:
    """Only what StoreRecorder calls: every write fails like a full disk."""

    def __init__(self) -> None:
        self.attempts: list[TaskRunRecord] = []

    async def record_task(self, record: TaskRunRecord) -> None:
        self.attempts.append(record)
        raise StoreError("database or disk is full")


async def test_failed_task_records_are_logged_and_the_run_finishes() -> None:
    """Every record write fails; the run still ends done and each failure is logged."""
    store = FullDiskStore()
    recorder = StoreRecorder(store, "run-1", "TwoSteps", instance="test")  # type: ignore[arg-type]
    flow = load_flow_text(FLOW, default_registry(entry_points=False))
    with capture_logs() as logs:
        outcome = await FlowExecutor({flow.name: flow}).run(flow, run_id="run-1",
                                                            recorder=recorder)
    assert outcome.status == "done"
    assert {r.task_id for r in store.attempts} == {"a", "b"}
    failures: list[dict[str, Any]] = [e for e in logs
                                      if e["event"] == "scheduler.task_record_failed"]
    assert len(failures) == len(store.attempts)
