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
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mfo_actors.config import load_config_text
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
        for key in ("ExecStart", "ExecStartPre", "ExecReload"):
            [command] = settings[key]
            assert command.startswith(f"{VENV}/bin/mfo-actors ")
            assert command.endswith("--config /etc/mfo-actors/%i.yaml")
        assert settings["ExecReload"][0].split()[1] == "reload"
        assert settings["StateDirectory"] == ["mfo-actors/%i"]
        assert settings["WatchdogSec"] and settings["LoadCredential"]
        for key, value in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                           ("PrivateTmp", "yes"), ("DynamicUser", "yes"),
                           ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")]:
            assert settings[key] == [value]
        assert "@system-service" in settings["SystemCallFilter"]


def readme_block(after: str) -> list[str]:
    """The command lines of the first ``sh`` block after the heading *after*."""
    section = README[README.index(after):]
    block = section[section.index("```sh\n") + 6:]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


class TestReadmeSteps:
    """The README's systemd steps, read as a script: every file lands in a directory an
    earlier step created, and everything the unit needs is installed."""

    def test_install_steps_create_what_the_unit_needs(self) -> None:
        lines = readme_block("## Running under systemd")
        created = {"/etc/systemd/system"}  # systemd's own
        installed: set[str] = set()
        venv_made = False
        for line in lines:
            words = shlex.split(line.split("|")[-1])
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words[:3] == ["python3", "-m", "venv"]:
                created.add(words[3])
                venv_made = True
            elif words and words[0].endswith("/bin/pip"):
                assert words[0].startswith(VENV)
            elif words[:1] == ["install"] and "-d" in words:
                for directory in words[words.index("-d") + 1:]:
                    if not directory.startswith("-") and directory not in {"0755", "0700"}:
                        assert str(Path(directory).parent) in created | {"/etc"}, line
                        created.add(directory)
            elif words[:1] == ["install"]:
                target = words[-1].rstrip("/")
                if target in created:
                    target = f"{target}/{Path(words[-2]).name}"
                assert str(Path(target).parent) in created, f"{line}: no such directory"
                installed.add(target)
        assert venv_made
        credential = unit_settings()["LoadCredential"][0].split(":", 1)[1]
        assert credential.replace("%i", "crm") in installed
        assert "/etc/mfo-actors/crm.yaml" in installed
        assert f"/etc/systemd/system/{UNIT.name}" in installed
        assert lines.index("sudo systemctl daemon-reload") < lines.index(
            "sudo systemctl enable --now mfo-actors@crm")

    def test_the_installed_example_runs_under_the_unit(self, tmp_path: Path) -> None:
        """config/example.yaml, as the README installs it, loads with systemd's environment:
        the instance named after the file, state in $STATE_DIRECTORY."""
        text = (REPO / "config" / "example.yaml").read_text()
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mfo_password").write_text("pw")
        cfg = load_config_text(text, file="/etc/mfo-actors/crm.yaml", environ={
            "CREDENTIALS_DIRECTORY": str(creds), "STATE_DIRECTORY": "/var/lib/mfo-actors/crm"})
        assert cfg.instance == "crm"
        assert cfg.state_dir is None


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
