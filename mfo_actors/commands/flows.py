"""``mfo-actors flows list|graph|run --config FILE``: look at an instance's flows, run one now.

``flows run NAME`` runs in the foreground, in this process, with the instance's store: the
run is recorded like any other (``runs list`` shows it, trigger ``manual``) but is created
already ``active``, so a daemon running on the same store never claims it too. A live line
per task goes to stderr (``[3/7] done: fetch (0.12s)``), the result to stdout; the exit
code is 1 when the run fails. The MFO client is built from the config (it connects only
when an ``mfo.*`` task calls it), so a flow without MFO tasks runs with the upstream down.
If the command is interrupted (Ctrl-C) the run is settled ``error`` "interrupted"; if the
process is killed, it stays ``active`` and the daemon's next start treats it as a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, TextIO

import anyio

from mfo_actors.actors._runs import StoreRecorder, stored_error
from mfo_actors.actors.scheduler import load_instance_flows
from mfo_actors.actors.sessions import StoreSessions
from mfo_actors.commands._common import common_parser, print_json, table, with_store
from mfo_actors.commands.runs import NO_RUN_STORE, fmt_duration, task_table
from mfo_actors.config import InstanceConfig, load_config
from mfo_actors.errors import UserError
from mfo_actors.ids import new_id
from mfo_actors.observability import redact
from mfo_actors.store import EventStore, RunRequest, TaskRunRecord, cli_node_id
from mfo_actors.taskflow import Flow, FlowExecutor, RunOutcome, to_mermaid

__all__ = ["configure"]

FINAL_STATES = frozenset({"done", "error", "skipped", "cancelled"})
SETTLE_TIMEOUT = 5.0  # seconds to record an interrupted run before giving up


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``flows list``, ``flows graph`` and ``flows run`` to the CLI."""
    parser.description = (
        "The taskflows of an instance (flows.dir): list them, draw one as a "
        "Mermaid graph, or run one now in the foreground."
    )
    actions = parser.add_subparsers(dest="flows_action", metavar="ACTION", required=True)
    common = common_parser(json_output=False)

    p = actions.add_parser("list", parents=[common], help="list flows and their triggers")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("graph", parents=[common], help="a flow as a Mermaid graph TD")
    p.add_argument("name", metavar="NAME", help="flow name")
    p.set_defaults(func=cmd_graph)

    p = actions.add_parser("run", parents=[common], help="run a flow now, in the foreground")
    p.add_argument("name", metavar="NAME", help="flow name")
    p.add_argument("--input", metavar="JSON", help="the run's input, a JSON object (${input.x})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show info logs (e.g. of `log` tasks) on stderr")
    p.set_defaults(func=cmd_run)


# -- commands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``flows list``: name, triggers, task count and file of every flow."""
    _, flows = _load(args.config, need_secrets=False)
    if args.json:
        print_json([{"name": f.name, "description": f.description, "triggers": _triggers(f),
                     "tasks": len(f.nodes), "file": f.file} for f in flows.values()])
    elif not flows:
        print("no flows")
    else:
        print(table(["NAME", "TRIGGERS", "TASKS", "FILE"], [
            [f.name, ", ".join(_triggers(f)) or "manual", str(len(f.nodes)), f.file]
            for f in sorted(flows.values(), key=lambda f: f.name)
        ]))
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    """``flows graph NAME``: the flow as Mermaid ``graph TD`` (paste into Markdown)."""
    _, flows = _load(args.config, need_secrets=False)
    sys.stdout.write(to_mermaid(_pick(flows, args.name)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``flows run NAME``: run now, record it, show progress; 1 if the run fails."""
    run_input = _parse_input(args.input)
    cfg, flows = _load(args.config)
    flow = _pick(flows, args.name)
    client = _client(cfg, args.config, flow, flows)
    progress = Progress(flow, sys.stderr)

    async def body(store: EventStore) -> tuple[str, RunOutcome]:
        run_id = new_id()
        await store.create_runs([RunRequest(run_id=run_id, flow=flow.name, trigger="manual",
                                             input=run_input)], claim=True)
        print(f"run {run_id} of {flow.name} started", file=sys.stderr)
        try:
            executor = FlowExecutor(flows, client=client, sessions=StoreSessions(
                store, cfg.sessions, instance=cfg.instance))
            recorder = StoreRecorder(store, run_id, flow.name, instance=cfg.instance)
            outcome = await executor.run(flow, run_id=run_id, input=run_input,
                                         recorder=recorder, progress=progress)
            await store.finish_run(run_id, status=outcome.status,
                                   error=stored_error(outcome.error), outputs=outcome.outputs)
        except BaseException:
            with anyio.move_on_after(SETTLE_TIMEOUT, shield=True):
                await store.finish_run(run_id, status="error",
                                       error="interrupted: flows run did not finish")
            raise
        finally:
            if client is not None:
                with anyio.move_on_after(SETTLE_TIMEOUT, shield=True):
                    await client.aclose()
        return run_id, outcome

    level = logging.INFO if args.verbose else logging.ERROR
    # A node of its own: a daemon starting meanwhile must not take this run back as its own.
    run_id, outcome = with_store(cfg, args.config, body, must_exist=False, log_level=level,
                                 missing=NO_RUN_STORE, node=cli_node_id(cfg))
    _report(run_id, outcome, as_json=args.json)
    return 0 if outcome.status == "done" else 1


# -- helpers -------------------------------------------------------------------------------


class Progress:
    """``progress(task_id, state)`` for the engine: one line per finished task on *out*.

    On a terminal the running task is shown too, on a line that the next update replaces.
    """

    def __init__(self, flow: Flow, out: TextIO) -> None:
        self._total = len(flow.nodes)
        self._out = out
        self._tty = out.isatty()
        self._started: dict[str, float] = {}
        self._finished = 0

    def __call__(self, task_id: str, state: str) -> None:
        if state == "running":
            self._started.setdefault(task_id, time.monotonic())
            if self._tty:
                self._write(f"[{self._finished}/{self._total}] running: {task_id}", end="")
            return
        if state not in FINAL_STATES:
            return
        self._finished += 1
        started = self._started.pop(task_id, None)
        took = "" if started is None else f" ({time.monotonic() - started:.2f}s)"
        self._write(f"[{self._finished}/{self._total}] {state}: {task_id}{took}")

    def _write(self, text: str, *, end: str = "\n") -> None:
        prefix = "\r\033[K" if self._tty else ""
        self._out.write(prefix + text + end)
        self._out.flush()


def _parse_input(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--input is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"--input must be a JSON object like '{{\"key\": 1}}', "
                        f"got {type(value).__name__}")
    return value


def _load(config_file: str, *, need_secrets: bool = True
          ) -> tuple[InstanceConfig, dict[str, Flow]]:
    """The config and its flows; *need_secrets* False when no MFO call is made (list, graph:
    a secret the operator's shell cannot resolve does not matter)."""
    cfg = load_config(config_file, need_secrets=need_secrets)
    if not cfg.flows.enabled:
        raise UserError(f"{config_file}: flows.enabled is false")
    return cfg, load_instance_flows(cfg)


def _pick(flows: dict[str, Flow], name: str) -> Flow:
    flow = flows.get(name)
    if flow is None:
        known = ", ".join(sorted(flows)) or "none"
        raise UserError(f"unknown flow {name!r} (known flows: {known})")
    return flow


def _uses_mfo(flow: Flow, flows: dict[str, Flow], seen: set[str] | None = None) -> bool:
    """Does *flow*, or a subflow it names, have an ``mfo.*`` task?"""
    seen = seen if seen is not None else set()
    if flow.name in seen:
        return False
    seen.add(flow.name)
    if any(node.type.startswith("mfo.") for node in flow.nodes):
        return True
    return any(_uses_mfo(flows[name], flows, seen) for name in flow.subflows if name in flows)


def _client(cfg: InstanceConfig, config_file: str, flow: Flow, flows: dict[str, Flow]) -> Any:
    """The MFO client; None when it cannot be built and the flow does not need it."""
    from mfo_actors.client import MFOClient  # httpx is only needed when a client is made

    try:
        return MFOClient.from_config(cfg)
    except (ValueError, UserError) as exc:
        if _uses_mfo(flow, flows):
            raise UserError(f"{config_file}: cannot build the MFO client: {exc}") from None
        return None


def _triggers(flow: Flow) -> list[str]:
    out = []
    for trig in flow.spec.triggers:
        if trig.event is not None:
            text = f"event {trig.event.source}/{trig.event.type}"
            if trig.event.when:
                text += " (when)"
        elif trig.cron is not None:
            text = f"cron {trig.cron}"
        else:
            text = f"every {trig.interval:g}s"
        out.append(text)
    return out


def _report(run_id: str, outcome: RunOutcome, *, as_json: bool) -> None:
    if as_json:
        print_json({
            "id": run_id, "flow": outcome.flow, "status": outcome.status,
            "error": redact(outcome.error) if outcome.error else None,
            "duration": round(outcome.finished_at - outcome.started_at, 6),
            "outputs": redact(outcome.outputs),
            "tasks": {tid: {"state": t.state, "attempts": t.attempts,
                            "error": redact(t.error) if t.error else None}
                      for tid, t in outcome.tasks.items()},
        })  # fmt: skip
        return
    took = fmt_duration(outcome.started_at, outcome.finished_at)
    if outcome.status == "done":
        print(f"run {run_id} of {outcome.flow}: done in {took}")
    else:
        print(f"run {run_id} of {outcome.flow}: error after {took}: {redact(outcome.error)}")
    print(task_table([
        TaskRunRecord(run_id=run_id, task_id=tid, state=t.state, attempts=t.attempts,
                      started_at=t.started_at, finished_at=t.finished_at, error=t.error)
        for tid, t in outcome.tasks.items()
    ]))
    if outcome.outputs:
        print("outputs: " + json.dumps(redact(outcome.outputs), ensure_ascii=False,
                                       default=str))
