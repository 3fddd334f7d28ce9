"""Running flows on asyncio and trio: states, retries, timeouts, fail_fast vs continue,
conditions, trigger rules, subflows, limits, recording and cancellation."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from mfo_actors.messages import Event
from mfo_actors.taskflow import (
    EmptyConfig,
    Flow,
    FlowExecutor,
    TaskContext,
    TaskRegistry,
    builtin_registry,
    event_scope,
    load_flow_text,
)

pytestmark = pytest.mark.anyio


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Config of the test task type ``probe``."""

    fail_times: int = 0  # fail this many attempts, then succeed (-1: always fail)
    block: bool = False  # wait until cancelled
    value: Any = None
    gate: str | None = None  # wait for Harness.gates[gate] before finishing


class Harness:
    """A registry with test task types and bookkeeping the tests can wait on."""

    def __init__(self) -> None:
        self.registry = builtin_registry()
        self.calls: dict[str, int] = {}
        self.started: dict[str, anyio.Event] = {}
        self.gates: dict[str, anyio.Event] = {}
        self.running = 0
        self.max_running = 0
        self.running_waiters: list[tuple[int, anyio.Event]] = []
        self.registry.register("probe", self._probe, config=Probe)

        @self.registry.task("echo_ctx", config=EmptyConfig)
        async def echo_ctx(ctx: TaskContext, cfg: EmptyConfig) -> dict[str, Any]:
            return {"run_id": ctx.run_id, "flow": ctx.flow, "task": ctx.task_id,
                    "event": ctx.event, "input": ctx.input, "attempt": ctx.attempt,
                    "seen": sorted(k for k in ctx.outputs if k not in
                                   ("event", "input", "flow", "run"))}

        @self.registry.task("not_a_dict", config=EmptyConfig)
        async def not_a_dict(ctx: TaskContext, cfg: EmptyConfig) -> Any:
            return [1, 2]

    async def wait_running(self, k: int) -> None:
        """Return once *k* probe tasks run at the same time."""
        if self.running >= k:
            return
        ev = anyio.Event()
        self.running_waiters.append((k, ev))
        with anyio.fail_after(5):
            await ev.wait()

    def started_event(self, task_id: str) -> anyio.Event:
        return self.started.setdefault(task_id, anyio.Event())

    def _probe(self, cfg: Probe) -> Any:
        async def run(ctx: TaskContext) -> dict[str, Any]:
            n = self.calls[ctx.task_id] = self.calls.get(ctx.task_id, 0) + 1
            self.started_event(ctx.task_id).set()
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            for k, ev in self.running_waiters:
                if self.running >= k:
                    ev.set()
            try:
                if cfg.gate is not None:
                    await self.gates.setdefault(cfg.gate, anyio.Event()).wait()
                if cfg.block:
                    await anyio.sleep_forever()
                if cfg.fail_times < 0 or n <= cfg.fail_times:
                    raise RuntimeError(f"boom {n}")
                return {"value": cfg.value, "attempt": n}
            finally:
                self.running -= 1

        return run

    def flow(self, text: str) -> Flow:
        return load_flow_text(textwrap.dedent(text), self.registry, file="test.yaml")


class Recorder:
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.finished: dict[str, dict[str, Any]] = {}

    async def task_started(self, task_id: str, attempt: int) -> None:
        self.started.append((task_id, attempt))

    async def task_finished(self, task_id: str, state: str, attempts: int,
                            output: dict[str, Any] | None, error: str | None,
                            started_at: float | None, finished_at: float | None) -> None:
        assert task_id not in self.finished, f"{task_id} finished twice"
        self.finished[task_id] = {"state": state, "attempts": attempts, "output": output,
                                  "error": error, "started_at": started_at,
                                  "finished_at": finished_at}

    def states(self) -> dict[str, str]:
        return {k: v["state"] for k, v in self.finished.items()}


async def test_outputs_flow_between_tasks_with_types() -> None:
    h = Harness()
    flow = h.flow("""
        name: typed
        outputs:
          count: "${b.count}"
          summary: "${b.text}"
          whole: "${a}"
        tasks:
          - id: a
            type: set
            config: {values: {n: "${input.n}", tags: "${input.tags}", name: "${input.name}"}}
          - id: b
            type: set
            dependencies: [a]
            config:
              values:
                count: "${a.n}"
                text: "${a.name} has ${a.n} tags: ${a.tags}"
          - id: c
            type: echo_ctx
            dependencies: [b]
    """)
    rec = Recorder()
    seen: list[tuple[str, str]] = []
    outcome = await FlowExecutor({"typed": flow}).run(
        "typed", run_id="R1", input={"n": 2, "tags": ["x", "y"], "name": "Ada"},
        event={"source": "crm", "type": "t", "payload": {}}, recorder=rec,
        progress=lambda t, s: seen.append((t, s)))
    assert outcome.status == "done", outcome.error
    assert outcome.outputs == {"count": 2, "summary": 'Ada has 2 tags: ["x","y"]',
                               "whole": {"n": 2, "tags": ["x", "y"], "name": "Ada"}}
    c = outcome.tasks["c"].output
    assert c is not None
    assert c["run_id"] == "R1" and c["flow"] == "typed" and c["task"] == "c"
    assert c["event"]["source"] == "crm" and c["input"]["n"] == 2 and c["seen"] == ["a", "b"]
    assert rec.states() == {"a": "done", "b": "done", "c": "done"}
    assert rec.started == [("a", 1), ("b", 1), ("c", 1)]
    assert rec.finished["b"]["output"] == {"count": 2, "text": 'Ada has 2 tags: ["x","y"]'}
    assert seen == [("a", "running"), ("a", "done"), ("b", "running"), ("b", "done"),
                    ("c", "running"), ("c", "done")]


async def test_missing_template_value_fails_the_task_naming_it() -> None:
    h = Harness()
    flow = h.flow("""
        name: missing
        tasks:
          - {id: a, type: set, config: {values: {x: "${input.nope}"}}, retry: {max_attempts: 3}}
    """)
    outcome = await FlowExecutor().run(flow, input={})
    assert outcome.status == "error"
    err = outcome.tasks["a"].error or ""
    assert "${input.nope}" in err and "input has no 'nope'" in err
    assert outcome.tasks["a"].attempts == 1  # another attempt cannot fix a missing value
    assert outcome.error is not None and outcome.error.startswith("task a failed")


async def test_when_false_skips_and_dependents_follow_trigger_rules() -> None:
    h = Harness()
    flow = h.flow("""
        name: rules
        tasks:
          - {id: a, type: probe, config: {value: 1}}
          - {id: b, type: probe, dependencies: [a], when: "${a.value} == 2"}
          - {id: c, type: probe, dependencies: [b]}
          - {id: d, type: probe, dependencies: [b], trigger_rule: always}
          - {id: e, type: probe, dependencies: [a, b], trigger_rule: one_done}
          - {id: f, type: probe, dependencies: [c], trigger_rule: one_done}
          - {id: g, type: probe, dependencies: [a], when: "${a.value} == 1"}
    """)
    rec = Recorder()
    outcome = await FlowExecutor().run(flow, recorder=rec)
    assert outcome.status == "done"
    assert outcome.states() == {"a": "done", "b": "skipped", "c": "skipped", "d": "done",
                                "e": "done", "f": "skipped", "g": "done"}
    assert rec.states() == outcome.states()
    assert rec.finished["b"]["attempts"] == 0 and rec.finished["b"]["started_at"] is None


async def test_when_evaluation_error_fails_the_task() -> None:
    h = Harness()
    flow = h.flow("""
        name: badwhen
        on_failure: continue
        tasks:
          - {id: a, type: probe, config: {value: text}}
          - {id: b, type: probe, dependencies: [a], when: "${a.value} > 1"}
    """)
    outcome = await FlowExecutor().run(flow)
    assert outcome.tasks["b"].state == "error"
    assert "cannot compare str > int" in (outcome.tasks["b"].error or "")


async def test_condition_selects_branches() -> None:
    h = Harness()
    text = """
        name: cond
        tasks:
          - {id: a, type: probe, config: {value: VALUE}}
          - id: pick
            type: condition
            dependencies: [a]
            config:
              branches:
                "${a.value} == 'x'": [x1, x2]
                "${a.value} in ['x', 'y']": y
              default: [other]
          - {id: x1, type: probe, dependencies: [pick]}
          - {id: x2, type: probe, dependencies: [pick]}
          - {id: y, type: probe, dependencies: [pick]}
          - {id: other, type: probe, dependencies: [pick]}
          - {id: always_runs, type: probe, dependencies: [pick]}
          - {id: after_y, type: probe, dependencies: [y]}
    """
    results = {}
    for value in ("x", "y", "z"):
        outcome = await FlowExecutor().run(h.flow(text.replace("VALUE", value)))
        assert outcome.status == "done"
        results[value] = {t for t, s in outcome.states().items() if s == "done"}
        if value == "x":
            assert outcome.tasks["pick"].output == {"branch": "${a.value} == 'x'",
                                                    "selected": ["x1", "x2"]}
    base = {"a", "pick", "always_runs"}
    assert results["x"] == base | {"x1", "x2"}
    assert results["y"] == base | {"y", "after_y"}
    assert results["z"] == base | {"other"}


async def test_fail_fast_cancels_running_and_skips_the_rest() -> None:
    h = Harness()
    flow = h.flow("""
        name: ff
        concurrency: 4
        tasks:
          - {id: slow, type: probe, config: {block: true}}
          - {id: bad, type: probe, config: {fail_times: -1, gate: go}}
          - {id: after_slow, type: probe, dependencies: [slow]}
          - {id: after_bad, type: probe, dependencies: [bad], trigger_rule: always}
    """)
    rec = Recorder()

    async def release_when_slow_runs() -> None:
        await h.started_event("slow").wait()
        h.gates.setdefault("go", anyio.Event()).set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_when_slow_runs)
        outcome = await FlowExecutor().run(flow, recorder=rec)
    assert outcome.status == "error"
    assert outcome.states() == {"slow": "cancelled", "bad": "error", "after_slow": "skipped",
                                "after_bad": "skipped"}
    assert rec.states() == outcome.states()
    assert outcome.error == "task bad failed: RuntimeError: boom 1"


async def test_continue_lets_independent_branches_finish() -> None:
    h = Harness()
    flow = h.flow("""
        name: cont
        on_failure: continue
        tasks:
          - {id: bad, type: probe, config: {fail_times: -1}}
          - {id: child, type: probe, dependencies: [bad]}
          - {id: grandchild, type: probe, dependencies: [child]}
          - {id: cleanup, type: probe, dependencies: [bad], trigger_rule: always}
          - {id: other, type: probe, config: {gate: late}}
          - {id: other2, type: probe, dependencies: [other]}
          - {id: opener, type: probe}
    """)

    async def open_gate() -> None:
        await h.started_event("opener").wait()
        h.gates.setdefault("late", anyio.Event()).set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate)
        outcome = await FlowExecutor().run(flow)
    assert outcome.status == "error"
    assert outcome.states() == {"bad": "error", "child": "skipped", "grandchild": "skipped",
                                "cleanup": "done", "other": "done", "other2": "done",
                                "opener": "done"}


async def test_retries_with_backoff_then_success() -> None:
    h = Harness()
    flow = h.flow("""
        name: retry
        tasks:
          - id: flaky
            type: probe
            config: {fail_times: 2, value: ok}
            retry: {max_attempts: 3, initial_backoff: 1ms, max_backoff: 5ms}
    """)
    rec = Recorder()
    outcome = await FlowExecutor().run(flow, recorder=rec)
    assert outcome.status == "done"
    assert outcome.tasks["flaky"].attempts == 3
    assert outcome.tasks["flaky"].output == {"value": "ok", "attempt": 3}
    assert rec.started == [("flaky", 1), ("flaky", 2), ("flaky", 3)]
    assert rec.finished["flaky"]["attempts"] == 3


async def test_retries_exhausted() -> None:
    h = Harness()
    flow = h.flow("""
        name: retry
        tasks:
          - id: flaky
            type: probe
            config: {fail_times: 5}
            retry: {max_attempts: 2, initial_backoff: 1ms, jitter: false}
    """)
    outcome = await FlowExecutor().run(flow)
    assert outcome.status == "error"
    assert outcome.tasks["flaky"].attempts == 2
    assert outcome.tasks["flaky"].error == "RuntimeError: boom 2"
    assert h.calls["flaky"] == 2


async def test_task_timeout_counts_as_a_failed_attempt() -> None:
    h = Harness()
    flow = h.flow("""
        name: slow
        tasks:
          - id: stuck
            type: probe
            config: {block: true}
            timeout: 20ms
            retry: {max_attempts: 2, initial_backoff: 1ms}
    """)
    with anyio.fail_after(5):
        outcome = await FlowExecutor().run(flow)
    assert outcome.status == "error"
    assert outcome.tasks["stuck"].error == "TimeoutError: timed out after 0.02s"
    assert outcome.tasks["stuck"].attempts == 2


async def test_run_timeout_cancels_running_tasks() -> None:
    h = Harness()
    flow = h.flow("""
        name: slowrun
        timeout: 50ms
        tasks:
          - {id: stuck, type: probe, config: {block: true}}
          - {id: next, type: probe, dependencies: [stuck]}
    """)
    rec = Recorder()
    with anyio.fail_after(5):
        outcome = await FlowExecutor().run(flow, recorder=rec)
    assert outcome.status == "error"
    assert outcome.error == "run timed out after 0.05s"
    assert outcome.states() == {"stuck": "cancelled", "next": "skipped"}
    assert rec.states() == outcome.states()


async def test_cancelling_the_caller_records_cancelled_and_reraises() -> None:
    h = Harness()
    flow = h.flow("""
        name: cancelme
        tasks:
          - {id: stuck, type: probe, config: {block: true}}
          - {id: quick, type: probe}
          - {id: next, type: probe, dependencies: [stuck]}
    """)
    rec = Recorder()
    reached_after = False
    with anyio.CancelScope() as scope:

        async def cancel_when_started() -> None:
            await h.started_event("stuck").wait()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_started)
            await FlowExecutor().run(flow, recorder=rec)
            reached_after = True
    assert scope.cancelled_caught
    assert not reached_after
    assert rec.states() == {"quick": "done", "stuck": "cancelled", "next": "cancelled"}
    assert rec.finished["stuck"]["finished_at"] is not None


async def test_per_run_concurrency_is_respected() -> None:
    h = Harness()
    tasks = "\n".join(f"  - {{id: t{i}, type: probe, config: {{gate: g}}}}" for i in range(10))
    flow = h.flow(f"name: wide\nconcurrency: 3\ntasks:\n{tasks}\n")

    async def open_gate() -> None:
        await h.wait_running(3)
        h.gates["g"].set()

    h.gates["g"] = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate)
        outcome = await FlowExecutor().run(flow)
    assert outcome.status == "done"
    assert h.max_running == 3


async def test_instance_limiter_caps_runs_at_once() -> None:
    h = Harness()
    flow = h.flow("""
        name: one
        tasks:
          - {id: t, type: probe, config: {gate: g}}
    """)
    h.gates["g"] = anyio.Event()
    executor = FlowExecutor({"one": flow}, limiter=anyio.CapacityLimiter(2))
    outcomes = []

    async def run_one() -> None:
        outcomes.append(await executor.run("one"))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(run_one)
        await h.wait_running(2)
        for _ in range(5):  # give a third run every chance to start if it could
            await anyio.lowlevel.checkpoint()
        assert h.running == 2
        h.gates["g"].set()
    assert len(outcomes) == 5 and all(o.status == "done" for o in outcomes)
    assert h.max_running == 2


async def test_subflow_returns_outputs_and_propagates_failure() -> None:
    h = Harness()
    child = h.flow("""
        name: child
        outputs: {doubled: "${calc.value}", label: "n=${input.n}"}
        tasks:
          - {id: calc, type: set, config: {values: {value: "${input.n}"}}}
    """)
    bad_child = h.flow("""
        name: bad_child
        tasks:
          - {id: calc, type: probe, config: {fail_times: -1}}
    """)
    parent = h.flow("""
        name: parent
        on_failure: continue
        outputs: {result: "${call.doubled}"}
        tasks:
          - {id: call, type: subflow, config: {flow: child, input: {n: 21}}}
          - {id: use, type: set, dependencies: [call], config: {values: {got: "${call.label}"}}}
          - {id: broken, type: subflow, config: {flow: bad_child}}
    """)
    executor = FlowExecutor({f.name: f for f in (child, bad_child, parent)})
    outcome = await executor.run("parent")
    assert outcome.tasks["call"].output == {"doubled": 21, "label": "n=21"}
    assert outcome.tasks["use"].output == {"got": "n=21"}
    assert outcome.tasks["broken"].state == "error"
    assert "subflow bad_child failed: task calc failed" in (outcome.tasks["broken"].error or "")
    assert outcome.status == "error"


async def test_unknown_flow_name() -> None:
    from mfo_actors.taskflow import UnknownFlowError

    with pytest.raises(UnknownFlowError, match="unknown flow 'nope'"):
        await FlowExecutor().run("nope")


async def test_non_dict_output_is_an_error() -> None:
    h = Harness()
    outcome = await FlowExecutor().run(h.flow("name: x\ntasks: [{id: a, type: not_a_dict}]\n"))
    assert outcome.status == "error"
    assert "expected a dict of outputs" in (outcome.tasks["a"].error or "")


async def test_outputs_that_cannot_render_fail_the_run() -> None:
    h = Harness()
    flow = h.flow("""
        name: outs
        outputs: {x: "${a.missing}"}
        tasks: [{id: a, type: probe}]
    """)
    outcome = await FlowExecutor().run(flow)
    assert outcome.status == "error" and "outputs: ${a.missing}" in (outcome.error or "")


async def test_event_scope_of_a_stored_event() -> None:
    event = Event(id="E1", source="crm", type="user.signup", received_at=1.0,
                  headers={"x": "y"}, body=b'{"email": "a@b.c"}')
    scope = event_scope(event)
    assert scope == {"id": "E1", "source": "crm", "type": "user.signup", "received_at": 1.0,
                     "headers": {"x": "y"}, "payload": {"email": "a@b.c"}}
    h = Harness()
    flow = h.flow("""
        name: ev
        triggers: [{event: {source: crm, type: "user.*"}}]
        tasks:
          - {id: a, type: set, config: {values: {email: "${event.payload.email}"}}}
    """)
    assert scope is not None and flow.matches_event(scope)
    outcome = await FlowExecutor().run(flow, event=event)
    assert outcome.tasks["a"].output == {"email": "a@b.c"}


async def test_large_dag_runs_every_task_once() -> None:
    h = Harness()
    reg = TaskRegistry()
    count = {"n": 0}

    @reg.task("tick", config=EmptyConfig)
    async def tick(ctx: TaskContext, cfg: EmptyConfig) -> None:
        count["n"] += 1
        if count["n"] % 7 == 0:
            await anyio.lowlevel.checkpoint()

    n = 2000
    tasks = [{"id": f"t{i}", "type": "tick",
              "dependencies": [f"t{j}" for j in {i - 1, i // 2, int(math.sqrt(i))} if 0 <= j < i]}
             for i in range(n)]
    from mfo_actors.taskflow import load_flow_data

    flow = load_flow_data({"name": "big", "concurrency": 8, "tasks": tasks}, reg)
    outcome = await FlowExecutor().run(flow)
    assert outcome.status == "done" and count["n"] == n
    assert set(outcome.states().values()) == {"done"}
    del h


async def test_schedule_triggers_compute_stable_ticks() -> None:
    h = Harness()
    flow = h.flow("""
        name: sched
        triggers:
          - interval: 30s
          - {cron: "0 9 * * mon-fri", timezone: Europe/Paris}
        tasks: [{id: a, type: probe}]
    """)
    interval, cron = flow.schedules
    assert interval.key == "interval:30" and interval.next_after(61.0) == 90.0
    assert interval.next_after(90.0) == 120.0
    # Mon 2026-01-05 07:00 UTC = 08:00 Paris -> next tick 09:00 Paris = 08:00 UTC
    t = 1767596400.0
    assert cron.next_after(t) == t + 3600
    assert cron.key == "cron:0 9 * * mon-fri@Europe/Paris"
