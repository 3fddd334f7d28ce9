"""Reload on SIGHUP: re-read the config and the flows, validate all, then apply all or nothing.

One reload, in order:

1. ``sd_notify RELOADING=1`` with ``MONOTONIC_USEC`` (what ``Type=notify-reload`` expects);
2. load the config file again (environment overrides included) and the flows dir, in a worker
   thread (file reads do not stall the listener); a problem is logged as one
   ``daemon.reload_failed`` line naming the file, key and line, and the running config stays;
3. ask every reloadable actor to prepare (:class:`~mfo_actors.actors._reload.Reloadable`); if
   one cannot (a certificate that does not load), nothing is applied;
4. apply every prepared step (none can fail or wait), and the log level;
5. ``READY=1`` again, and ``<state_dir>/reload.json`` for ``mfo-actors reload``.

Keys that a running daemon cannot change (all but :data:`LIVE_KEYS`: listen addresses, state
dir, store, ``flows.enabled``, turning TLS on or off...) are reported as ``needs_restart``
and keep their running values: the actors are handed the *effective* config, the new one with
each of those keys put back (:func:`effective_config`), so none can act on a key it must not.
Nothing is restarted, so no connection is closed and no accepted event is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from mfo_actors.actors._reload import Apply, ConfigUpdate, Reloadable
from mfo_actors.actors.scheduler import load_instance_flows
from mfo_actors.config import InstanceConfig, flows_dir_problem, load_config
from mfo_actors.daemon._notify import SystemdNotifier
from mfo_actors.errors import ConfigError
from mfo_actors.observability import get_logger, redact, set_log_level
from mfo_actors.runtime import Actor
from mfo_actors.taskflow import Flow, FlowLoadError

__all__ = [
    "LIVE_KEYS", "RELOAD_STATUS_FILE", "Reloader", "effective_config", "is_live",
    "restart_keys_changed",
]

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
# Optional sections whose contents are live but whose presence is not: adding or removing
# ``webhook_listener.tls`` would flip a listening port between HTTP and HTTPS under its
# clients, so that needs a restart; a new certificate and key do not.
SWITCH_KEYS = ("webhook_listener.tls",)
_TLS_FILES = ("cert", "key")


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
    # A switch key is named whole only when it appeared or went (else its sub-keys are).
    return [key for key in _changed_keys(_plain(running), _plain(new))
            if not is_live(key) or key in SWITCH_KEYS]


def effective_config(running: InstanceConfig, new: InstanceConfig) -> InstanceConfig:
    """*new* with every key that needs a restart put back to its *running* value: what the
    actors take on a reload."""
    merged: InstanceConfig = _merge(running, new, "")
    return merged


def _merge(running: Any, new: Any, prefix: str) -> Any:
    changes: dict[str, Any] = {}
    for field in msgspec.structs.fields(type(new)):
        key = prefix + field.name
        old, value = getattr(running, field.name), getattr(new, field.name)
        if old == value:
            continue
        if key in SWITCH_KEYS:
            if (old is None) != (value is None):
                changes[field.name] = old
        elif isinstance(old, msgspec.Struct) and type(old) is type(value) and any(
                p.startswith(key + ".") for p in (*LIVE_KEYS, *NOT_LIVE_KEYS, *SWITCH_KEYS)):
            changes[field.name] = _merge(old, value, key + ".")  # live and fixed keys inside
        elif not is_live(key):
            changes[field.name] = old
    return msgspec.structs.replace(new, **changes) if changes else new


def _tls_digests(cfg: InstanceConfig) -> dict[str, str | None]:
    """A digest of the listener's certificate and key files by key (a renewal keeps their
    paths: only the contents tell that the certificate changed)."""
    tls = cfg.webhook_listener.tls
    if tls is None:
        return {}
    digests: dict[str, str | None] = {}
    for name in _TLS_FILES:
        try:
            data = Path(getattr(tls, name)).read_bytes()
        except OSError:
            digests[name] = None  # the listener's prepare step reports it
        else:
            digests[name] = hashlib.sha256(data).hexdigest()
    return {f"webhook_listener.tls.{name}": digest for name, digest in digests.items()}


def _config_path(cfg: InstanceConfig) -> str | None:
    """The absolute, resolved path of the file *cfg* came from."""
    return os.path.realpath(cfg.source_file) if cfg.source_file else None


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A new config, read and checked off the event loop."""

    new: InstanceConfig
    effective: InstanceConfig
    flows: dict[str, Flow]
    tls: dict[str, str | None]


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
        self._config_path = _config_path(cfg)
        self._tls = _tls_digests(cfg)
        # The flows running now (the scheduler's; none when flows are off).
        self._flows = sorted(next((getattr(a, "flows", {}) for a in actors
                                   if a.name == "scheduler"), {}))
        self.generation = 0
        # Generation 0: which file this daemon reloads, before any reload (the CLI checks it).
        self._write_status({"generation": 0, "pid": os.getpid(), "config": self._config_path,
                            "ok": True, "error": None})

    @property
    def config(self) -> InstanceConfig:
        """The config in force (its restart-only keys as the daemon started)."""
        return self._current

    async def reload(self) -> bool:
        """One reload; returns whether the new config was applied."""
        await self._notifier.reloading()
        started = time.monotonic()
        self.generation += 1
        result: dict[str, Any] = {"generation": self.generation, "pid": os.getpid(),
                                  "config": self._config_path}
        try:
            loaded = await anyio.to_thread.run_sync(self._load)
            result.update(self._apply(loaded))
        except ConfigError as exc:
            errors = exc.errors if isinstance(exc, FlowLoadError) else [exc]
            lines = [" ".join(str(e).splitlines()) for e in errors]
            log.error("daemon.reload_failed", error=lines[0], errors=lines,
                      hint="the running config is kept")
            result.update(ok=False, error=lines[0], errors=lines)
        except Exception as exc:  # a bug must not take the daemon down with it
            log.error("daemon.reload_failed", error=repr(exc), exc_info=True,
                      hint="the running config is kept")
            error = str(redact(repr(exc)))  # reload.json is read by people, keep it clean
            result.update(ok=False, error=error, errors=[error])
        self._write_status(result)
        status = "running" if result["ok"] else f"running; reload failed: {result['error']}"
        await self._notifier.ready(status)
        log.info("daemon.reload_done", ok=result["ok"], generation=self.generation,
                 seconds=round(time.monotonic() - started, 3))
        return bool(result["ok"])

    def _load(self) -> _Loaded:
        """Read and check the config file and the flows (in a worker thread).

        Raises:
          ConfigError: the file or a flow is invalid, or the flows dir went away while flows
            run (a typo, or a deploy half done, must not remove every flow).
        """
        source = self._started.source_file
        if source is None:
            raise ConfigError("this instance was not started from a config file")
        new = load_config(source, environ=self._environ)
        effective = effective_config(self._started, new)
        if self._flows and flows_dir_problem(effective):
            dir_ = effective.flows.dir
            raise ConfigError(
                f"{dir_} does not exist: this reload would remove every flow "
                f"({', '.join(self._flows)}); to remove them, leave the directory empty",
                file=source, key="flows.dir")
        flows = load_instance_flows(effective)
        return _Loaded(new=new, effective=effective, flows=flows, tls=_tls_digests(effective))

    def _apply(self, loaded: _Loaded) -> dict[str, Any]:
        """Prepare every actor, then apply all (on the event loop)."""
        new, effective, flows = loaded.new, loaded.effective, loaded.flows
        needs_restart = restart_keys_changed(self._started, new)
        changed = _changed_keys(_plain(self._current), _plain(effective))
        changed += [key for key, digest in loaded.tls.items()
                    if key in self._tls and digest != self._tls[key] and key not in changed]
        update = ConfigUpdate(cfg=effective, flows=flows)
        steps: list[tuple[str, Apply]] = []
        for actor in self._actors:
            with structlog.contextvars.bound_contextvars(actor=actor.name):
                steps.append((actor.name, actor.prepare_reload(update)))
        for name, step in steps:
            with structlog.contextvars.bound_contextvars(actor=name):
                step()
        set_log_level(effective.logging.level)
        added = sorted(set(flows) - set(self._flows))
        removed = sorted(set(self._flows) - set(flows))
        self._current, self._tls, self._flows = effective, loaded.tls, sorted(flows)
        if needs_restart:
            log.warning("daemon.reload_needs_restart", keys=needs_restart,
                        hint="these keys keep their running values until a restart")
        if removed and not flows:
            log.warning("daemon.reload_removed_every_flow", removed=removed)
        log.info("daemon.reloaded", changed=changed, needs_restart=needs_restart,
                 flows=len(flows), flows_added=added, flows_removed=removed,
                 config=self._config_path)
        return {"ok": True, "error": None, "changed": changed, "needs_restart": needs_restart,
                "flows": sorted(flows), "flows_added": added, "flows_removed": removed}

    def _write_status(self, result: dict[str, Any]) -> None:
        tmp = self._status_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(result), encoding="utf-8")
            os.replace(tmp, self._status_path)
        except OSError as exc:
            log.warning("daemon.reload_status_failed", path=str(self._status_path),
                        error=repr(exc))
