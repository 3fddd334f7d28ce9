"""``mfo-actors reload --config FILE``: validate, then make the running daemon reload (SIGHUP).

The config and its flows are checked here first: an invalid file is reported (exit 1) and the
daemon is not disturbed. The daemon is found through its state dir (the pid in
``daemon.lock``, whose flock proves it alive); after the signal we wait for its answer in
``reload.json`` and print what changed and what needs a restart. Under systemd this is the
unit's ``ExecReload=``, so ``systemctl reload mfo-actors@crm`` fails when the reload does.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["configure"]

DEFAULT_TIMEOUT = 30.0  # seconds to wait for the daemon's answer
POLL_INTERVAL = 0.05


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Validate the config FILE and its flows; if valid, send SIGHUP to the "
        "daemon running on its state dir and wait for its answer. Routes, secrets, rate "
        "limits, TLS certificate, flows, retry policy, credentials and log level change "
        "live; listen addresses, state dir and store need a restart."
    )
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the instance config file the daemon runs")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=cmd_reload)


def cmd_reload(args: argparse.Namespace) -> int:
    import json
    import os
    import signal

    from mfo_actors.actors.scheduler import load_instance_flows
    from mfo_actors.config import load_config
    from mfo_actors.daemon._lock import running_daemon_pid
    from mfo_actors.daemon._reload import RELOAD_STATUS_FILE
    from mfo_actors.errors import UserError

    cfg = load_config(args.config)
    load_instance_flows(cfg)  # raises ConfigError naming the flow file and line
    state_dir = cfg.effective_state_dir
    pid = running_daemon_pid(state_dir)
    if pid is None:
        raise UserError(f"no mfo-actors daemon is running on state_dir {state_dir}")
    status_path = state_dir / RELOAD_STATUS_FILE

    def status() -> dict[str, Any] | None:
        try:
            data = json.loads(status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("pid") == pid else None

    before = status()
    # The daemon re-reads the file it was started with: validating another one and
    # reporting "reloaded" would be a lie.
    running = before.get("config") if before else None
    if running and running != os.path.realpath(args.config):
        raise UserError(f"the daemon on state_dir {state_dir} (pid {pid}) runs {running}, "
                        f"not {args.config}: reload {running}")
    generation = int(before["generation"]) if before else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise UserError(f"the daemon (pid {pid}) exited before it could reload") from None
    except PermissionError:
        raise UserError(f"not allowed to signal the daemon (pid {pid}): run as its user "
                        "or root") from None
    deadline = time.monotonic() + args.timeout
    while (answer := status()) is None or int(answer["generation"]) <= generation:
        if time.monotonic() > deadline:
            raise UserError(f"sent SIGHUP to pid {pid}, but it did not answer within "
                            f"{args.timeout:g}s (see its log)")
        time.sleep(POLL_INTERVAL)
    if not answer.get("ok"):
        raise UserError(f"reload failed, running config kept: {answer.get('error')}")
    print(f"reloaded {cfg.instance} (pid {pid}): "
          f"changed {', '.join(answer.get('changed') or []) or 'nothing'}")
    added, removed = answer.get("flows_added") or [], answer.get("flows_removed") or []
    if added or removed:
        print(f"flows added: {', '.join(added) or 'none'}; "
              f"removed: {', '.join(removed) or 'none'}")
    if removed and not answer.get("flows"):
        print("every flow was removed: the flows dir holds none now")
    restart = answer.get("needs_restart") or []
    if restart:
        print(f"needs a restart to take effect: {', '.join(restart)}")
    return 0
