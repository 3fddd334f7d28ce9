"""The daemon: one instance from config to exit code (lock, wiring, supervisor, signals, sd_notify).

``mfo-actors run --config FILE`` calls :func:`run_instance` under ``anyio.run``.
"""

from mfo_actors.daemon._graph import ChannelDecl as ChannelDecl
from mfo_actors.daemon._graph import declare_channels as declare_channels
from mfo_actors.daemon._graph import graph_text as graph_text
from mfo_actors.daemon._lock import StateDirLock as StateDirLock
from mfo_actors.daemon._lock import StateDirLockedError as StateDirLockedError
from mfo_actors.daemon._notify import SystemdNotifier as SystemdNotifier
from mfo_actors.daemon._notify import watchdog_interval as watchdog_interval
from mfo_actors.daemon._run import run_instance as run_instance
from mfo_actors.daemon._wiring import DaemonContext as DaemonContext
from mfo_actors.daemon._wiring import open_instance as open_instance

__all__ = [
    "ChannelDecl",
    "DaemonContext",
    "StateDirLock",
    "StateDirLockedError",
    "SystemdNotifier",
    "declare_channels",
    "graph_text",
    "open_instance",
    "run_instance",
    "watchdog_interval",
]
