"""How a running actor takes a new config (SIGHUP): prepare everything, then apply at once.

A reload must not half-happen: a certificate that does not load, or a flow that does not
compile, has to leave every actor as it was. So each reloadable actor answers
:meth:`Reloadable.prepare_reload` in two steps: the call itself builds what the new config
needs and raises :class:`~mfo_actors.errors.ConfigError` if it cannot; the callable it returns
swaps the prepared state in, cannot fail, and does not wait. The daemon prepares every actor
first and applies only if all succeeded.

Each actor reads, from the whole new config, only the keys it can change while running; what
needs a restart (listen addresses, state dir, store) is found and reported by the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mfo_actors.config import InstanceConfig
    from mfo_actors.taskflow import Flow

__all__ = ["Apply", "ConfigUpdate", "Reloadable"]

Apply = Callable[[], None]


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """A new instance config and its flows, both already validated."""

    cfg: InstanceConfig
    flows: Mapping[str, Flow]


@runtime_checkable
class Reloadable(Protocol):
    """An actor that can take a new config while it runs."""

    name: str

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """Build what *update* needs; return the step that swaps it in.

        Raises:
          ConfigError: the new config cannot be used (nothing was changed).
        """
        ...
