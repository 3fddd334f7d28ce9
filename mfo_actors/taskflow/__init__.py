"""Taskflows: YAML-defined DAGs of tasks, loaded and validated once, run under anyio.

Usable as a library without the daemon. The scheduler actor (triggers, run history) and
the ``flows``/``runs`` CLI are built on this API.

A flow file (``flows/*.yaml``, one flow per file)::

    name: Welcome
    triggers:
      - event: {source: crm, type: "user.*", when: "${event.payload.plan} != 'free'"}
      - cron: "0 9 * * mon-fri"        # croniter syntax; timezone: Europe/Paris
      - interval: 30s
    concurrency: 4                      # tasks at once within one run
    on_failure: fail_fast               # or continue
    on_interrupt: rerun                 # or fail (what the scheduler does after a crash)
    timeout: 5m                         # whole run
    outputs: {reply: "${greet.content}"}
    tasks:
      - id: lookup
        type: mfo.memory.get
        config: {key: "user:${event.payload.id}"}
      - id: greet
        type: mfo.chat
        dependencies: [lookup]
        when: "${lookup.value} != null"
        trigger_rule: all_done          # or one_done, always
        retry: {max_attempts: 3, initial_backoff: 1s, max_backoff: 1m, backoff_multiplier: 2}
        timeout: 30s                    # per attempt
        config: {prompt_file: prompts/welcome.md, thread_id: "${input.thread}"}

Loading (everything is checked here; errors are ``ConfigError(file=, key=, line=)``)::

    registry = default_registry()                 # built-ins + entry-point plugins
    flows = load_flows("./flows", registry)       # {name: Flow}; FlowLoadError has .errors
    flow = load_flow("flows/welcome.yaml", registry)
    problems = check_flows("./flows")             # list[str], one line each ([] = valid)
    print(to_mermaid(flow))                       # ``flows graph``

Running::

    executor = FlowExecutor(flows, client=mfo_client, limiter=anyio.CapacityLimiter(4))
    outcome = await executor.run("Welcome", run_id=record.run_id, event=stored_event,
                                 input={}, recorder=recorder, progress=on_progress)
    outcome.status            # "done" | "error" (a failed run is not an exception)
    outcome.error, outcome.outputs, outcome.tasks["greet"].state, outcome.to_message()

- ``recorder`` implements :class:`RunRecorder` (``async task_started(task_id, attempt)``,
  ``async task_finished(task_id, state, attempts, output, error, started_at, finished_at)``),
  which the scheduler maps to ``store.TaskRunRecord``. Subflow runs are not recorded.
- ``progress(task_id, state)`` is a sync callback for a live progress line.
- Cancelling the caller records unfinished tasks as ``cancelled`` and re-raises.
- Triggers, for the scheduler: ``flow.event_triggers`` (``EventTrigger.matches(scope)``;
  ``flow.matches_event(event_scope(event))``) and ``flow.schedules`` (``ScheduleTrigger``
  with ``kind``, a restart-stable ``key`` and ``next_after(t, default_timezone=...)``).
  ``flow.on_interrupt`` says whether an interrupted run is rerun.

Task types (config keys -> outputs):

============================  =========================================  ====================
``mfo.chat``                  message | messages | prompt_file,          content, thread_id
                              thread_id | session, stream, model         (usage), session,
                                                                         turns; stream:
                                                                         chunks,
                                                                         first_token_seconds
``mfo.event``                 type, payload, source                      id (idempotency key)
``mfo.memory.set/get/delete`` key (, value)                              get: value
``mfo.tool``                  tool, params                               result
``mfo.resource.get``          id                                         the resource's fields
``mfo.resource.create``       title, content, type, metadata, id         the resource's fields
``mfo.job.create``            type, params, wait, poll_interval,         job_id, status; wait:
                              timeout, cancel_on_timeout                 states, result
``mfo.job.cancel``            job_id                                     job_id, status, error
``mfo.pay``                   amount, currency, description              transaction_id, status
``http.request``              method, url, headers, json | body, timeout   status, json, text
``set``                       values                                     those values
``log``                       message, level                             (none)
``sleep``                     duration                                   (none)
``subflow``                   flow, input                                the subflow's outputs
``condition``                 branches (expression -> ids), default      branch, selected
============================  =========================================  ====================

Custom types: ``registry.register("name", factory, config=MyStruct)`` where
``factory(config) -> async def fn(ctx: TaskContext) -> dict``, or the decorators
``@registry.factory("name", config=...)`` / ``@registry.task("name", config=...)`` (the
latter for ``async def fn(ctx, config)``); installed packages use the entry-point group
``mfo_actors.tasks``. Templates are ``${task.key}``, ``${event.payload.x}``,
``${event.source}``, ``${input.x}``, ``${flow.name}``, ``${run.id}``, and after an
``mfo.chat`` with ``session:`` ``${session.thread_id}``, ``${session.turns}`` (see
``_sessions``; ``_template``). A task that fails may raise :class:`TaskFailure` with an
``output`` (kept in its record: ``mfo.job.create`` keeps the job id and its states there);
``when:`` is a small expression language, never eval (see ``_expr``).
"""

from mfo_actors.taskflow._builtins import builtin_registry as builtin_registry
from mfo_actors.taskflow._builtins import default_registry as default_registry
from mfo_actors.taskflow._context import TaskContext as TaskContext
from mfo_actors.taskflow._context import event_scope as event_scope
from mfo_actors.taskflow._errors import ClientUnavailableError as ClientUnavailableError
from mfo_actors.taskflow._errors import ExpressionError as ExpressionError
from mfo_actors.taskflow._errors import ExpressionSyntaxError as ExpressionSyntaxError
from mfo_actors.taskflow._errors import FlowLoadError as FlowLoadError
from mfo_actors.taskflow._errors import JobFailedError as JobFailedError
from mfo_actors.taskflow._errors import SessionsUnavailableError as SessionsUnavailableError
from mfo_actors.taskflow._errors import SubflowError as SubflowError
from mfo_actors.taskflow._errors import TaskFailure as TaskFailure
from mfo_actors.taskflow._errors import TaskflowError as TaskflowError
from mfo_actors.taskflow._errors import TaskOutputError as TaskOutputError
from mfo_actors.taskflow._errors import TemplateError as TemplateError
from mfo_actors.taskflow._errors import UnknownFlowError as UnknownFlowError
from mfo_actors.taskflow._executor import FlowExecutor as FlowExecutor
from mfo_actors.taskflow._executor import ProgressCallback as ProgressCallback
from mfo_actors.taskflow._executor import RunOutcome as RunOutcome
from mfo_actors.taskflow._executor import RunRecorder as RunRecorder
from mfo_actors.taskflow._executor import TaskOutcome as TaskOutcome
from mfo_actors.taskflow._expr import Expression as Expression
from mfo_actors.taskflow._expr import compile_expression as compile_expression
from mfo_actors.taskflow._flow import EventTrigger as EventTrigger
from mfo_actors.taskflow._flow import Flow as Flow
from mfo_actors.taskflow._flow import Node as Node
from mfo_actors.taskflow._flow import ScheduleTrigger as ScheduleTrigger
from mfo_actors.taskflow._loader import check_flows as check_flows
from mfo_actors.taskflow._loader import load_flow as load_flow
from mfo_actors.taskflow._loader import load_flow_data as load_flow_data
from mfo_actors.taskflow._loader import load_flow_text as load_flow_text
from mfo_actors.taskflow._loader import load_flows as load_flows
from mfo_actors.taskflow._mermaid import to_mermaid as to_mermaid
from mfo_actors.taskflow._model import EventMatchSpec as EventMatchSpec
from mfo_actors.taskflow._model import FlowSpec as FlowSpec
from mfo_actors.taskflow._model import RetrySpec as RetrySpec
from mfo_actors.taskflow._model import TaskSpec as TaskSpec
from mfo_actors.taskflow._model import TriggerSpec as TriggerSpec
from mfo_actors.taskflow._registry import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from mfo_actors.taskflow._registry import EmptyConfig as EmptyConfig
from mfo_actors.taskflow._registry import TaskFactory as TaskFactory
from mfo_actors.taskflow._registry import TaskFunc as TaskFunc
from mfo_actors.taskflow._registry import TaskRegistry as TaskRegistry
from mfo_actors.taskflow._registry import TaskType as TaskType
from mfo_actors.taskflow._sessions import SESSION_FIELDS as SESSION_FIELDS
from mfo_actors.taskflow._sessions import ChatSessions as ChatSessions
from mfo_actors.taskflow._template import Template as Template
from mfo_actors.taskflow._template import compile_template as compile_template

__all__ = [
    "ENTRY_POINT_GROUP", "SESSION_FIELDS", "ChatSessions", "ClientUnavailableError",
    "EmptyConfig", "EventMatchSpec", "EventTrigger", "Expression", "ExpressionError",
    "ExpressionSyntaxError", "Flow", "FlowExecutor", "FlowLoadError", "FlowSpec",
    "JobFailedError", "Node", "ProgressCallback", "RetrySpec", "RunOutcome", "RunRecorder",
    "ScheduleTrigger", "SessionsUnavailableError", "SubflowError", "TaskContext",
    "TaskFactory", "TaskFailure", "TaskFunc", "TaskOutcome", "TaskOutputError", "TaskRegistry",
    "TaskSpec", "TaskType", "TaskflowError", "Template", "TemplateError", "TriggerSpec",
    "UnknownFlowError", "builtin_registry", "check_flows", "compile_expression",
    "compile_template", "default_registry", "event_scope", "load_flow", "load_flow_data",
    "load_flow_text", "load_flows", "to_mermaid",
]  # fmt: skip
