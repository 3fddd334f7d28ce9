"""``mfo-actors runs list|show --config FILE``: the run history of an instance's flows.

Reads the store directly (works while the daemon runs, as ``events`` does). ``runs show ID``
prints the run, then one row per task: state, attempts, duration and error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from mfo_actors.commands._common import (
    LIST_DEFAULT_LIMIT,
    common_parser,
    fmt_time,
    iso,
    positive_int,
    print_json,
    short,
    table,
    with_store,
)
from mfo_actors.config import InstanceConfig, load_config
from mfo_actors.errors import UserError
from mfo_actors.observability import redact
from mfo_actors.store import EventStore, RunRecord, TaskRunRecord

__all__ = ["configure"]

RUN_STATUSES = ("new", "active", "done", "error")
NO_RUN_STORE = "no store at {where} (has the daemon or `flows run` run with this config?)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``runs list`` and ``runs show`` to the CLI."""
    parser.description = (
        "Inspect the flow run history of an instance (works while the daemon runs)."
    )
    actions = parser.add_subparsers(dest="runs_action", metavar="ACTION", required=True)
    common = common_parser()

    p = actions.add_parser("list", parents=[common], help="list runs, newest first")
    p.add_argument("--flow", help="only runs of this flow")
    p.add_argument("--status", choices=RUN_STATUSES, help="only runs in this state")
    p.add_argument("--limit", type=positive_int, default=LIST_DEFAULT_LIMIT,
                   help=f"at most N runs (default {LIST_DEFAULT_LIMIT})")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", parents=[common], help="one run and its tasks")
    p.add_argument("id", metavar="ID", help="run id")
    p.set_defaults(func=cmd_show)


# -- commands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``runs list``: a table (or JSON array) of runs, newest first."""

    async def body(store: EventStore) -> list[RunRecord]:
        return await store.list_runs(flow=args.flow, status=args.status, limit=args.limit)

    runs = with_store(_config(args), args.config, body, missing=NO_RUN_STORE)
    if args.json:
        print_json([run_summary(r) for r in runs])
    elif not runs:
        print("no runs")
    else:
        print(table(["ID", "FLOW", "STATUS", "TRIGGER", "CREATED", "DURATION", "ERROR"],
                    [_run_row(r) for r in runs]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``runs show ID``: the run's fields, then a table of its tasks."""

    async def body(store: EventStore) -> tuple[RunRecord, list[TaskRunRecord]] | None:
        return await store.get_run(args.id)

    found = with_store(_config(args), args.config, body, missing=NO_RUN_STORE)
    if found is None:
        raise UserError(f"no run with id {args.id}")
    run, tasks = found
    if args.json:
        detail = run_summary(run)
        detail.update(input=redact(run.input), outputs=redact(run.outputs),
                      tasks=[task_summary(t) for t in tasks])
        print_json(detail)
        return 0
    print_run(run)
    if tasks:
        print()
        print(task_table(tasks))
        with_output = [t for t in tasks if t.output]
        if with_output:
            print()
            print("task outputs:")
            for t in with_output:
                text = json.dumps(redact(t.output), ensure_ascii=False, default=str)
                print(f"  {t.task_id}: {_clip(text)}")
    else:
        print("no task records")
    return 0


OUTPUT_WIDTH = 300  # characters of a task's output JSON shown by ``runs show``


def _config(args: argparse.Namespace) -> InstanceConfig:
    """The instance config, for its store only (secrets it cannot resolve do not matter)."""
    return load_config(args.config, need_secrets=False)


def _clip(text: str) -> str:
    return text if len(text) <= OUTPUT_WIDTH else text[: OUTPUT_WIDTH - 3] + "..."


# -- rendering (shared with ``flows run``) ---------------------------------------------------


def print_run(run: RunRecord) -> None:
    """The run's fields as ``key: value`` lines."""
    fields: list[tuple[str, Any]] = [
        ("id", run.run_id), ("flow", run.flow), ("status", run.status),
        ("trigger", run.trigger), ("event", run.event_id), ("created", fmt_time(run.created_at)),
        ("started", fmt_time(run.started_at)), ("finished", fmt_time(run.finished_at)),
        ("duration", fmt_duration(run.started_at, run.finished_at)),
    ]  # fmt: skip
    if run.schedule_key is not None:
        fields.append(("schedule", f"{run.schedule_key} tick {fmt_time(run.tick)}"))
    if run.interrupted:
        fields.append(("interrupted", run.interrupted))
    if run.input:
        fields.append(("input", json.dumps(redact(run.input), ensure_ascii=False)))
    if run.outputs:
        fields.append(("outputs", json.dumps(redact(run.outputs), ensure_ascii=False)))
    if run.error:
        fields.append(("error", redact(run.error)))
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {'-' if value in (None, '') else value}")


def task_table(tasks: Sequence[TaskRunRecord]) -> str:
    """TASK STATE ATTEMPTS DURATION ERROR, in the order tasks were first recorded."""
    return table(["TASK", "STATE", "ATTEMPTS", "DURATION", "ERROR"], [
        [t.task_id, t.state, str(t.attempts), fmt_duration(t.started_at, t.finished_at),
         short(t.error)] for t in tasks
    ])


def run_summary(run: RunRecord) -> dict[str, Any]:
    """A run as JSON-able fields (times ISO 8601)."""
    return {
        "id": run.run_id, "flow": run.flow, "status": run.status, "trigger": run.trigger,
        "event_id": run.event_id, "schedule_key": run.schedule_key, "tick": iso(run.tick),
        "created_at": iso(run.created_at), "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at), "duration": _seconds(run.started_at,
                                                                  run.finished_at),
        "interrupted": run.interrupted, "error": redact(run.error) if run.error else None,
    }  # fmt: skip


def task_summary(task: TaskRunRecord) -> dict[str, Any]:
    """A task record as JSON-able fields."""
    return {
        "task": task.task_id, "state": task.state, "attempts": task.attempts,
        "started_at": iso(task.started_at), "finished_at": iso(task.finished_at),
        "duration": _seconds(task.started_at, task.finished_at),
        "error": redact(task.error) if task.error else None, "output": redact(task.output),
    }  # fmt: skip


def _run_row(run: RunRecord) -> list[str]:
    return [run.run_id, run.flow, run.status, run.trigger, fmt_time(run.created_at),
            fmt_duration(run.started_at, run.finished_at), short(run.error)]


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 6)


def fmt_duration(start: float | None, end: float | None) -> str:
    """``0.12s``, ``3m05s``; empty when not both known."""
    seconds = _seconds(start, end)
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
