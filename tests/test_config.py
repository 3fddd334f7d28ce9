"""The instance config loader: types, units, secret references, and errors that point home."""

from __future__ import annotations

from pathlib import Path

import pytest

from mfo_actors.config import (
    InstanceConfig,
    check_config_text,
    load_config,
    load_config_text,
    parse_duration,
    parse_size,
)
from mfo_actors.errors import ConfigError, UserError
from mfo_actors.observability import redact

REPO = Path(__file__).resolve().parent.parent
SEED_CONFIG = REPO / "config" / "seed-client.yaml"
EXAMPLE_CONFIG = REPO / "config" / "example.yaml"


def load_error(text: str, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, file="inst.yaml", **kwargs)  # type: ignore[arg-type]
    return info.value


class TestEveryProblem:
    """``check`` must list every problem of a file, one each, in file order."""

    THREE = (
        "instance: a\n"
        "client:\n"
        "  timeout: soon\n"                    # 3: bad duration
        "  retry: {max_attempts: 0}\n"         # 4: semantic (must be at least 1)
        "forwarder:\n"
        "  concurency: 8\n"                    # 6: unknown key
    )

    def test_three_distinct_errors_are_three_problems(self) -> None:
        cfg, problems = check_config_text(self.THREE, file="inst.yaml")
        assert [str(p) for p in problems] == [
            "inst.yaml:3: client.timeout: invalid duration 'soon' (use e.g. 500ms, 30s, 1m, 1h)",
            "inst.yaml:4: client.retry.max_attempts: must be at least 1",
            "inst.yaml:6: forwarder.concurency: unknown key",
        ]
        assert cfg is not None and cfg.client.timeout == 30.0  # the bad key's default

    def test_loading_names_the_first_and_counts_the_rest(self) -> None:
        err = load_error(self.THREE)
        assert (err.key, err.line) == ("client.timeout", 3)
        assert str(err).endswith("(and 2 more problems: mfo-actors check --config lists them)")

    def test_several_problems_in_one_list_item_and_across_items(self) -> None:
        text = (
            "webhook_listener:\n"
            "  routes:\n"
            "    - {path: /a, source: a, verify: {scheme: nope, secret: s}, bogus: 1}\n"
            "    - {path: b, source: b}\n"
            "admin: {port: 99999}\n"
        )
        _cfg, problems = check_config_text(text, file="f.yaml")
        keys = [p.key for p in problems]
        assert keys == ["webhook_listener.routes[0].verify.scheme",
                        "webhook_listener.routes[0].bogus",
                        "webhook_listener.routes[1].path", "admin.port"], problems

    def test_a_removed_key_causes_no_derived_complaint(self) -> None:
        """auth.password failing to resolve is one problem, not also 'login needs a password'."""
        _cfg, problems = check_config_text(
            "auth: {mode: login, email: a@b.c, password: '${env:NOPE_PW}'}\n", environ={})
        assert [p.key for p in problems] == ["auth.password"]

    def test_every_duplicate_key(self) -> None:
        _cfg, problems = check_config_text("a: 1\na: 2\nadmin: {port: 1, port: 2}\n")
        assert [(p.key, p.message) for p in problems if p.message == "duplicate key"] == [
            ("a", "duplicate key"), ("admin.port", "duplicate key")]

    def test_invalid_yaml_is_one_problem(self) -> None:
        cfg, problems = check_config_text("a: [1\n", file="x.yaml")
        assert cfg is None and len(problems) == 1 and "invalid YAML" in str(problems[0])


class TestErrors:
    def test_unknown_key_names_path_and_line(self) -> None:
        """A typo in a nested key names the dotted path and the line it is on."""
        err = load_error("client:\n  base_url: http://x\n  retry:\n    max_atempts: 3\n")
        assert (err.file, err.key, err.line) == ("inst.yaml", "client.retry.max_atempts", 4)
        assert str(err) == "inst.yaml:4: client.retry.max_atempts: unknown key"

    def test_unknown_top_level_key(self) -> None:
        err = load_error("instance: a\nbogus: 1\n")
        assert (err.key, err.line) == ("bogus", 2)

    def test_wrong_type_names_path_and_line(self) -> None:
        err = load_error("instance: a\nforwarder:\n  concurrency: many\n")
        assert (err.key, err.line) == ("forwarder.concurrency", 3)
        assert "Expected `int`" in err.message

    def test_wrong_type_in_a_list_item(self) -> None:
        err = load_error(
            "webhook_listener:\n  routes:\n    - {path: /a, source: a}\n"
            "    - {path: /b, source: [1]}\n"
        )
        assert (err.key, err.line) == ("webhook_listener.routes[1].source", 4)

    def test_bad_duration_names_path_and_line(self) -> None:
        err = load_error("client:\n  timeout: 30 seconds\n")
        assert (err.key, err.line) == ("client.timeout", 2)
        assert "invalid duration" in err.message

    def test_missing_secret_env_var_names_path_and_line(self) -> None:
        err = load_error(
            "auth:\n  mode: login\n  email: a@b.c\n  password: ${env:NOPE_PW}\n", environ={}
        )
        assert (err.key, err.line) == ("auth.password", 4)
        assert "NOPE_PW" in err.message

    def test_bad_yaml_names_the_line(self) -> None:
        err = load_error("instance: a\nclient: {base_url: x\nadmin: 1\n")
        assert err.file == "inst.yaml"
        assert err.line is not None and err.line >= 2
        assert "invalid YAML" in err.message

    def test_duplicate_key_is_an_error(self) -> None:
        """PyYAML keeps the last of two equal keys silently; we refuse the file."""
        err = load_error("admin:\n  port: 1\n  port: 2\n")
        assert (err.key, err.line) == ("admin.port", 3)

    def test_not_a_mapping(self) -> None:
        assert "mapping" in load_error("- a\n- b\n").message

    def test_semantic_error_login_without_password(self) -> None:
        err = load_error("auth:\n  mode: login\n  email: a@b.c\n")
        assert err.key == "auth.password"

    def test_redis_backend_is_refused_at_load(self) -> None:
        err = load_error("store: {backend: redis, url: redis://x}\n")
        assert (err.key, err.line) == ("store.backend", 1)
        assert "redis" in err.message

    def test_postgres_needs_a_dsn(self) -> None:
        err = load_error("store: {backend: postgres}\n")
        assert (err.key, err.line) == ("store.dsn", 1)
        assert load_config_text(
            "async_backend: trio\nstore: {backend: postgres, dsn: 'postgresql://h/db'}\n"
        ).store.schema == "mfo"

    def test_postgres_schema_must_be_a_plain_name(self) -> None:
        err = load_error("store: {backend: postgres, dsn: x, schema: 'a; DROP'}\n")
        assert err.key == "store.schema"

    def test_unknown_flows_timezone_is_refused_at_load(self) -> None:
        """Otherwise the scheduler crashes (and restarts forever) at its first cron tick."""
        err = load_error("flows:\n  timezone: Mars/Olympus_Mons\n")
        assert (err.key, err.line) == ("flows.timezone", 2)
        assert "Mars/Olympus_Mons" in err.message
        assert load_config_text("flows: {timezone: Europe/Paris}\n").flows.timezone == (
            "Europe/Paris")

    def test_deeply_nested_yaml_is_a_config_error(self) -> None:
        """Not a RecursionError traceback out of the YAML parser."""
        err = load_error("instance: a\nclient: " + "[" * 5000 + "]" * 5000 + "\n")
        assert "nested too deeply" in err.message and err.file == "inst.yaml"

    def test_unreadable_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "missing.yaml")
        assert str(tmp_path / "missing.yaml") in str(info.value)

    def test_config_error_is_a_user_error(self) -> None:
        assert isinstance(load_error("bogus: 1\n"), UserError)


class TestValues:
    def test_defaults(self) -> None:
        cfg = load_config_text("{}")
        assert cfg == InstanceConfig(source_file="<config>")
        assert cfg.webhook_listener.port == 8080
        assert cfg.client.effective_auth_base_url == "http://127.0.0.1:9000/auth"

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("500ms", 0.5), ("30s", 30), ("1m", 60), ("1h", 3600), ("1m30s", 90), (2, 2.0)],
    )
    def test_durations(self, text: object, seconds: float) -> None:
        assert parse_duration(text) == pytest.approx(seconds)

    def test_store_timeouts(self) -> None:
        """store.lock_timeout / statement_timeout: 0 (none) or 10ms..1h, statement >= lock."""
        cfg = load_config_text("store: {lock_timeout: 500ms, statement_timeout: 0}\n")
        assert (cfg.store.lock_timeout, cfg.store.statement_timeout) == (0.5, 0)
        for text, key in [("{lock_timeout: 1ms}", "store.lock_timeout"),
                          ("{statement_timeout: 2h}", "store.statement_timeout"),
                          ("{lock_timeout: 10s, statement_timeout: 5s}",
                           "store.statement_timeout")]:
            _cfg, problems = check_config_text(f"store: {text}\n")
            assert [p.key for p in problems] == [key], text

    @pytest.mark.parametrize("text", ["30 seconds", "-1", "1x", "", True, -3])
    def test_bad_durations(self, text: object) -> None:
        with pytest.raises(ValueError):
            parse_duration(text)

    @pytest.mark.parametrize(
        ("text", "size"), [("1MiB", 1024**2), ("512KiB", 512 * 1024), ("10MB", 10**7), (7, 7)]
    )
    def test_sizes(self, text: object, size: int) -> None:
        assert parse_size(text) == size

    def test_size_in_config(self) -> None:
        cfg = load_config_text("webhook_listener: {max_body_size: 512KiB}\n")
        assert cfg.webhook_listener.max_body_size == 512 * 1024

    @pytest.mark.parametrize("port", ['":8080"', "8080", '"8080"'])
    def test_go_style_port(self, port: str) -> None:
        cfg = load_config_text(f"webhook_listener:\n  port: {port}\n")
        assert cfg.webhook_listener.port == 8080

    def test_port_out_of_range(self) -> None:
        err = load_error('webhook_listener:\n  port: ":70000"\n')
        assert (err.key, err.line) == ("webhook_listener.port", 2)

    def test_instance_defaults_to_file_stem(self, tmp_path: Path) -> None:
        path = tmp_path / "crm.yaml"
        path.write_text("client: {base_url: http://127.0.0.1:1}\n")
        cfg = load_config(path)
        assert cfg.instance == "crm"
        assert cfg.effective_state_dir == Path("var/crm")

    def test_state_dir_from_systemd(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/mfo-actors/crm:/other")
        assert load_config_text("instance: crm\n").effective_state_dir == Path(
            "/var/lib/mfo-actors/crm"
        )

    def test_single_path_becomes_a_route(self) -> None:
        cfg = load_config_text("webhook_listener: {path: /hook, source: gh}\n")
        [route] = cfg.webhook_listener.effective_routes()
        assert (route.path, route.source) == ("/hook", "gh")


class TestSecrets:
    def test_env_reference(self) -> None:
        cfg = load_config_text(
            "auth: {mode: token, token: '${env:T_TOKEN}'}\n", environ={"T_TOKEN": "tok-env-123"}
        )
        assert cfg.auth.token == "tok-env-123"

    def test_file_reference_relative_to_config(self, tmp_path: Path) -> None:
        (tmp_path / "pw.txt").write_text("file-secret-456\n")
        path = tmp_path / "inst.yaml"
        path.write_text("auth: {mode: login, email: a@b.c, password: '${file:pw.txt}'}\n")
        assert load_config(path).auth.password == "file-secret-456"

    def test_credential_reference(self, tmp_path: Path) -> None:
        (tmp_path / "mfo_password").write_text("cred-secret-789")
        cfg = load_config_text(
            "auth: {mode: login, email: a@b.c, password: '${credential:mfo_password}'}\n",
            environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
        )
        assert cfg.auth.password == "cred-secret-789"

    def test_credential_without_credentials_directory(self) -> None:
        err = load_error("auth: {mode: token, token: '${credential:x}'}\n", environ={})
        assert err.key == "auth.token"
        assert "CREDENTIALS_DIRECTORY" in err.message and "credentials/x" in err.message

    def test_credential_beside_the_config_without_systemd(self, tmp_path: Path) -> None:
        """No $CREDENTIALS_DIRECTORY: credentials/NAME next to the config file is read."""
        (tmp_path / "credentials").mkdir()
        (tmp_path / "credentials" / "pw").write_text("local-secret-456\n")
        path = tmp_path / "inst.yaml"
        path.write_text("auth: {mode: login, email: a@b.c, password: '${credential:pw}'}\n")
        assert load_config(path, environ={}).auth.password == "local-secret-456"
        elsewhere = tmp_path / "systemd"
        elsewhere.mkdir()
        (elsewhere / "pw").write_text("from-systemd")
        cfg = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(elsewhere)})
        assert cfg.auth.password == "from-systemd"  # systemd's directory wins

    def test_credential_of_the_instance_comes_first_and_is_read_again(
        self, tmp_path: Path
    ) -> None:
        """The systemd layout: /etc/mfo-actors/credentials/<instance>/NAME beside crm.yaml,
        read at every load (a reload rotates it); LoadCredential='s copy wins when there."""
        for directory, value in ((tmp_path / "credentials", "shared"),
                                 (tmp_path / "credentials" / "crm", "crm-one")):
            directory.mkdir(exist_ok=True)
            (directory / "pw").write_text(value)
        path = tmp_path / "crm.yaml"
        path.write_text("auth: {mode: login, email: a@b.c, password: '${credential:pw}'}\n")
        assert load_config(path, environ={}).auth.password == "crm-one"
        (tmp_path / "credentials" / "crm" / "pw").write_text("crm-two")  # rotated
        assert load_config(path, environ={}).auth.password == "crm-two"
        other = tmp_path / "iot.yaml"  # another instance: its own dir, else the shared file
        other.write_text(path.read_text())
        assert load_config(other, environ={}).auth.password == "shared"
        frozen = tmp_path / "systemd"
        frozen.mkdir()
        (frozen / "pw").write_text("loaded-at-start")
        assert load_config(path, environ={"CREDENTIALS_DIRECTORY": str(frozen)}
                           ).auth.password == "loaded-at-start"
        # A credential systemd did not load is looked for in the files.
        cfg = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})
        assert cfg.auth.password == "crm-two"

    def test_a_tls_file_that_cannot_be_read_is_named(self, tmp_path: Path) -> None:
        (tmp_path / "site.pem").write_text("not read before the key")
        err = load_error(f"webhook_listener: {{tls: {{cert: {tmp_path}/site.pem, "
                         f"key: {tmp_path}/site.key}}}}\n")
        assert err.key == "webhook_listener.tls"
        assert f"cannot read the key {tmp_path}/site.key: No such file" in err.message

    def test_missing_secret_file(self, tmp_path: Path) -> None:
        path = tmp_path / "inst.yaml"
        path.write_text("auth:\n  mode: token\n  token: '${file:nope.txt}'\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert (info.value.key, info.value.line) == ("auth.token", 3)

    def test_reference_inside_a_longer_string(self) -> None:
        cfg = load_config_text(
            "client: {base_url: 'http://${env:H_HOST}:9000'}\n", environ={"H_HOST": "mfo.local"}
        )
        assert cfg.client.base_url == "http://mfo.local:9000"

    def test_resolved_secrets_are_registered_for_redaction(self) -> None:
        load_config_text(
            "auth: {mode: token, token: '${env:R_TOKEN}'}\n", environ={"R_TOKEN": "zz-sekrit-42"}
        )
        assert redact("token was zz-sekrit-42") == "token was [REDACTED]"


class TestShippedConfigs:
    def test_example_config_loads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(REPO)
        cfg = load_config(EXAMPLE_CONFIG)
        assert cfg.instance == "example"
        # As shipped it logs in to `mfo-actors mock-server` with the mock's documented password.
        assert (cfg.auth.mode, cfg.auth.email, cfg.auth.password) == (
            "login", "demo@example.com", "demo")
        assert cfg.flows.dir == "./flows"

    def test_seed_config_loads_unchanged(self) -> None:
        """The seed's example, printed flush left, loads with its intended nesting."""
        cfg = load_config(SEED_CONFIG)
        assert cfg.client.base_url == "https://api.example.com"
        assert cfg.client.auth_base_url == "https://auth.example.com"
        assert cfg.client.timeout == 30.0
        assert cfg.client.retry.max_attempts == 3
        assert cfg.client.retry.initial_backoff == 1.0
        assert cfg.client.retry.max_backoff == 60.0
        assert cfg.client.retry.backoff_multiplier == 2.0
        assert cfg.client.circuit_breaker.failure_threshold == 5
        assert cfg.client.circuit_breaker.reset_timeout == 60.0
        assert cfg.webhook_listener.path == "/webhook"
        assert cfg.webhook_listener.port == 8080

    def test_seed_config_indented_loads_the_same(self) -> None:
        """Indenting the seed's example as intended gives the same config."""
        indented = """\
client:
  base_url: "https://api.example.com"
  auth_base_url: "https://auth.example.com"
  timeout: "30s"
  retry:
    max_attempts: 3
    initial_backoff: "1s"
    max_backoff: "1m"
    backoff_multiplier: 2.0
  circuit_breaker:
    failure_threshold: 5
    reset_timeout: "1m"
webhook_listener:
  path: "/webhook"
  port: ":8080"
"""
        flat = load_config(SEED_CONFIG)
        nested = load_config_text(indented, file=str(SEED_CONFIG))
        assert nested == flat

    def test_seed_file_is_the_seed_text(self) -> None:
        """config/seed-client.yaml is the seed's block, line for line, when the seed is here."""
        seed = REPO.parent / "shared" / "seeds" / "000_bb4ba199f8c94c12.txt"
        if not seed.exists():
            pytest.skip("seed documents are not next to this checkout")
        text = seed.read_text(encoding="utf-8")
        start = text.index("# Exemple de configuration client")
        block = text[start:].split("Tableau des Configurations")[0]
        assert SEED_CONFIG.read_text(encoding="utf-8") == block

    def test_flat_form_still_reports_unknown_keys(self) -> None:
        """Re-nesting never hides a typo: a key valid nowhere is still an error on its line."""
        err = load_error("client:\nbase_url: http://x\nmax_atempts: 3\n")
        assert (err.key, err.line) == ("max_atempts", 3)

    def test_null_optional_section_stays_null(self) -> None:
        cfg = load_config_text("client:\n  rate_limit:\n  timeout: 5s\n")
        assert cfg.client.rate_limit is None
        assert cfg.client.timeout == 5.0


@pytest.mark.parametrize("name", ["base_url", "auth_base_url"])
def test_credentials_in_an_upstream_url_are_refused_without_repeating_them(name: str) -> None:
    _cfg, problems = check_config_text(
        f"client: {{{name}: 'https://bob:hunter22@mfo.example'}}\n", file="inst.yaml")
    assert [p.key for p in problems] == [f"client.{name}"]
    assert "user:password@" in problems[0].message and "auth" in problems[0].message
    assert "hunter22" not in str(problems[0])


@pytest.mark.parametrize(("url", "says"), [
    ("https://[[api.example.com", "Invalid IPv6 URL"),  # found by the config fuzzer
    ("http://127.0.0.1:90x0", "Port"),
])
def test_an_upstream_url_that_cannot_be_parsed_is_a_config_error(url: str, says: str) -> None:
    _cfg, problems = check_config_text(f"client: {{base_url: '{url}'}}\n", file="inst.yaml")
    assert [p.key for p in problems] == ["client.base_url"]
    assert "not a valid URL" in problems[0].message and says in problems[0].message


class TestOrderingKeys:
    """``forwarder.ordering: key`` and ``ordering_key`` (routes, forwarder default)."""

    ROUTES = (
        "webhook_listener:\n"
        "  routes:\n"
        "    - {path: /a, source: a, ordering_key: 'json:/user/id'}\n"
        "    - {path: /b, source: b, ordering_key: 'header:X-Tenant'}\n"
        "    - {path: /c, source: c}\n"
    )

    def test_keys_load_per_route_and_as_default(self) -> None:
        cfg = load_config_text(
            self.ROUTES + "forwarder: {ordering: key, ordering_key: 'json:/account'}\n")
        assert cfg.forwarder.ordering == "key"
        assert cfg.forwarder.ordering_key == "json:/account"
        assert [r.ordering_key for r in cfg.webhook_listener.routes] == [
            "json:/user/id", "header:X-Tenant", None]

    @pytest.mark.parametrize("spec", ["user/id", "json:user/id", "json:", "header:",
                                      "header:bad name", "json:/a~2b", "body:/x"])
    def test_bad_syntax_names_the_route(self, spec: str) -> None:
        text = ("forwarder: {ordering: key}\nwebhook_listener:\n  routes:\n"
                "    - {path: /ok, source: ok}\n"
                f"    - {{path: /hooks/x, source: x, ordering_key: '{spec}'}}\n")
        _cfg, problems = check_config_text(text, file="inst.yaml")
        assert [(p.key, p.line) for p in problems] == [
            ("webhook_listener.routes[1].ordering_key", 5)]
        assert "route /hooks/x:" in problems[0].message
        assert spec in problems[0].message

    def test_bad_default_syntax(self) -> None:
        _cfg, problems = check_config_text(
            "forwarder: {ordering: key, ordering_key: 'json:id'}\n", file="inst.yaml")
        assert [p.key for p in problems] == ["forwarder.ordering_key"]
        assert "json:/user/id" in problems[0].message  # says what a pointer looks like

    def test_a_raw_route_cannot_take_a_json_key(self) -> None:
        _cfg, problems = check_config_text(
            "forwarder: {ordering: key}\nwebhook_listener:\n  routes:\n"
            "    - {path: /r, source: r, body: raw, ordering_key: 'json:/id'}\n")
        assert [p.key for p in problems] == ["webhook_listener.routes[0].ordering_key"]
        assert "body: raw" in problems[0].message and "header:NAME" in problems[0].message

    def test_routes_without_a_key_are_warned_about(self) -> None:
        """ordering: key with a route that has no key (and no default): it works, ordered
        by source, and check says so."""
        warnings: list[str] = []
        _cfg, problems = check_config_text(self.ROUTES + "forwarder: {ordering: key}\n",
                                           file="inst.yaml", warnings=warnings)
        assert problems == []
        assert len(warnings) == 1 and "/c" in warnings[0] and "by source" in warnings[0]
        warnings.clear()
        check_config_text(self.ROUTES + "forwarder: {ordering: key, ordering_key: header:K}\n",
                          warnings=warnings)
        assert warnings == []

    def test_raw_routes_under_a_json_default_key_are_warned_about(self) -> None:
        """The default key reads the JSON body: a raw route without a key of its own never
        has one (ordered by source, each event counted as missing its key)."""
        text = ("forwarder: {ordering: key, ordering_key: 'json:/user/id'}\n"
                "webhook_listener:\n  routes:\n"
                "    - {path: /j, source: j}\n"
                "    - {path: /r, source: r, body: raw}\n"
                "    - {path: /h, source: h, body: raw, ordering_key: 'header:X-Tenant'}\n")
        warnings: list[str] = []
        _cfg, problems = check_config_text(text, file="inst.yaml", warnings=warnings)
        assert problems == []
        assert len(warnings) == 1
        assert "forwarder.ordering_key" in warnings[0] and "route /r takes raw" in warnings[0]
        assert "its events have no key" in warnings[0]
        assert "/h" not in warnings[0] and "/j" not in warnings[0]
        warnings.clear()
        check_config_text(text.replace("json:/user/id", "header:X-Id"), warnings=warnings)
        assert warnings == []

    def test_a_key_without_ordering_key_is_warned_about(self) -> None:
        warnings: list[str] = []
        _cfg, problems = check_config_text(self.ROUTES, file="inst.yaml", warnings=warnings)
        assert problems == []
        assert len(warnings) == 1
        assert "routes[0].ordering_key" in warnings[0] and "ignored" in warnings[0]

    def test_unknown_mode_is_refused(self) -> None:
        err = load_error("forwarder: {ordering: keys}\n")
        assert err.key == "forwarder.ordering"
