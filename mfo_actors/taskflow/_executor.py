"""Runs a compiled flow: a small worker pool fed by a ready queue, as go-taskflow does.

Each run keeps per-task state in flat lists indexed by node and an in-degree counter per
node. ``concurrency`` workers (never more than the flow has tasks) pop ready nodes from a
deque, run them and release their successors; a worker only yields to the event loop when
a task awaits, when the queue is empty, or every :data:`CHECKPOINT_EVERY` tasks. So a no-op
task costs a few microseconds instead of the price of one anyio task per node.

Semantics:

- ``trigger_rule`` is decided once all of a task's dependencies have finished:
  ``all_done`` (default) runs when every dependency is done (not skipped, not failed);
  ``one_done`` when at least one is done; ``always`` whatever they ended as.
- ``when:`` is evaluated just before the task runs; false skips it (state ``skipped``).
- A ``condition`` task evaluates its ``branches`` in order and selects the first true one
  (else ``default``); successors it names but did not select see it as skipped, successors
  it does not name at all run as usual.
- ``on_failure: fail_fast`` cancels running tasks (``cancelled``) and skips the rest;
  ``continue`` lets independent branches go on, dependents of a failed task are skipped.
- Retries use exponential backoff with full jitter; a per-task ``timeout`` covers one
  attempt; the flow's ``timeout`` covers the whole run (running tasks end ``cancelled``).
- Cancelling the caller cancels the run: unfinished tasks are recorded ``cancelled`` (the
  recorder calls are shielded, with a time limit) and the cancellation is re-raised.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import anyio
import anyio.lowlevel
import msgspec

from mfo_actors._yaml import dec_hook
from mfo_actors.ids import new_id
from mfo_actors.observability import get_logger
from mfo_actors.taskflow._context import TaskContext, event_scope
from mfo_actors.taskflow._errors import (
    ExpressionError,
    SubflowError,
    TaskFailure,
    TaskOutputError,
    TemplateError,
    UnknownFlowError,
)
from mfo_actors.taskflow._flow import Flow, Node
from mfo_actors.taskflow._registry import TaskFunc
from mfo_actors.taskflow._sessions import ChatSessions
from mfo_actors.taskflow._template import render_tree

__all__ = ["FlowExecutor", "ProgressCallback", "RunOutcome", "RunRecorder", "TaskOutcome"]

CHECKPOINT_EVERY = 64  # tasks a worker runs back to back before letting others in
RECORD_TIMEOUT = 5.0  # seconds a shielded recorder call may take while a run is cancelled
MAX_SUBFLOW_DEPTH = 8  # loops are refused at load; this guards templated subflow names

TaskStateName = Literal["pending", "running", "done", "error", "skipped", "cancelled"]
ProgressCallback = Callable[[str, str], None]  # (task_id, state), called on every change


class RunRecorder(Protocol):
    """Where the scheduler persists task runs (``TaskRunRecord``); the engine knows no store.

    ``task_started`` is awaited before every attempt; ``task_finished`` exactly once per task
    with its final state (``done error skipped cancelled``; a skipped task has
    ``attempts == 0`` and no ``started_at``). Times are epoch seconds. Calls for one task are
    in order; calls for different tasks interleave. Keep them fast (batch writes if needed):
    they are awaited on the task's worker.
    """

    async def task_started(self, task_id: str, attempt: int) -> None: ...

    async def task_finished(
        self,
        task_id: str,
        state: str,
        attempts: int,
        output: dict[str, Any] | None,
        error: str | None,
        started_at: float | None,
        finished_at: float | None,
    ) -> None: ...


class TaskOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one task of a run ended."""

    state: TaskStateName
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    output: dict[str, Any] | None = None


class RunOutcome:
    """The result of :meth:`FlowExecutor.run`.

    Attributes:
      run_id, flow: Which run.
      status: ``"done"`` or ``"error"``.
      error: Why the run failed (the first failed task, a timeout), else None.
      outputs: The flow's ``outputs:`` map rendered from task outputs ({} on error).
      tasks: ``{task_id: TaskOutcome}`` in flow order (built on first access).
      started_at, finished_at: Epoch seconds.
    """

    __slots__ = ("_run", "_tasks", "error", "finished_at", "flow", "outputs", "run_id",
                 "started_at", "status")

    def __init__(self, run: _Run, status: Literal["done", "error"], error: str | None,
                 outputs: dict[str, Any]) -> None:
        self._run = run
        self._tasks: dict[str, TaskOutcome] | None = None
        self.run_id = run.run_id
        self.flow = run.flow.name
        self.status = status
        self.error = error
        self.outputs = outputs
        self.started_at = run.started_at
        self.finished_at = run.finished_at

    def __repr__(self) -> str:
        return f"RunOutcome({self.flow!r}, {self.run_id!r}, status={self.status!r})"

    @property
    def tasks(self) -> dict[str, TaskOutcome]:
        if self._tasks is None:
            r = self._run
            self._tasks = {
                node.id: TaskOutcome(
                    state=r.state[i],  # type: ignore[arg-type]
                    attempts=r.attempts[i], started_at=r.started[i], finished_at=r.finished[i],
                    error=r.errors[i], output=r.scope.get(node.id) if r.state[i] == "done"
                    else None,
                ) for i, node in enumerate(r.flow.nodes)
            }
        return self._tasks

    def states(self) -> dict[str, str]:
        """``{task_id: state}``, cheaper than :attr:`tasks`."""
        return {node.id: self._run.state[i] for i, node in enumerate(self._run.flow.nodes)}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _NoRetry(Exception):
    """Wraps a failure that another attempt cannot fix (a missing template value)."""


class FlowExecutor:
    """Runs flows. One per daemon (or per CLI command); safe to run many flows at once.

    Args:
      flows: The loaded flows by name (for :meth:`run` by name and for ``subflow``).
      client: The MFO client handed to tasks as ``ctx.client`` (None: ``mfo.*`` tasks fail).
      sessions: Chat sessions for ``mfo.chat`` with ``session:`` (``ctx.sessions``; None:
        those tasks fail).
      limiter: Instance-wide cap on runs at once (``flows.concurrency``); subflows run inside
        their parent's slot and do not take another.
      logger: A structlog logger (default ``get_logger("mfo_actors.taskflow")``).
    """

    def __init__(
        self,
        flows: Mapping[str, Flow] | None = None,
        *,
        client: Any = None,
        sessions: ChatSessions | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        logger: Any = None,
    ) -> None:
        self.flows: dict[str, Flow] = dict(flows or {})
        self.client = client
        self.sessions = sessions
        self.limiter = limiter
        self.log = logger if logger is not None else get_logger("mfo_actors.taskflow")

    def flow(self, name: str) -> Flow:
        try:
            return self.flows[name]
        except KeyError:
            raise UnknownFlowError(name, list(self.flows)) from None

    async def run(
        self,
        flow: Flow | str,
        *,
        run_id: str | None = None,
        event: Any = None,
        input: Mapping[str, Any] | None = None,
        recorder: RunRecorder | None = None,
        progress: ProgressCallback | None = None,
    ) -> RunOutcome:
        """Run *flow* (a Flow or a loaded flow's name) to the end and return its outcome.

        A failing run is an outcome with ``status == "error"``, not an exception. Waits for a
        slot of ``limiter`` first. Cancellation of the caller is re-raised after recording.

        Args:
          run_id: The id to use (the scheduler's RunRecord id); default a new id.
          event: The triggering event (``messages.Event``, a dict or None).
          input: The run's input, readable as ``${input.…}``.
          recorder: Persists task states (see :class:`RunRecorder`).
          progress: ``progress(task_id, state)`` on each state change (sync, keep it cheap).
        """
        target = self.flow(flow) if isinstance(flow, str) else flow
        run = _Run(self, target, run_id or new_id(), event_scope(event), dict(input or {}),
                   recorder, progress, depth=0)
        if self.limiter is None:
            return await run.execute()
        async with self.limiter:
            return await run.execute()


class _Run:
    """The state of one run; workers are its methods so the hot loop reads attributes."""

    def __init__(self, executor: FlowExecutor, flow: Flow, run_id: str,
                 event: dict[str, Any] | None, input: dict[str, Any],
                 recorder: RunRecorder | None, progress: ProgressCallback | None,
                 depth: int) -> None:
        n = len(flow.nodes)
        self.executor = executor
        self.flow = flow
        self.nodes = flow.nodes
        self.run_id = run_id
        self.event = event
        self.input = input
        self.recorder = recorder
        self.progress = progress
        self.depth = depth
        self.n = n
        self.state: list[str] = ["pending"] * n
        self.remaining = [len(node.deps) for node in flow.nodes]
        self.ok = [0] * n
        self.attempts = [0] * n
        self.started: list[float | None] = [None] * n
        self.finished: list[float | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.scope: dict[str, Any] = {"input": input, "flow": {"name": flow.name,
                                      "file": flow.file}, "run": {"id": run_id}}
        if event is not None:
            self.scope["event"] = event
        self.ready: deque[int] = deque(flow.roots)
        self.finished_count = 0
        self.idle: list[anyio.Event] = []  # one event per idle worker
        self.stopping = False
        self.failed: list[int] = []
        self.cancel_scope: anyio.CancelScope | None = None
        self.skipped_unrecorded: list[int] = []
        self.log = executor.log.bind(flow=flow.name, run_id=run_id)
        self.started_at = 0.0
        self.finished_at = 0.0

    # -- the run ---------------------------------------------------------------------------

    async def execute(self) -> RunOutcome:
        flow = self.flow
        self.started_at = time.time()
        timed_out = False
        self.log.debug("taskflow.run_started", tasks=self.n)
        try:
            with anyio.CancelScope() as timeout_scope:
                if flow.timeout is not None:
                    timeout_scope.deadline = anyio.current_time() + flow.timeout
                async with anyio.create_task_group() as tg:
                    self.cancel_scope = tg.cancel_scope
                    for _ in range(min(flow.concurrency, self.n) - 1):
                        tg.start_soon(self.worker)
                    await self.worker()
            timed_out = timeout_scope.cancelled_caught
        except anyio.get_cancelled_exc_class():
            self.finished_at = time.time()
            with anyio.move_on_after(RECORD_TIMEOUT, shield=True):
                await self.finish_pending("cancelled")
            self.log.info("taskflow.run_cancelled")
            raise
        await self.finish_pending("skipped")
        self.finished_at = time.time()
        return self.outcome(timed_out)

    def outcome(self, timed_out: bool) -> RunOutcome:
        flow = self.flow
        error: str | None = None
        if timed_out:
            error = f"run timed out after {flow.timeout:g}s"
        elif self.failed:
            first = self.failed[0]
            error = f"task {self.nodes[first].id} failed: {self.errors[first]}"
            if len(self.failed) > 1:
                others = ", ".join(self.nodes[i].id for i in self.failed[1:])
                error += f" (also failed: {others})"
        outputs: dict[str, Any] = {}
        if error is None and flow.outputs_tree:
            try:
                outputs = render_tree(flow.outputs_tree, self.scope)
            except TemplateError as exc:
                error = f"outputs: {exc}"
        status: Literal["done", "error"] = "done" if error is None else "error"
        self.log.info("taskflow.run_finished", status=status, error=error,
                      duration=round(self.finished_at - self.started_at, 6))
        return RunOutcome(self, status, error, outputs)

    async def finish_pending(self, state: str) -> None:
        """Give every task that never ran (or never finished) a final state and record it."""
        progress = self.progress
        now = time.time()
        for i, node in enumerate(self.nodes):
            current = self.state[i]
            if current in ("pending", "running"):
                self.state[i] = state if current == "pending" else "cancelled"
                self.finished[i] = now if current == "running" else None
                if progress is not None:
                    progress(node.id, self.state[i])
                await self.record(node.id, self.state[i], self.attempts[i], None, None,
                                  self.started[i], self.finished[i])

    # -- workers ---------------------------------------------------------------------------

    async def worker(self) -> None:
        ready = self.ready
        since_checkpoint = 0
        while True:
            if ready and not self.stopping:
                await self.run_node(ready.popleft())
                since_checkpoint += 1
                if since_checkpoint >= CHECKPOINT_EVERY:
                    since_checkpoint = 0
                    await anyio.lowlevel.checkpoint()
                continue
            if self.finished_count >= self.n or self.stopping:
                for waiter in self.idle:
                    waiter.set()
                self.idle.clear()
                return
            waiter = anyio.Event()
            self.idle.append(waiter)
            await waiter.wait()

    def notify(self) -> None:
        """Wake one idle worker per ready task beyond the one this worker takes next."""
        extra = len(self.ready) - 1
        idle = self.idle
        while extra > 0 and idle:
            idle.pop().set()
            extra -= 1

    async def run_node(self, i: int) -> None:
        node = self.nodes[i]
        if node.when is not None:
            try:
                go = bool(node.when.evaluate(self.scope))
            except (TemplateError, ExpressionError) as exc:
                await self.fail(i, f"when: {exc}")
                return
            if not go:
                await self.skip(i)
                return
        self.state[i] = "running"
        self.started[i] = time.time()
        if self.progress is not None:
            self.progress(node.id, "running")
        selected: tuple[int, ...] | None = None
        out: Any
        try:
            if node.is_condition:
                self.attempts[i] = 1
                if self.recorder is not None:
                    await self.recorder.task_started(node.id, 1)
                selected, out = self.choose_branch(node)
            elif node.func is not None and node.retry is None and node.timeout is None \
                    and self.recorder is None:
                self.attempts[i] = 1
                out = await node.func(TaskContext(self, node, 1, node.config))
            else:
                out = await self.attempt_loop(node)
        except anyio.get_cancelled_exc_class():
            self.state[i] = "cancelled"
            self.finished[i] = time.time()
            if self.progress is not None:
                self.progress(node.id, "cancelled")
            await self.record(node.id, "cancelled", self.attempts[i], None, None,
                              self.started[i], self.finished[i])
            raise
        except _NoRetry as exc:
            await self.fail(i, _describe(exc.__cause__ or exc))
            return
        except Exception as exc:
            await self.fail(i, _describe(exc),
                            exc.output if isinstance(exc, TaskFailure) else None)
            return
        if out is None:
            out = {}
        elif type(out) is not dict:
            if isinstance(out, Mapping):
                out = dict(out)
            else:
                await self.fail(i, _describe(TaskOutputError(
                    f"task returned {type(out).__name__}, expected a dict of outputs")))
                return
        self.state[i] = "done"
        self.scope[node.id] = out
        self.finished_count += 1
        if self.progress is not None:
            self.progress(node.id, "done")
        self.finished[i] = time.time()
        if self.recorder is not None:
            await self.record(node.id, "done", self.attempts[i], out, None, self.started[i],
                              self.finished[i])
        self.release(node, True, selected)
        if self.skipped_unrecorded:
            await self.flush_skipped()
        if self.idle:
            self.notify()

    def choose_branch(self, node: Node) -> tuple[tuple[int, ...], dict[str, Any]]:
        for expr, targets in node.branches:
            if expr.evaluate(self.scope):
                return targets, {"branch": expr.source,
                                 "selected": [self.nodes[t].id for t in targets]}
        targets = node.default_branch
        return targets, {"branch": "default", "selected": [self.nodes[t].id for t in targets]}

    def build(self, node: Node) -> tuple[TaskFunc, Any]:
        """The task function for a templated config: render, validate, call the factory."""
        assert node.task_type is not None
        try:
            raw = render_tree(node.config_tree, self.scope)
            cfg = msgspec.convert(raw, node.task_type.config, dec_hook=dec_hook)
        except TemplateError as exc:
            raise _NoRetry() from exc
        except msgspec.ValidationError as exc:
            raise _NoRetry() from TaskOutputError(f"config after templating: {exc}")
        return node.task_type.factory(cfg), cfg

    async def attempt_loop(self, node: Node) -> Any:
        i = node.index
        retry = node.retry
        max_attempts = retry.max_attempts if retry is not None else 1
        attempt = 0
        while True:
            attempt += 1
            self.attempts[i] = attempt
            if self.recorder is not None:
                await self.recorder.task_started(node.id, attempt)
            if node.func is not None:
                func, cfg = node.func, node.config
            else:
                func, cfg = self.build(node)
            try:
                ctx = TaskContext(self, node, attempt, cfg)
                if node.timeout is None:
                    return await func(ctx)
                try:
                    with anyio.fail_after(node.timeout):
                        return await func(ctx)
                except TimeoutError as exc:
                    if str(exc):
                        raise
                    raise TimeoutError(f"timed out after {node.timeout:g}s") from None
            except Exception as exc:
                if retry is None or attempt >= max_attempts:
                    raise
                backoff = min(retry.max_backoff,
                              retry.initial_backoff * retry.backoff_multiplier ** (attempt - 1))
                delay = random.uniform(0.0, backoff) if retry.jitter else backoff
                self.log.info("taskflow.task_retry", task=node.id, attempt=attempt,
                              delay=round(delay, 3), error=_describe(exc))
                await anyio.sleep(delay)

    async def record(self, task_id: str, state: str, attempts: int,
                     output: dict[str, Any] | None, error: str | None,
                     started_at: float | None, finished_at: float | None) -> None:
        """``recorder.task_finished``, shielded: a final state is never lost to a cancel."""
        if self.recorder is None:
            return
        with anyio.move_on_after(RECORD_TIMEOUT, shield=True):
            await self.recorder.task_finished(task_id, state, attempts, output, error,
                                              started_at, finished_at)

    # -- state changes ---------------------------------------------------------------------

    async def fail(self, i: int, error: str, output: dict[str, Any] | None = None) -> None:
        node = self.nodes[i]
        self.state[i] = "error"
        self.errors[i] = error
        self.finished[i] = time.time()
        self.finished_count += 1
        self.failed.append(i)
        self.log.warning("taskflow.task_failed", task=node.id, attempts=self.attempts[i],
                         error=error)
        if self.progress is not None:
            self.progress(node.id, "error")
        await self.record(node.id, "error", self.attempts[i], output, error, self.started[i],
                          self.finished[i])
        if self.flow.spec.on_failure == "fail_fast":
            self.stopping = True
            assert self.cancel_scope is not None
            self.cancel_scope.cancel()
            return
        self.release(node, False, None)
        if self.skipped_unrecorded:
            await self.flush_skipped()
        self.notify()

    async def skip(self, i: int) -> None:
        self.mark_skipped(i)
        self.release(self.nodes[i], False, None)
        await self.flush_skipped()
        self.notify()

    def mark_skipped(self, i: int) -> None:
        self.state[i] = "skipped"
        self.finished_count += 1
        if self.progress is not None:
            self.progress(self.nodes[i].id, "skipped")
        if self.recorder is not None:
            self.skipped_unrecorded.append(i)

    async def flush_skipped(self) -> None:
        pending, self.skipped_unrecorded = self.skipped_unrecorded, []
        for i in pending:
            await self.record(self.nodes[i].id, "skipped", 0, None, None, None, None)

    def release(self, node: Node, ok: bool, selected: tuple[int, ...] | None) -> None:
        """Count *node* as finished for its successors; queue or skip the ones now decided."""
        nodes, remaining, okc, ready = self.nodes, self.remaining, self.ok, self.ready
        stack: list[tuple[Node, bool, tuple[int, ...] | None]] = [(node, ok, selected)]
        while stack:
            cur, cur_ok, sel = stack.pop()
            targets = cur.branch_targets if cur.is_condition else None
            for s in cur.succs:
                if cur_ok and (targets is None or s not in targets or (sel and s in sel)):
                    okc[s] += 1
                remaining[s] -= 1
                if remaining[s]:
                    continue
                succ = nodes[s]
                rule = succ.trigger_rule
                if rule == "all_done":
                    go = okc[s] == len(succ.deps)
                elif rule == "one_done":
                    go = okc[s] > 0
                else:
                    go = True
                if go:
                    ready.append(s)
                else:
                    self.mark_skipped(s)
                    stack.append((succ, False, None))

    async def run_subflow(self, name: str, input: dict[str, Any]) -> dict[str, Any]:
        if self.depth + 1 > MAX_SUBFLOW_DEPTH:
            raise SubflowError(f"subflow {name}: nesting deeper than {MAX_SUBFLOW_DEPTH}")
        flow = self.executor.flow(name)
        child = _Run(self.executor, flow, new_id(), None, input, None, None, self.depth + 1)
        outcome = await child.execute()
        if outcome.status != "done":
            raise SubflowError(f"subflow {name} failed: {outcome.error}")
        return outcome.outputs
