"""Durable events and run history behind one protocol (SQLite by default, Redis for scale-out)."""

from mfo_actors.store._protocol import AppendResult as AppendResult
from mfo_actors.store._protocol import EventStatus as EventStatus
from mfo_actors.store._protocol import EventStore as EventStore
from mfo_actors.store._protocol import RunRecord as RunRecord
from mfo_actors.store._protocol import RunRequest as RunRequest
from mfo_actors.store._protocol import StoreClosedError as StoreClosedError
from mfo_actors.store._protocol import StoredEvent as StoredEvent
from mfo_actors.store._protocol import StoreError as StoreError
from mfo_actors.store._protocol import StoreFullError as StoreFullError
from mfo_actors.store._protocol import StoreStats as StoreStats
from mfo_actors.store._protocol import TaskRunRecord as TaskRunRecord
from mfo_actors.store._protocol import TaskState as TaskState

__all__ = [
    "AppendResult",
    "EventStatus",
    "EventStore",
    "RunRecord",
    "RunRequest",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "StoredEvent",
    "TaskRunRecord",
    "TaskState",
]
