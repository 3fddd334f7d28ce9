"""Reload on SIGHUP: re-read the config and the flows, validate all, then apply all or nothing.

One reload, in order:

1. ``sd_notify RELOADING=1`` with ``MONOTONIC_USEC`` (what ``Type=notify-reload`` expects);
2. load the config file again (environment overrides included) and the flows dir; a problem
   is logged as one ``daemon.reload_failed`` line naming the file, key and line, and the
   running config stays;
3. ask every reloadable actor to prepare (:class:`~mfo_actors.actors._reload.Reloadable`); if
   one cannot (a certificate that does not load), nothing is applied;
4. apply every prepared step (none can fail or wait), and the log level;
5. ``READY=1`` again, and ``<state_dir>/reload.json`` for ``mfo-actors reload``.

Keys that a running daemon cannot change (all but :data:`LIVE_KEYS`: listen addresses, state
dir, store, ...) are reported as ``needs_restart`` and keep their running values. Nothing is
restarted, so no connection is closed and no accepted event is touched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from mfo_actors.actors._reload import Apply, ConfigUpdate, Reloadable
from mfo_actors.actors.scheduler import load_instance_flows
from mfo_actors.config import InstanceConfig, load_config
from mfo_actors.daemon._notify import SystemdNotifier
from mfo_actors.errors import ConfigError
from mfo_actors.observability import get_logger, set_log_level
from mfo_actors.runtime import Actor
from mfo_actors.taskflow import FlowLoadError

__all__ = ["LIVE_KEYS", "RELOAD_STATUS_FILE", "Reloader", "is_live", "restart_keys_changed"]

log = get_logger("mfo_actors.daemon")

RELOAD_STATUS_FILE = "reload.json"

# The keys a running daemon takes (each by the actor that owns it, see ``prepare_reload``), and
# the exceptions inside them. Every other key was bound, opened or sized at start (listen
# addresses, state dir, store, client pool...) and needs a restart: a key added later
# is safe by default, reported instead of silently ignored.
LIVE_KEYS = (
    "webhook_listener", "client.retry", "client.rate_limit", "client.circuit_breaker",
    "auth", "flows.dir", "flows.concurrency",
    "flows.timezone", "flows.catch_up", "logging.level",
)
NOT_LIVE_KEYS = (
    "webhook_listener.enabled", "webhook_listener.host", "webhook_listener.port", "auth.mode",
)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_live(key: str) -> bool:
    """Whether the dotted *key* can change without a restart."""
    return _under(key, LIVE_KEYS) and not _under(key, NOT_LIVE_KEYS)


def _plain(cfg: InstanceConfig) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(cfg, enc_hook=lambda v: str(v))
    data.pop("source_file", None)
    return data


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (lists compared whole); names only, never values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def restart_keys_changed(running: InstanceConfig, new: InstanceConfig) -> list[str]:
    """The keys that differ between *running* and *new* and need a restart to change."""
    return [key for key in _changed_keys(_plain(running), _plain(new)) if not is_live(key)]


class Reloader:
    """Applies a new config to the running actors (see the module docstring).

    Args:
      cfg: The config the daemon started with.
      actors: The instance's actors; those with ``prepare_reload`` take part.
      notifier: sd_notify to systemd.
      state_dir: Where ``reload.json`` is written.
      environ: Where ``${env:...}`` and ``MFO_<SECTION>__<KEY>`` overrides are read.
    """

    def __init__(
        self,
        cfg: InstanceConfig,
        actors: Sequence[Actor],
        *,
        notifier: SystemdNotifier,
        state_dir: Path,
        environ: Any,
    ) -> None:
        self._started = cfg
        self._current = cfg
        self._actors = [a for a in actors if isinstance(a, Reloadable)]
        self._notifier = notifier
        self._status_path = state_dir / RELOAD_STATUS_FILE
        self._environ = environ
        self.generation = 0
        try:
            self._status_path.unlink()  # a previous daemon's answers are not ours
        except OSError:
            pass

    @property
    def config(self) -> InstanceConfig:
        """The config loaded last (its restart-only keys wait for a restart)."""
        return self._current

    async def reload(self) -> bool:
        """One reload; returns whether the new config was applied."""
        await self._notifier.reloading()
        started = time.monotonic()
        self.generation += 1
        result: dict[str, Any] = {"generation": self.generation, "pid": os.getpid()}
        try:
            result.update(self._reload())
        except ConfigError as exc:
            errors = exc.errors if isinstance(exc, FlowLoadError) else [exc]
            lines = [" ".join(str(e).splitlines()) for e in errors]
            log.error("daemon.reload_failed", error=lines[0], errors=lines,
                      hint="the running config is kept")
            result.update(ok=False, error=lines[0], errors=lines)
        except Exception as exc:  # a bug must not take the daemon down with it
            log.error("daemon.reload_failed", error=repr(exc), exc_info=True,
                      hint="the running config is kept")
            result.update(ok=False, error=repr(exc), errors=[repr(exc)])
        self._write_status(result)
        status = "running" if result["ok"] else f"running; reload failed: {result['error']}"
        await self._notifier.ready(status)
        log.info("daemon.reload_done", ok=result["ok"], generation=self.generation,
                 seconds=round(time.monotonic() - started, 3))
        return bool(result["ok"])

    def _reload(self) -> dict[str, Any]:
        source = self._started.source_file
        if source is None:
            raise ConfigError("this instance was not started from a config file")
        new = load_config(source, environ=self._environ)
        flows = load_instance_flows(new)
        needs_restart = restart_keys_changed(self._started, new)
        changed = [key for key in _changed_keys(_plain(self._current), _plain(new))
                   if is_live(key)]
        update = ConfigUpdate(cfg=new, flows=flows)
        steps: list[Apply] = [actor.prepare_reload(update) for actor in self._actors]
        for step in steps:
            step()
        set_log_level(new.logging.level)
        self._current = new
        if needs_restart:
            log.warning("daemon.reload_needs_restart", keys=needs_restart,
                        hint="these keys keep their running values until a restart")
        log.info("daemon.reloaded", changed=changed, needs_restart=needs_restart,
                 flows=len(flows), config=source)
        return {"ok": True, "error": None, "changed": changed, "needs_restart": needs_restart,
                "flows": sorted(flows)}

    def _write_status(self, result: dict[str, Any]) -> None:
        tmp = self._status_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(result), encoding="utf-8")
            os.replace(tmp, self._status_path)
        except OSError as exc:
            log.warning("daemon.reload_status_failed", path=str(self._status_path),
                        error=repr(exc))
