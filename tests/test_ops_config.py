"""Operator-facing config and metrics: ``MFO_<SECTION>__<KEY>`` overrides, ``check --print``,
and ``/metrics`` without ``_created`` series."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mfo_actors import cli
from mfo_actors.config import apply_env_overrides, load_config_text
from mfo_actors.errors import ConfigError
from mfo_actors.metrics import EVENTS_RECEIVED, render_metrics
from mfo_actors.observability import redact

BASE = """
instance: envtest
auth: {mode: login, email: a@b.c, password: "${env:PW}"}
webhook_listener:
  port: 8080
  routes:
    - {path: /hooks/gh, source: github, verify: {scheme: github, secret: file-secret}}
"""


class TestEnvOverrides:
    def test_overrides_reach_nested_keys_list_items_and_are_typed(self) -> None:
        env = {
            "PW": "pw-from-env",
            "MFO_CLIENT__RETRY__MAX_ATTEMPTS": "3",
            "MFO_WEBHOOK_LISTENER__PORT": ":9443",
            "MFO_WEBHOOK_LISTENER__ROUTES__0__VERIFY__SECRET": "${env:PW}",
            "MFO_WEBHOOK_LISTENER__CLIENT_RATE_LIMIT": "{requests_per_second: 5, burst: 10}",
            "MFO_LOGGING__LEVEL": "debug",
            "MFO_EMAIL": "not an override (no __)",
        }
        cfg = load_config_text(BASE, file="envtest.yaml", environ=env)
        assert cfg.client.retry.max_attempts == 3
        assert cfg.webhook_listener.port == 9443
        route = cfg.webhook_listener.routes[0]
        assert route.verify is not None and route.verify.secret == "pw-from-env"
        limit = cfg.webhook_listener.client_rate_limit
        assert limit is not None and (limit.requests_per_second, limit.burst) == (5, 10)
        assert cfg.logging.level == "debug"

    @pytest.mark.parametrize(("name", "value", "expected"), [
        ("MFO_CLIENT__TIMOUT", "1s",
         "environment MFO_CLIENT__TIMOUT: client.timout: unknown key"),
        ("MFO_CLIENT__TIMEOUT", "soon",
         "environment MFO_CLIENT__TIMEOUT: client.timeout: invalid duration 'soon'"),
        ("MFO_CLIENT__RETRY__MAX_ATTEMPTS", "0",
         "environment MFO_CLIENT__RETRY__MAX_ATTEMPTS: client.retry.max_attempts: must be at"),
        ("MFO_WEBHOOK_LISTENER__ROUTES__5__SOURCE", "x",
         "environment MFO_WEBHOOK_LISTENER__ROUTES__5__SOURCE: webhook_listener.routes[5]"),
        ("MFO_INSTANCE__NAME", "x", "environment MFO_INSTANCE__NAME: instance.name: instance is"),
    ])
    def test_a_bad_override_names_the_variable(self, name: str, value: str,
                                               expected: str) -> None:
        with pytest.raises(ConfigError) as info:
            load_config_text(BASE, file="envtest.yaml", environ={"PW": "x", name: value})
        assert str(info.value).startswith(expected)

    def test_the_file_line_is_still_named_for_file_errors(self) -> None:
        with pytest.raises(ConfigError, match=r"^envtest.yaml:3: auth.password: environment"):
            load_config_text(BASE, file="envtest.yaml", environ={})

    @pytest.mark.parametrize("value", [
        "12345678", "0123", "2024-01-01", "yes", "s3cr: et", "#hunter2", "null", "3.5",
        "- a", "'quoted'",
    ])
    def test_text_values_are_taken_as_written(self, value: str) -> None:
        """A password (or any text key) that looks like YAML is not turned into a number,
        a date, a boolean, a mapping or nothing."""
        cfg = load_config_text(BASE, file="envtest.yaml",
                               environ={"PW": "x", "MFO_AUTH__PASSWORD": value})
        assert cfg.auth.password == value

    def test_typed_values_and_flow_collections_are_still_read_as_yaml(self) -> None:
        cfg = load_config_text(BASE, file="envtest.yaml", environ={
            "PW": "x", "MFO_FORWARDER__ENABLED": "false", "MFO_FLOWS__CONCURRENCY": "7",
            "MFO_CLIENT__RETRY__BACKOFF_MULTIPLIER": "1.5", "MFO_CLIENT__TIMEOUT": "5s",
            "MFO_WEBHOOK_LISTENER__ROUTES__0__RATE_LIMIT": "{requests_per_second: 2}",
            "MFO_CLIENT__CACHE": "{ttl: 10s}", "MFO_LOGGING__FORMAT": "console"})
        assert cfg.forwarder.enabled is False and cfg.flows.concurrency == 7
        assert cfg.client.retry.backoff_multiplier == 1.5 and cfg.client.timeout == 5
        limit = cfg.webhook_listener.routes[0].rate_limit
        assert limit is not None and limit.requests_per_second == 2
        assert cfg.client.cache is not None and cfg.client.cache.ttl == 10
        assert cfg.logging.format == "console"

    def test_top_level_keys_after_a_double_underscore(self, tmp_path: Path) -> None:
        cfg = load_config_text(BASE, file="envtest.yaml", environ={
            "PW": "x", "MFO__SHUTDOWN_TIMEOUT": "5", "MFO__STATE_DIR": str(tmp_path),
            "MFO__ASYNC_BACKEND": "trio", "MFO__UVLOOP": "false", "MFO__INSTANCE": "other"})
        assert cfg.shutdown_timeout == 5 and cfg.state_dir == str(tmp_path)
        assert (cfg.async_backend, cfg.uvloop, cfg.instance) == ("trio", False, "other")

    def test_an_unknown_section_is_the_variables_problem(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_config_text(BASE, file="envtest.yaml", environ={"PW": "x", "MFO_NOPE__X": "1"})
        assert str(info.value) == "environment MFO_NOPE__X: nope: unknown key"

    def test_a_file_error_in_a_section_an_override_touches_stays_the_files(self) -> None:
        text = BASE + "client: {timeout: soon}\n"
        with pytest.raises(ConfigError) as info:
            load_config_text(text, file="envtest.yaml",
                             environ={"PW": "x", "MFO_CLIENT__RETRY__MAX_ATTEMPTS": "3"})
        assert str(info.value).startswith("envtest.yaml:8: client.timeout: invalid duration")

    def test_apply_reports_what_each_variable_set(self) -> None:
        data: dict[str, object] = {"client": {"timeout": "1s"}}
        applied = apply_env_overrides(data, {"MFO_CLIENT__TIMEOUT": "2s", "OTHER": "1"})
        assert applied == {("client", "timeout"): "MFO_CLIENT__TIMEOUT"}
        assert data == {"client": {"timeout": "2s"}}


class TestCheckPrint:
    def test_prints_the_effective_config_with_secrets_masked(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        path = tmp_path / "crm.yaml"
        path.write_text(BASE.replace("envtest", "crm")
                        + f"state_dir: {tmp_path}/state\nflows: {{dir: {tmp_path}/flows}}\n")
        monkeypatch.setenv("PW", "hunter2-password")
        monkeypatch.setenv("MFO_AUTH__TOKEN", "tok-from-env-123")
        monkeypatch.setenv("MFO_CLIENT__BASE_URL", "https://mfo.example")
        assert cli.main(["check", "--config", str(path), "--print"]) == 0
        out = capsys.readouterr().out
        assert "base_url: https://mfo.example" in out
        assert "max_attempts: 8" in out  # defaults are shown too
        for secret in ("hunter2-password", "tok-from-env-123", "file-secret"):
            assert secret not in out
        assert out.count("[REDACTED]") == 3

    @pytest.mark.parametrize(("dsn", "shown"), [
        ("postgresql://mfo:hunter2secret@127.0.0.1:1/test",
         "postgresql://mfo:[REDACTED]@127.0.0.1:1/test"),
        ("postgresql://mfo@127.0.0.1:1/test?password=hunter2secret&sslmode=require",
         "postgresql://mfo@127.0.0.1:1/test?password=[REDACTED]&sslmode=require"),
        ("host=127.0.0.1 port=1 dbname=test user=mfo password=hunter2secret",
         "host=127.0.0.1 port=1 dbname=test user=mfo password=[REDACTED]"),
        ("postgresql://mfo@127.0.0.1:1/test", "postgresql://mfo@127.0.0.1:1/test"),
    ])
    def test_the_password_inside_a_dsn_is_masked(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, dsn: str, shown: str,
    ) -> None:
        """The container override MFO_STORE__DSN is neither a ${...} reference nor a key
        named like a credential: check --print used to show it whole."""
        path = tmp_path / "pg.yaml"
        (tmp_path / "flows").mkdir()
        path.write_text(f"state_dir: {tmp_path}/state\nflows: {{dir: {tmp_path}/flows}}\n")
        monkeypatch.setenv("MFO_STORE__BACKEND", "postgres")
        monkeypatch.setenv("MFO_STORE__DSN", dsn)
        assert cli.main(["check", "--config", str(path), "--print"]) == 0
        out = capsys.readouterr().out
        assert "hunter2secret" not in out
        assert yaml.safe_load(out.split("\n", 1)[1])["store"]["dsn"] == shown
        assert "hunter2secret" not in str(redact(f"connecting with {dsn}"))


class TestMetrics:
    def test_no_created_series(self) -> None:
        EVENTS_RECEIVED.labels("m", "src").inc()
        text = render_metrics().decode()
        assert 'mfo_events_received_total{instance="m",source="src"}' in text
        assert not re.search(r"^\w+_created[{ ]", text, re.MULTILINE)


def test_reload_sorts_changed_keys_into_live_and_needs_restart() -> None:
    from mfo_actors.daemon._reload import is_live, restart_keys_changed

    old = load_config_text(BASE, environ={"PW": "x"})
    new = load_config_text(BASE.replace("8080", "8081").replace("file-secret", "rotated")
                           + "store: {max_pending: 5}\nlogging: {level: debug}\n",
                           environ={"PW": "x"})
    assert restart_keys_changed(old, new) == ["store.max_pending", "webhook_listener.port"]
    assert is_live("webhook_listener.routes") and is_live("logging.level")
    assert not is_live("client.cache") and not is_live("auth.mode")
