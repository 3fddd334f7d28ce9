"""Task types: a name, a config Struct, and a factory that turns a config into a task function.

A factory is ``factory(config) -> TaskFunc`` where ``TaskFunc`` is
``async def fn(ctx: TaskContext) -> dict | None`` (its outputs). The config is validated
against the declared Struct when the flow loads, so ``check`` finds bad config. When a
task's config holds ``${...}`` templates, the factory is called again for every execution
with the rendered config, so keep factories cheap and free of side effects.

Installed packages add types through the entry-point group ``mfo_actors.tasks``; each entry
point names a callable that takes the :class:`TaskRegistry` and registers its types::

    [project.entry-points."mfo_actors.tasks"]
    mytasks = "mypkg.flows:register"     # def register(registry): registry.register(...)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from mfo_actors.observability import get_logger

if TYPE_CHECKING:
    from mfo_actors.taskflow._context import TaskContext

__all__ = [
    "ENTRY_POINT_GROUP",
    "EmptyConfig",
    "TaskFactory",
    "TaskFunc",
    "TaskRegistry",
    "TaskType",
]

ENTRY_POINT_GROUP = "mfo_actors.tasks"

TaskFunc = Callable[["TaskContext"], Awaitable[dict[str, Any] | None]]
TaskFactory = Callable[[Any], TaskFunc]
C = TypeVar("C", bound=msgspec.Struct)

_log = get_logger("mfo_actors.taskflow")


class EmptyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The config of a task type that takes none: any key is an error."""


@dataclass(frozen=True, slots=True)
class TaskType:
    """A registered type: its name, factory and config Struct."""

    name: str
    factory: TaskFactory
    config: type[msgspec.Struct]


class TaskRegistry:
    """Maps task ``type`` names to factories; one per loader/executor, copied freely."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def register(
        self,
        type_name: str,
        factory: TaskFactory,
        *,
        config: type[msgspec.Struct] = EmptyConfig,
        replace: bool = False,
    ) -> None:
        """Register *factory* for *type_name*; a second registration needs ``replace=True``."""
        if not type_name or not isinstance(type_name, str):
            raise ValueError("a task type needs a non-empty name")
        if not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
            raise TypeError(f"config of task type {type_name} must be a msgspec.Struct class")
        if type_name in self._types and not replace:
            raise ValueError(f"task type {type_name} is already registered")
        self._types[type_name] = TaskType(type_name, factory, config)

    def factory(
        self, type_name: str, *, config: type[msgspec.Struct] = EmptyConfig
    ) -> Callable[[TaskFactory], TaskFactory]:
        """Decorator form of :meth:`register` for a factory ``(config) -> TaskFunc``."""

        def decorate(factory: TaskFactory) -> TaskFactory:
            self.register(type_name, factory, config=config)
            return factory

        return decorate

    def task(
        self, type_name: str, *, config: type[C]
    ) -> Callable[[Callable[[TaskContext, C], Awaitable[dict[str, Any] | None]]],
                  Callable[[TaskContext, C], Awaitable[dict[str, Any] | None]]]:
        """Decorator for the common case ``async def fn(ctx, config) -> dict``."""

        def decorate(
            fn: Callable[[TaskContext, C], Awaitable[dict[str, Any] | None]],
        ) -> Callable[[TaskContext, C], Awaitable[dict[str, Any] | None]]:
            def factory(cfg: C) -> TaskFunc:
                async def run(ctx: TaskContext) -> dict[str, Any] | None:
                    return await fn(ctx, cfg)

                return run

            self.register(type_name, factory, config=config)
            return fn

        return decorate

    def get(self, type_name: str) -> TaskType | None:
        return self._types.get(type_name)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._types))

    def names(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted(self._types)

    def copy(self) -> TaskRegistry:
        new = TaskRegistry()
        new._types = dict(self._types)
        return new

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Call every entry point of *group* with this registry; returns their names.

        A plugin that fails to import or register is logged and skipped, so one broken
        package does not stop the daemon; its types are then reported unknown by ``check``.
        """
        loaded = []
        for ep in entry_points(group=group):
            try:
                ep.load()(self)
            except Exception as exc:  # a third-party plugin: report, never crash the loader
                _log.warning("taskflow.plugin_failed", entry_point=ep.name, value=ep.value,
                             error=f"{type(exc).__name__}: {exc}")
                continue
            loaded.append(ep.name)
        return loaded
