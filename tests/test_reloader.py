"""The daemon's reload step on its own: what the actors are handed, what is reported.

Restart-only keys keep their running values in the config the actors get (``flows.enabled``
both ways, TLS turned on), a renewed certificate is reported, a flows dir gone missing is
refused, the apply steps log as their actor, and ``reload.json`` names the config file and
never holds a secret.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme

from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.config import InstanceConfig, load_config
from mfo_actors.daemon import SystemdNotifier
from mfo_actors.daemon._reload import RELOAD_STATUS_FILE, Reloader, effective_config
from mfo_actors.observability import register_secret

pytestmark = pytest.mark.anyio

FLOW = """name: GhFlow
triggers:
  - event: {source: gh, type: "*"}
tasks:
  - {id: hello, type: log, config: {message: hi}}
"""


class Recorder:
    """A reloadable actor that keeps what it was handed, and the log context it applied in."""

    def __init__(self, name: str = "scheduler", flows: dict[str, Any] | None = None,
                 fail: Exception | None = None) -> None:
        self.name = name
        self.flows = flows or {}
        self.fail = fail
        self.updates: list[ConfigUpdate] = []
        self.contexts: list[dict[str, Any]] = []

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        if self.fail is not None:
            raise self.fail
        self.contexts.append(structlog.contextvars.get_contextvars())

        def apply() -> None:
            self.updates.append(update)
            self.contexts.append(structlog.contextvars.get_contextvars())

        return apply


def write(tmp_path: Path, *, flows_enabled: bool = True, tls: str = "",
          flows_dir: str | None = None, extra: str = "") -> Path:
    config = tmp_path / "rl.yaml"
    (tmp_path / "state").mkdir(exist_ok=True)
    config.write_text(f"""
instance: rl
state_dir: {tmp_path / "state"}
webhook_listener:
  port: 0
  {tls}
  routes: [{{path: /hooks/gh, source: gh}}]
flows: {{enabled: {str(flows_enabled).lower()}, dir: {flows_dir or tmp_path / "flows"}}}
{extra}
""")
    return config


@asynccontextmanager
async def reloader(cfg: InstanceConfig, *actors: Any) -> AsyncIterator[Reloader]:
    assert cfg.state_dir is not None
    async with SystemdNotifier.from_environ({}) as notifier:
        yield Reloader(cfg, list(actors), notifier=notifier, state_dir=Path(cfg.state_dir),
                       environ={})


def status(cfg: InstanceConfig) -> dict[str, Any]:
    assert cfg.state_dir is not None
    data: dict[str, Any] = json.loads((Path(cfg.state_dir) / RELOAD_STATUS_FILE).read_text())
    return data


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    directory = tmp_path / "flows"
    directory.mkdir()
    (directory / "gh.yaml").write_text(FLOW)
    return directory


async def test_flows_enabled_off_to_on_is_not_applied(tmp_path: Path, flows: Path) -> None:
    """The listener would match triggers and store runs that no scheduler runs."""
    started = load_config(write(tmp_path, flows_enabled=False))
    actor = Recorder("listener")
    async with reloader(started, actor) as r:
        write(tmp_path, flows_enabled=True)
        assert await r.reload()
    [update] = actor.updates
    assert update.cfg.flows.enabled is False
    assert dict(update.flows) == {}
    assert status(started)["needs_restart"] == ["flows.enabled"]


async def test_flows_enabled_on_to_off_keeps_the_flows(tmp_path: Path, flows: Path) -> None:
    started = load_config(write(tmp_path))
    actor = Recorder(flows={"GhFlow": object()})
    async with reloader(started, actor) as r:
        write(tmp_path, flows_enabled=False)
        assert await r.reload()
    [update] = actor.updates
    assert update.cfg.flows.enabled is True
    assert list(update.flows) == ["GhFlow"]
    assert status(started)["needs_restart"] == ["flows.enabled"]
    assert status(started)["flows_removed"] == []


async def test_every_restart_key_keeps_its_running_value(tmp_path: Path) -> None:
    """The general rule: a key that needs a restart reaches no actor; live keys do."""
    started = load_config(write(tmp_path))
    new = load_config(write(tmp_path, extra="""
store: {max_pending: 5}
auth: {mode: token, token: t0k3n-value}
logging: {level: debug, format: console}
admin: {port: 1234}
"""))
    effective = effective_config(started, new)
    assert effective.store == started.store
    assert effective.admin == started.admin
    assert effective.auth.mode == "none" and effective.auth.token == "t0k3n-value"
    assert (effective.logging.level, effective.logging.format) == ("debug", None)
    assert effective.webhook_listener.port == started.webhook_listener.port


def certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


async def test_tls_turned_on_needs_a_restart(tmp_path: Path) -> None:
    started = load_config(write(tmp_path))
    cert, key = certificate(tmp_path, "site")
    actor = Recorder("listener")
    async with reloader(started, actor) as r:
        write(tmp_path, tls=f"tls: {{cert: {cert}, key: {key}}}")
        assert await r.reload()
    assert actor.updates[0].cfg.webhook_listener.tls is None  # the port stays plain HTTP
    assert status(started)["needs_restart"] == ["webhook_listener.tls"]


async def test_a_renewed_certificate_is_reported_as_a_change(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "site")
    tls = f"tls: {{cert: {cert}, key: {key}}}"
    started = load_config(write(tmp_path, tls=tls))
    async with reloader(started, Recorder("listener")) as r:
        assert await r.reload()
        assert status(started)["changed"] == []  # same files: nothing
        new_cert, new_key = certificate(tmp_path, "renewed")
        cert.write_bytes(new_cert.read_bytes())  # certbot renews in place
        key.write_bytes(new_key.read_bytes())
        assert await r.reload()
    assert status(started)["changed"] == ["webhook_listener.tls.cert",
                                          "webhook_listener.tls.key"]


async def test_a_missing_flows_dir_does_not_remove_every_flow(tmp_path: Path,
                                                              flows: Path) -> None:
    started = load_config(write(tmp_path))
    actor = Recorder(flows={"GhFlow": object()})
    async with reloader(started, actor) as r:
        write(tmp_path, flows_dir=str(tmp_path / "flows-typo"))
        assert not await r.reload()
        answer = status(started)
        assert "flows-typo does not exist: this reload would remove every flow (GhFlow)" \
            in answer["error"]
        assert actor.updates == []
        # An empty directory is how to remove them all: that reload goes through and says so.
        (tmp_path / "flows-typo").mkdir()
        assert await r.reload()
    assert status(started)["flows_removed"] == ["GhFlow"]
    assert dict(actor.updates[0].flows) == {}


async def test_apply_steps_log_as_their_actor(tmp_path: Path) -> None:
    started = load_config(write(tmp_path))
    listener, scheduler = Recorder("listener"), Recorder("scheduler")
    async with reloader(started, listener, scheduler) as r:
        assert await r.reload()
    assert [c.get("actor") for c in listener.contexts] == ["listener", "listener"]
    assert [c.get("actor") for c in scheduler.contexts] == ["scheduler", "scheduler"]


async def test_reload_json_names_the_config_and_no_secret(tmp_path: Path) -> None:
    secret = "s3cret-in-an-exception-42"
    register_secret(secret)
    config = write(tmp_path)
    started = load_config(config)
    async with reloader(started, Recorder(fail=RuntimeError(f"boom {secret}"))) as r:
        assert status(started) == {"generation": 0, "pid": status(started)["pid"],
                                   "config": str(config.resolve()), "ok": True, "error": None}
        assert not await r.reload()
    text = (Path(started.state_dir or "") / RELOAD_STATUS_FILE).read_text()
    assert secret not in text
    assert "[REDACTED]" in json.loads(text)["error"]
