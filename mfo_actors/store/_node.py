"""Which node a daemon is: the owner recorded on its event claims and flow runs.

Several daemons may share one store (the Postgres backend). At start-up a daemon takes back
the claims and runs it left behind when it died, and ONLY those: another node's are still
being worked on, and come back to the others by lease expiry if that node is dead too. So the
id must be stable across restarts of the same daemon and distinct between daemons:
``<instance>@<host>/<boot id>/<state dir>`` does both. The boot id (Linux's, per machine
boot) tells a restart after a reboot from one in the same boot; the hashed state dir tells two
daemons of one instance on one host apart (the state dir lock allows one daemon per dir).

A CLI process that runs a flow itself (``flows run``) is a node of its own (``.../cli-<pid>``):
with the daemon's id, a daemon (re)starting meanwhile would take its run back and run it a
second time while the CLI still runs it; as its own node, its run is the daemon's only once
its lease ran out (the CLI died).
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from mfo_actors.config import InstanceConfig

__all__ = ["cli_node_id", "node_id"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip().replace("-", "")[:8] or "noboot"
    except OSError:  # not Linux: the host name and state dir still tell nodes apart
        return "noboot"


def node_id(cfg: InstanceConfig) -> str:
    """The node id of the daemon (or CLI) running *cfg* on this host."""
    state_dir = str(cfg.effective_state_dir.resolve())
    digest = hashlib.blake2b(state_dir.encode(), digest_size=4).hexdigest()
    return f"{cfg.instance}@{socket.gethostname()}/{_boot_id()}/{digest}"


def cli_node_id(cfg: InstanceConfig) -> str:
    """The node id of this CLI process, when it runs flows itself (``flows run``)."""
    return f"{node_id(cfg)}/cli-{os.getpid()}"
