"""Which actors make up an instance, and in what order: the one place the daemon is wired.

The supervisor starts the list in order (each once the previous is ready) and stops it in
reverse, so list an actor after everything it depends on: the store before the listener and
the forwarder, the listener (which answers 503 while draining) before nothing it feeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mfo_actors.config import InstanceConfig
from mfo_actors.daemon._notify import SystemdNotifier, watchdog_interval
from mfo_actors.daemon._watchdog import WatchdogActor
from mfo_actors.runtime import Actor, Clock, Supervisor, SystemClock

__all__ = ["DaemonContext", "build_actors"]


@dataclass(eq=False)
class DaemonContext:
    """What the daemon hands to the wiring besides the config: process-wide resources."""

    state_dir: Path
    """The instance's state dir, created and locked by the daemon."""
    notifier: SystemdNotifier
    """sd_notify to systemd (a no-op outside systemd)."""
    environ: Mapping[str, str]
    """The process environment the daemon was started with."""
    clock: Clock = field(default_factory=SystemClock)
    supervisor: Supervisor | None = None
    """Set right after :func:`build_actors` returns, before any actor starts; actors that
    report health (``/readyz``) read ``supervisor.statuses()`` from it at request time."""


def build_actors(cfg: InstanceConfig, ctx: DaemonContext) -> list[Actor]:
    """The instance's actors, in start order.

    Args:
      cfg: The loaded instance config.
      ctx: Process-wide resources (state dir, notifier, clock, the supervisor once built).
    """
    actors: list[Actor] = [
        # First in, last out: keeps systemd's watchdog fed through the whole drain.
        WatchdogActor(ctx.notifier, watchdog_interval(ctx.environ)),
    ]
    return actors
