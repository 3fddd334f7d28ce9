"""Deployment as written: the systemd unit (``systemd-analyze verify`` and ``security``), the
README's install steps, the container recipe, the Kubernetes example, and two instances on
one host running and stopping independently.

The systemd checks need ``systemd-analyze`` (Debian: ``apt-get install systemd``); they skip
without it, except under ``MFO_REQUIRE_SYSTEMD=1`` (set by ``.ci/run``), where a skip fails.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from mfo_actors import cli
from mfo_actors import config as config_module
from mfo_actors.commands.run import EXIT_CONFIG
from mfo_actors.config import load_config, load_config_text
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import open_store
from tests.helpers import running_daemon, wait_for, wait_http_ok
from tests.test_e2e_daemon import admin_url, instance_config, listener_url, mock_server

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "config" / "mfo-actors@.service"
README = (REPO / "README.md").read_text(encoding="utf-8")
VENV = "/opt/mfo-actors/venv"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
REQUIRE_SYSTEMD = os.environ.get("MFO_REQUIRE_SYSTEMD") == "1"


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None or not SYSTEMD_UNITS.is_dir():
        if REQUIRE_SYSTEMD:
            pytest.fail("MFO_REQUIRE_SYSTEMD=1 but systemd-analyze or "
                        f"{SYSTEMD_UNITS} is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return tool


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze --root``: the host's unit library, our unit, and the
    venv's console script at the path the unit names (verify checks it is executable)."""
    systemd_analyze()
    root = tmp_path / "root"
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    script = root / VENV.lstrip("/") / "bin" / "mfo-actors"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\nexec python3 -m mfo_actors \"$@\"\n")
    script.chmod(0o755)
    return root


class TestSystemdUnit:
    def test_verify_passes(self, unit_root: Path) -> None:
        result = subprocess.run(
            [systemd_analyze(), "verify", f"--root={unit_root}", "mfo-actors@crm.service"],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == ""

    def test_security_exposure_is_the_one_in_the_readme(self, unit_root: Path) -> None:
        result = subprocess.run(
            [systemd_analyze(), "security", "--offline=yes", f"--root={unit_root}",
             "--no-pager", "--threshold=20", "mfo-actors@crm.service"],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        found = re.search(r"Overall exposure level for mfo-actors@crm.service: "
                          r"(\d+\.\d) (\w+)", result.stdout)
        assert found, result.stdout
        score, verdict = float(found.group(1)), found.group(2)
        assert score <= 2.0 and verdict == "OK"
        assert f"exposure level {found.group(1)} {verdict}" in README

    def test_unit_runs_the_venv_and_has_what_the_issue_asks(self) -> None:
        settings = unit_settings()
        assert settings["Type"] == ["notify"]
        for key in ("ExecStart", "ExecReload"):
            [command] = settings[key]
            assert command.startswith(f"{VENV}/bin/mfo-actors ")
            assert command.endswith("--config /etc/mfo-actors/%i.yaml")
        assert settings["ExecReload"][0].split()[1] == "reload"
        # run validates itself; a failing ExecStartPre= would be retried by Restart=.
        assert "ExecStartPre" not in settings
        assert settings["StateDirectory"] == ["mfo-actors/%i"]
        assert settings["StateDirectoryMode"] == ["0700"]
        assert settings["WatchdogSec"]
        # A static user whose group reads the secret files a reload reads again; no
        # LoadCredential= (its copy is frozen while the service runs).
        assert settings["User"] == settings["Group"] == ["mfo-actors"]
        assert "DynamicUser" not in settings and "LoadCredential" not in settings
        assert settings["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
        for key, value in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                           ("PrivateTmp", "yes"), ("RemoveIPC", "yes"),
                           ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")]:
            assert settings[key] == [value]
        assert "@system-service" in settings["SystemCallFilter"]

    def test_the_readme_credential_drop_in_verifies(self, unit_root: Path) -> None:
        """The README's LoadCredentialEncrypted= drop-in, for a secret that may wait for a
        restart, is a valid addition to the unit."""
        section = README[README.index("Why not `LoadCredential=`"):]
        block = section[section.index("```ini\n") + 7:]
        drop_in = unit_root / "etc/systemd/system/mfo-actors@crm.service.d/credentials.conf"
        drop_in.parent.mkdir(parents=True)
        drop_in.write_text(block[:block.index("```")])
        result = subprocess.run(
            [systemd_analyze(), "verify", f"--root={unit_root}", "mfo-actors@crm.service"],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == ""


def readme_block(after: str) -> list[str]:
    """The command lines of the first ``sh`` block after the heading *after*."""
    section = README[README.index(after):]
    block = section[section.index("```sh\n") + 6:]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def install_command(words: list[str]) -> tuple[bool, list[str], dict[str, str]]:
    """``install`` arguments: (-d given, the paths, the -o/-g/-m options)."""
    directory, paths, options = False, [], {}
    rest = iter(words[1:])
    for word in rest:
        if word == "-d":
            directory = True
        elif word in ("-o", "-g", "-m"):
            options[word] = next(rest)
        else:
            paths.append(word)
    return directory, paths, options


class TestReadmeSteps:
    """The README's systemd steps, read as a script: every file lands in a directory an
    earlier step created, and everything the unit and the example config need is there,
    readable by the unit's user."""

    def test_install_steps_create_what_the_unit_needs(self) -> None:
        lines = readme_block("## Running under systemd")
        created = {"/etc/systemd/system"}  # systemd's own
        installed: dict[str, dict[str, str]] = {}
        groups: dict[str, str] = {}  # directory -> group
        users: set[str] = set()
        venv_made = False
        for line in lines:
            words = shlex.split(line.split("|")[-1])
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words[:3] == ["python3", "-m", "venv"]:
                created.add(words[3])
                venv_made = True
            elif words[:1] == ["useradd"]:
                assert "--system" in words and "--user-group" in words
                users.add(words[-1])
            elif words and words[0].endswith("/bin/pip"):
                assert words[0].startswith(VENV)
            elif words[:1] == ["install"]:
                directory, paths, options = install_command(words)
                if directory:
                    for path in paths:
                        assert str(Path(path).parent) in created | {"/etc"}, line
                        created.add(path)
                        groups[path] = options.get("-g", "root")
                    continue
                target = paths[-1].rstrip("/")
                if target in created:
                    target = f"{target}/{Path(paths[-2]).name}"
                assert str(Path(target).parent) in created, f"{line}: no such directory"
                installed[target] = options
        settings = unit_settings()
        [user] = settings["User"]
        assert venv_made and user in users, "the unit's user is created"
        # The example config's ${credential:mfo_password}, where the unit's daemon reads it:
        # the group of the unit's user can read it (and every directory on the way), and
        # nobody else can.
        secret = "/etc/mfo-actors/credentials/crm/mfo_password"
        assert installed[secret] == {"-o": "root", "-g": user, "-m": "0640"}
        for directory in ("/etc/mfo-actors/credentials", "/etc/mfo-actors/credentials/crm"):
            assert groups[directory] == user
        assert "/etc/mfo-actors/crm.yaml" in installed
        assert f"/etc/systemd/system/{UNIT.name}" in installed
        assert lines.index("sudo systemctl daemon-reload") < lines.index(
            "sudo systemctl enable --now mfo-actors@crm")

    def test_the_installed_example_runs_under_the_unit(self, tmp_path: Path) -> None:
        """config/example.yaml, as the README installs it, loads with the unit's environment:
        the instance named after the file, state in $STATE_DIRECTORY, and its password from
        credentials/crm/ beside it (no $CREDENTIALS_DIRECTORY: no LoadCredential=)."""
        etc = tmp_path / "etc-mfo"
        (etc / "credentials" / "crm").mkdir(parents=True)
        (etc / "credentials" / "crm" / "mfo_password").write_text("pw-of-crm")
        shutil.copy(REPO / "config" / "example.yaml", etc / "crm.yaml")
        cfg = load_config(etc / "crm.yaml",
                          environ={"STATE_DIRECTORY": "/var/lib/mfo-actors/crm"})
        assert cfg.instance == "crm"
        assert cfg.state_dir is None
        assert cfg.auth.password == "pw-of-crm"

    @pytest.mark.slow
    def test_rotating_the_password_as_the_readme_says(self, tmp_path: Path) -> None:
        """The README's rotation: replace credentials/crm/mfo_password, reload. The daemon runs
        with the unit's environment; the server only takes the new password."""
        etc = tmp_path / "etc-mfo"
        secret = etc / "credentials" / "crm" / "mfo_password"
        secret.parent.mkdir(parents=True)
        secret.write_text("old-password")
        with mock_server("--password", "new-password") as upstream:
            config = instance_config(
                tmp_path, upstream, instance="crm",
                auth={"mode": "login", "email": "demo@example.com",
                      "password": "${credential:mfo_password}",
                      "login_backoff": "100ms", "login_max_backoff": "200ms"})
            (etc / "crm.yaml").write_text(config.read_text())
            unit_env = {"STATE_DIRECTORY": str(tmp_path / "state"), "CREDENTIALS_DIRECTORY": ""}
            with running_daemon(etc / "crm.yaml", env=unit_env) as daemon:
                daemon.wait_event("daemon.ready")
                body = b'{"type": "user.signup"}'
                resp = httpx.post(f"{listener_url(config)}/hooks/s0", content=body,
                                  headers={"content-type": "application/json"}, timeout=10)
                assert resp.status_code == 202
                event_id = resp.json()["id"]
                wait_for(lambda: any(e.get("event") == "auth.login_rejected"
                                     for e in daemon.events()), what="the old password refused")
                assert event_id not in upstream.received_ids()

                secret.write_text("new-password")  # printf ... | install ... mfo_password
                result = subprocess.run(   # systemctl reload: ExecReload= in the unit's env
                    [sys.executable, "-m", "mfo_actors", "reload", "--config",
                     str(etc / "crm.yaml")], env={**os.environ, **unit_env},
                    capture_output=True, text=True, timeout=60, check=False)
                assert result.returncode == 0, result.stderr
                assert result.stdout.startswith("reloaded crm")
                assert "auth.password" in result.stdout  # names the key, never the value
                wait_for(lambda: event_id in upstream.received_ids(),
                         what="the event delivered with the new password")
                assert not any("new-password" in line for line in daemon.output())
                daemon.signal(signal.SIGTERM)
                assert daemon.wait_exit() == 0


class TestByHand:
    """An operator's commands on a host set up as the README says (no systemd variables)."""

    def test_events_list_finds_the_units_state_without_its_secrets(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        etc, var = tmp_path / "etc" / "mfo-actors", tmp_path / "var" / "lib" / "mfo-actors"
        etc.mkdir(parents=True)
        monkeypatch.setattr(config_module, "SYSTEMD_CONFIG_DIR", etc)
        monkeypatch.setattr(config_module, "SYSTEMD_STATE_ROOT", var)
        for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "UNIT_ONLY_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        # A secret only the unit's environment has: the store does not need it.
        text = (REPO / "config" / "example.yaml").read_text().replace(
            '"${credential:mfo_password}"', '"${env:UNIT_ONLY_TOKEN}"')
        (etc / "crm.yaml").write_text(text)
        cfg = load_config(etc / "crm.yaml", need_secrets=False)
        assert cfg.effective_state_dir == var / "crm"

        event_id = new_id()

        async def store_one() -> None:  # what the unit's daemon left there
            async with open_store(cfg) as store:
                await store.append(Event(id=event_id, source="webhook", type="user.signup",
                                         received_at=1.0, headers={}, body=b"{}"))

        (var / "crm").mkdir(parents=True)
        anyio.run(store_one)
        monkeypatch.chdir(tmp_path)  # not the state dir: ./var/crm would be empty
        assert cli.main(["events", "list", "--config", str(etc / "crm.yaml")]) == 0
        assert event_id in capsys.readouterr().out
        # Commands that log in still need the secret, and say so in one line.
        assert cli.main(["reload", "--config", str(etc / "crm.yaml")]) == 1
        assert "UNIT_ONLY_TOKEN is not set" in capsys.readouterr().err


class TestContainer:
    def instructions(self) -> list[tuple[str, str]]:
        text = (REPO / "Containerfile").read_text().replace("\\\n", " ")
        out = []
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                word, _, rest = line.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
        return out

    def test_containerfile_is_non_root_with_a_state_volume_and_a_healthcheck(self) -> None:
        steps = self.instructions()
        kinds = [k for k, _ in steps]
        known = {"FROM", "COPY", "RUN", "USER", "WORKDIR", "ENV", "VOLUME", "EXPOSE",
                 "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"}
        assert kinds[0] == "FROM" and set(kinds) <= known
        [user] = [v for k, v in steps if k == "USER"]
        assert user not in {"root", "0"}
        assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
        [volume] = [json.loads(v) for k, v in steps if k == "VOLUME"]
        assert volume == ["/var/lib/mfo-actors"]
        [health] = [v for k, v in steps if k == "HEALTHCHECK"]
        assert "/readyz" in health
        for source in [v.split()[0] for k, v in steps if k == "COPY"]:
            assert (REPO / source).exists(), source
        [cmd] = [json.loads(v) for k, v in steps if k == "CMD"]
        assert json.loads(dict(steps)["ENTRYPOINT"]) == ["mfo-actors"]
        assert cmd == ["run", "--config", "/etc/mfo-actors/instance.yaml"]

    def test_the_image_gets_what_the_package_links_to(self) -> None:
        """mfo_actors/demo/flows links to flows/: a build context without it ships a package
        with no example flows (and a demo that runs none)."""
        sources = [word for kind, rest in self.instructions() if kind == "COPY"
                   for word in rest.split()[:-1] if not word.startswith("--")]
        links = [p for p in (REPO / "mfo_actors").rglob("*") if p.is_symlink()]
        assert links, "the package's links to repository files"
        for link in links:
            target = str((link.parent / os.readlink(link)).resolve().relative_to(REPO))
            assert any(target == src or target.startswith(src.rstrip("/") + "/")
                       for src in sources), f"{link} -> {target} is not copied"

    def test_container_config_loads_and_listens_on_all_interfaces(self) -> None:
        cfg = load_config_text((REPO / "deploy" / "container.yaml").read_text(),
                               file="instance.yaml", environ={})
        assert cfg.webhook_listener.host == cfg.admin.host == "0.0.0.0"
        health = next(v for k, v in self.instructions() if k == "HEALTHCHECK")
        assert f":{cfg.admin.port}/readyz" in health
        assert cfg.state_dir is None  # STATE_DIRECTORY from the image, i.e. the volume


class TestKubernetes:
    def test_example_parses_and_probes_hit_the_admin_port(self, tmp_path: Path) -> None:
        docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()))
        by_kind = {d["kind"]: d for d in docs}
        assert set(by_kind) == {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment"}
        pod = by_kind["Deployment"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert pod["securityContext"]["runAsNonRoot"] is True

        # The ConfigMap's config loads with the Secret's values where the pod mounts them.
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        for key, value in by_kind["Secret"]["stringData"].items():
            (secrets / key).write_text(value)
        text = by_kind["ConfigMap"]["data"]["instance.yaml"].replace(
            "/etc/mfo-actors/secrets", str(secrets))
        cfg = load_config_text(text, file="instance.yaml",
                               environ={"MFO_EMAIL": "k8s-ops@example.com"})
        assert ports == {"webhooks": cfg.webhook_listener.port, "admin": cfg.admin.port}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert container["args"][-1] == f"{mounts['config']}/instance.yaml"
        assert "/etc/mfo-actors/secrets" == mounts["secrets"]
        assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_timeout


def signed(body: bytes, secret: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}


@pytest.mark.slow
def test_two_instances_on_one_host_run_deliver_and_stop_independently(tmp_path: Path) -> None:
    """crm and iot: own configs, ports, state dirs and credentials; one killed, the other
    keeps delivering; each stops on its own signal."""
    with mock_server("--no-auth") as upstream:
        daemons: dict[str, Any] = {}
        configs: dict[str, Path] = {}
        for name in ("crm", "iot"):
            creds = tmp_path / name / "credentials"
            creds.mkdir(parents=True)
            (creds / "webhook_secret").write_text(f"{name}-secret\n")
            configs[name] = instance_config(
                tmp_path / name, upstream, instance=name,
                webhook_listener={"routes": [{
                    "path": "/hooks/in", "source": name,
                    "verify": {"scheme": "github", "secret": "${credential:webhook_secret}"}}]},
            )
        with running_daemon(configs["crm"], env={
                "CREDENTIALS_DIRECTORY": str(tmp_path / "crm" / "credentials")}) as crm, \
                running_daemon(configs["iot"], env={
                "CREDENTIALS_DIRECTORY": str(tmp_path / "iot" / "credentials")}) as iot:
            daemons = {"crm": crm, "iot": iot}
            for daemon in daemons.values():
                daemon.wait_event("daemon.ready")

            def post(name: str, n: int, secret: str | None = None) -> httpx.Response:
                body = json.dumps({"n": n}).encode()
                return httpx.post(f"{listener_url(configs[name])}/hooks/in", content=body,
                                  headers=signed(body, secret or f"{name}-secret"), timeout=10)

            ids = {name: [post(name, n).json()["id"] for n in range(5)] for name in daemons}
            assert post("crm", 99, "iot-secret").status_code == 401  # its own credential only
            wait_for(lambda: set(ids["crm"] + ids["iot"]) <= upstream.received_ids(),
                     what="both instances' events upstream")
            for name in daemons:
                assert (tmp_path / name / "state" / "daemon.lock").exists()
                metrics = wait_http_ok(f"{admin_url(configs[name])}/metrics").decode()
                assert f'mfo_events_received_total{{instance="{name}",source="{name}"}} 5.0' \
                    in metrics

            crm.signal(signal.SIGKILL)
            crm.wait_exit()
            with pytest.raises(httpx.ConnectError):
                post("crm", 100)
            more = [post("iot", n).json()["id"] for n in range(5, 10)]
            wait_for(lambda: set(more) <= upstream.received_ids(), what="iot alone delivering")

            iot.signal(signal.SIGTERM)
            assert iot.wait_exit() == 0
            assert {e["instance"] for e in iot.events() if "instance" in e} == {"iot"}
