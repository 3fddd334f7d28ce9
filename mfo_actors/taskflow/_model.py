"""The flow file as written: msgspec Structs, frozen, unknown keys forbidden.

These mirror ``flows/*.yaml`` one to one (see the package docstring for an example); the
loader turns a :class:`FlowSpec` into a compiled :class:`~mfo_actors.taskflow.Flow`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from mfo_actors._yaml import Duration

__all__ = [
    "EventMatchSpec",
    "FlowSpec",
    "RetrySpec",
    "TaskSpec",
    "TriggerRule",
    "TriggerSpec",
]

TriggerRule = Literal["all_done", "always", "one_done"]


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the flow-file Structs."""


class RetrySpec(_Spec, frozen=True, kw_only=True):
    """Retry of one task: exponential backoff with full jitter (uniform in [0, backoff])."""

    max_attempts: int = 3
    initial_backoff: Duration = Duration(1.0)
    max_backoff: Duration = Duration(60.0)
    backoff_multiplier: float = 2.0
    jitter: bool = True


class EventMatchSpec(_Spec, frozen=True, kw_only=True):
    """Which events start the flow: ``source`` and ``type`` are globs; ``when`` an expression."""

    source: str = "*"
    type: str = "*"
    when: str | None = None


class TriggerSpec(_Spec, frozen=True, kw_only=True):
    """Exactly one of ``event``, ``cron`` (croniter syntax) or ``interval`` (a duration)."""

    event: EventMatchSpec | None = None
    cron: str | None = None
    interval: Duration | None = None
    timezone: str | None = None  # cron only; default flows.timezone of the instance


class TaskSpec(_Spec, frozen=True, kw_only=True):
    """One node of the DAG."""

    id: str
    type: str
    description: str = ""
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    dependencies: list[str] = msgspec.field(default_factory=list)
    when: str | None = None
    trigger_rule: TriggerRule = "all_done"
    retry: RetrySpec | None = None  # None: one attempt
    timeout: Duration | None = None


class FlowSpec(_Spec, frozen=True, kw_only=True):
    """One flow file."""

    name: str
    description: str = ""
    triggers: list[TriggerSpec] = msgspec.field(default_factory=list)
    concurrency: int = 4  # tasks at once within one run
    on_failure: Literal["fail_fast", "continue"] = "fail_fast"
    on_interrupt: Literal["rerun", "fail"] = "rerun"  # what the scheduler does after a crash
    timeout: Duration | None = None  # whole run
    outputs: dict[str, Any] = msgspec.field(default_factory=dict)
    tasks: list[TaskSpec]
