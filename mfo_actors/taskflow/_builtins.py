"""The built-in task types, and :func:`default_registry`.

Config keys follow the flow files (see the package docstring for the table). ``mfo.*``
tasks call the shared MFO client from ``ctx.client`` (so they get its auth, breaker and
rate limit); without one they fail with :class:`ClientUnavailableError`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import anyio
import httpx
import msgspec

from mfo_actors.config import Duration
from mfo_actors.taskflow._context import TaskContext
from mfo_actors.taskflow._errors import ClientUnavailableError
from mfo_actors.taskflow._registry import TaskFunc, TaskRegistry

__all__ = [
    "ChatConfig",
    "ConditionConfig",
    "EventConfig",
    "HttpRequestConfig",
    "JobCreateConfig",
    "LogConfig",
    "MemoryGetConfig",
    "MemorySetConfig",
    "ResourceGetConfig",
    "SetConfig",
    "SleepConfig",
    "SubflowConfig",
    "ToolConfig",
    "builtin_registry",
    "default_registry",
]


class _Cfg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of built-in task configs."""


class ChatConfig(_Cfg, frozen=True, kw_only=True):
    """``mfo.chat``: one of ``message``, ``messages`` or ``prompt_file`` (a Markdown template
    beside the flow file, its ``${...}`` rendered like any config value)."""

    template_files: ClassVar[tuple[str, ...]] = ("prompt_file",)

    message: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_file: str | None = None  # at run time: the rendered contents of the file
    thread_id: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("message", "messages", "prompt_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("mfo.chat needs exactly one of message, messages, prompt_file")


class EventConfig(_Cfg, frozen=True, kw_only=True):
    type: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    source: str = "taskflow"


class MemorySetConfig(_Cfg, frozen=True, kw_only=True):
    key: str
    value: Any = None


class MemoryGetConfig(_Cfg, frozen=True, kw_only=True):
    key: str


class ToolConfig(_Cfg, frozen=True, kw_only=True):
    tool: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class ResourceGetConfig(_Cfg, frozen=True, kw_only=True):
    id: str


class JobCreateConfig(_Cfg, frozen=True, kw_only=True):
    type: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class HttpRequestConfig(_Cfg, frozen=True, kw_only=True):
    """``http.request``; a status >= 400 fails the task unless ``raise_for_status: false``."""

    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    json: Any = None
    body: str | None = None
    timeout: Duration = Duration(30.0)
    raise_for_status: bool = True

    def __post_init__(self) -> None:
        if self.json is not None and self.body is not None:
            raise ValueError("http.request takes json or body, not both")
        if not self.url.startswith(("http://", "https://", "${")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")


class SetConfig(_Cfg, frozen=True, kw_only=True):
    values: dict[str, Any] = msgspec.field(default_factory=dict)


class LogConfig(_Cfg, frozen=True, kw_only=True):
    message: Any
    level: Literal["debug", "info", "warning", "error"] = "info"


class SleepConfig(_Cfg, frozen=True, kw_only=True):
    duration: Duration


class SubflowConfig(_Cfg, frozen=True, kw_only=True):
    flow: str
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class ConditionConfig(_Cfg, frozen=True, kw_only=True):
    """``branches``: expression -> successor id(s), first true wins; else ``default``."""

    branches: dict[str, list[str] | str] = msgspec.field(default_factory=dict)
    default: list[str] | str | None = None


def _client(ctx: TaskContext) -> Any:
    client = ctx.client
    if client is None:
        raise ClientUnavailableError(ctx.task_type)
    return client


def _chat(cfg: ChatConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        client = _client(ctx)
        message = cfg.message if cfg.message is not None else cfg.prompt_file
        reply = await client.chat.send(message, messages=cfg.messages, thread_id=cfg.thread_id)
        return {"content": reply.content, "thread_id": reply.thread_id}

    return run


def _event(cfg: EventConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        # Stable across retries and reruns of this run, so the server can drop duplicates.
        key = f"{ctx.run_id}.{ctx.task_id}"
        body = {"id": key, "source": cfg.source, "type": cfg.type, "payload": cfg.payload}
        await _client(ctx).events.send(body, idempotency_key=key)
        return {"id": key}

    return run


def _memory_set(cfg: MemorySetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await _client(ctx).memory.set(cfg.key, cfg.value)
        return {}

    return run


def _memory_get(cfg: MemoryGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        item = await _client(ctx).memory.get(cfg.key)
        return {"value": item.value}

    return run


def _memory_delete(cfg: MemoryGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await _client(ctx).memory.delete(cfg.key)
        return {}

    return run


def _tool(cfg: ToolConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        # A key stable across attempts lets the client retry a tool call safely.
        result = await _client(ctx).tools.execute(cfg.tool, cfg.params,
                                                  idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        return {"result": result.result}

    return run


def _resource_get(cfg: ResourceGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        resource = await _client(ctx).resources.get(cfg.id)
        out = msgspec.to_builtins(resource)
        return out if isinstance(out, dict) else {"value": out}

    return run


def _job_create(cfg: JobCreateConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        job = await _client(ctx).jobs.create(cfg.type, cfg.params,
                                             idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        return {"job_id": job.id}

    return run


def _http_request(cfg: HttpRequestConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": cfg.headers}
        if cfg.json is not None:
            kwargs["json"] = cfg.json
        elif cfg.body is not None:
            kwargs["content"] = cfg.body.encode()
        async with httpx.AsyncClient(timeout=cfg.timeout) as http:
            response = await http.request(cfg.method, cfg.url, **kwargs)
        if cfg.raise_for_status and response.status_code >= 400:
            raise RuntimeError(f"{cfg.method} {cfg.url} answered {response.status_code}")
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        return {"status": response.status_code, "json": data, "text": response.text}

    return run


def _set(cfg: SetConfig) -> TaskFunc:
    values = dict(cfg.values)

    async def run(ctx: TaskContext) -> dict[str, Any]:
        return values

    return run


def _log(cfg: LogConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        getattr(ctx.log, cfg.level)("taskflow.log", message=cfg.message)
        return {}

    return run


def _sleep(cfg: SleepConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await anyio.sleep(cfg.duration)
        return {}

    return run


def _subflow(cfg: SubflowConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        return await ctx.run_subflow(cfg.flow, cfg.input)

    return run


def _condition(cfg: ConditionConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:  # the executor evaluates conditions
        raise RuntimeError("condition tasks are evaluated by the executor")

    return run


def builtin_registry() -> TaskRegistry:
    """A registry with only the built-in types (no plugins)."""
    registry = TaskRegistry()
    registry.register("mfo.chat", _chat, config=ChatConfig)
    registry.register("mfo.event", _event, config=EventConfig)
    registry.register("mfo.memory.set", _memory_set, config=MemorySetConfig)
    registry.register("mfo.memory.get", _memory_get, config=MemoryGetConfig)
    registry.register("mfo.memory.delete", _memory_delete, config=MemoryGetConfig)
    registry.register("mfo.tool", _tool, config=ToolConfig)
    registry.register("mfo.resource.get", _resource_get, config=ResourceGetConfig)
    registry.register("mfo.job.create", _job_create, config=JobCreateConfig)
    registry.register("http.request", _http_request, config=HttpRequestConfig)
    registry.register("set", _set, config=SetConfig)
    registry.register("log", _log, config=LogConfig)
    registry.register("sleep", _sleep, config=SleepConfig)
    registry.register("subflow", _subflow, config=SubflowConfig)
    registry.register("condition", _condition, config=ConditionConfig)
    return registry


def default_registry(*, entry_points: bool = True) -> TaskRegistry:
    """The built-ins plus every installed ``mfo_actors.tasks`` plugin (a fresh registry)."""
    registry = builtin_registry()
    if entry_points:
        registry.load_entry_points()
    return registry
