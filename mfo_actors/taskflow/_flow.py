"""A compiled flow: the DAG as index arrays, templates and expressions already parsed.

Built only by the loader (:func:`~mfo_actors.taskflow.load_flow` and friends); immutable
afterwards and safe to run any number of times at once.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter

from mfo_actors.taskflow._expr import Expression
from mfo_actors.taskflow._model import FlowSpec, RetrySpec, TaskSpec, TriggerRule
from mfo_actors.taskflow._registry import TaskFunc, TaskType

__all__ = ["EventTrigger", "Flow", "Node", "ScheduleTrigger"]


class Node:
    """One task of a compiled flow (``index`` is its position in :attr:`Flow.nodes`)."""

    __slots__ = (
        "branch_targets", "branches", "config", "config_tree", "default_branch", "deps", "func",
        "id", "index", "is_condition", "line", "retry", "spec", "succs", "task_type", "timeout",
        "trigger_rule", "type", "when",
    )  # fmt: skip

    def __init__(self, index: int, spec: TaskSpec, task_type: TaskType | None, line: int | None
                 ) -> None:
        self.index = index
        self.spec = spec
        self.id = spec.id
        self.type = spec.type
        self.task_type = task_type
        self.line = line
        self.deps: tuple[int, ...] = ()
        self.succs: tuple[int, ...] = ()
        self.when: Expression | None = None
        self.trigger_rule: TriggerRule = spec.trigger_rule
        self.retry: RetrySpec | None = spec.retry
        self.timeout: float | None = spec.timeout
        self.config: Any = None  # the validated config Struct, when it has no templates
        self.config_tree: Any = None  # the compiled raw config, when it has templates
        self.func: TaskFunc | None = None  # built once at load when the config is static
        self.is_condition = False
        self.branches: list[tuple[Expression, tuple[int, ...]]] = []
        self.default_branch: tuple[int, ...] = ()
        self.branch_targets: frozenset[int] = frozenset()

    def __repr__(self) -> str:
        return f"Node({self.id!r}, type={self.type!r})"


class EventTrigger:
    """``event: {source, type, when}``: globs on source/type, then the optional expression."""

    __slots__ = ("index", "source", "type", "when")

    def __init__(self, index: int, source: str, type: str, when: Expression | None) -> None:
        self.index = index
        self.source = source
        self.type = type
        self.when = when

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Does *event* (see :func:`~mfo_actors.taskflow.event_scope`) start the flow?

        An expression that fails on this event (a missing key) counts as no match.
        """
        if not fnmatch.fnmatchcase(str(event.get("source", "")), self.source):
            return False
        if not fnmatch.fnmatchcase(str(event.get("type", "")), self.type):
            return False
        if self.when is None:
            return True
        try:
            return bool(self.when.evaluate({"event": event}))
        except Exception:
            return False


class ScheduleTrigger:
    """A ``cron`` or ``interval`` trigger; ``key`` is stable across restarts (for dedupe)."""

    __slots__ = ("cron", "index", "interval", "key", "kind", "timezone")

    def __init__(self, index: int, kind: Literal["cron", "interval"], *, cron: str | None = None,
                 interval: float | None = None, timezone: str | None = None) -> None:
        self.index = index
        self.kind = kind
        self.cron = cron
        self.interval = interval
        self.timezone = timezone
        self.key = f"cron:{cron}@{timezone or ''}" if kind == "cron" else f"interval:{interval:g}"

    def next_after(self, t: float, *, default_timezone: str = "UTC") -> float:
        """The first tick strictly after the epoch time *t*.

        Interval ticks are aligned to multiples of the interval since the epoch, so a
        restart computes the same ticks as before it and a tick never fires twice.
        """
        if self.kind == "interval":
            assert self.interval is not None
            return (math.floor(t / self.interval) + 1) * self.interval
        assert self.cron is not None
        tz = ZoneInfo(self.timezone or default_timezone)
        start = datetime.fromtimestamp(t, tz)
        nxt: datetime = croniter(self.cron, start).get_next(datetime)
        return nxt.timestamp()


class Flow:
    """A loaded, validated flow. Run it with :class:`~mfo_actors.taskflow.FlowExecutor`."""

    __slots__ = (
        "event_triggers", "file", "index", "name", "nodes", "outputs_tree", "roots",
        "schedules", "spec", "subflows",
    )  # fmt: skip

    def __init__(self, spec: FlowSpec, file: str, nodes: list[Node], outputs_tree: Any,
                 event_triggers: list[EventTrigger], schedules: list[ScheduleTrigger],
                 subflows: set[str]) -> None:
        self.spec = spec
        self.name = spec.name
        self.file = file
        self.nodes = tuple(nodes)
        self.index = {n.id: n.index for n in nodes}
        self.roots = tuple(n.index for n in nodes if not n.deps)
        self.outputs_tree = outputs_tree
        self.event_triggers = event_triggers
        self.schedules = schedules
        self.subflows = frozenset(subflows)  # flow names this flow calls as subflows

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, tasks={len(self.nodes)})"

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency

    @property
    def on_failure(self) -> str:
        return self.spec.on_failure

    @property
    def on_interrupt(self) -> str:
        return self.spec.on_interrupt

    @property
    def timeout(self) -> float | None:
        return self.spec.timeout

    def task(self, task_id: str) -> Node:
        return self.nodes[self.index[task_id]]

    def matches_event(self, event: Mapping[str, Any]) -> bool:
        """True when any event trigger of this flow matches *event* (an event scope dict)."""
        return any(t.matches(event) for t in self.event_triggers)
