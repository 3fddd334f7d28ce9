"""Logging: JSON lines with instance and actor on every event, and secrets never printed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import structlog

from mfo_actors.config import load_config_text
from mfo_actors.observability import (
    REDACTED,
    configure_logging,
    get_logger,
    redact,
    register_secret,
)

SECRET = "s3cr3t-from-env-9f8e7d"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logging configured into a StringIO (JSON, no logger cache), reset afterwards."""
    out = io.StringIO()
    configure_logging(level="debug", fmt="json", instance="crm", stream=out, cache=False)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


class TestFormat:
    def test_json_lines_with_instance_and_actor(self, captured: io.StringIO) -> None:
        get_logger("t").info("thing.happened", count=3)
        with structlog.contextvars.bound_contextvars(actor="forwarder"):
            get_logger("t").warning("thing.failed")
        first, second = lines(captured)
        assert first["event"] == "thing.happened"
        assert (first["instance"], first["actor"], first["count"]) == ("crm", "-", 3)
        assert (second["actor"], second["level"]) == ("forwarder", "warning")
        assert "timestamp" in first

    def test_level_filter(self) -> None:
        out = io.StringIO()
        configure_logging(level="warning", fmt="json", stream=out, cache=False)
        try:
            get_logger("t").info("quiet")
            get_logger("t").error("loud")
        finally:
            structlog.reset_defaults()
        assert [e["event"] for e in lines(out)] == ["loud"]

    def test_console_format(self) -> None:
        out = io.StringIO()
        configure_logging(fmt="console", instance="crm", stream=out, cache=False)
        try:
            get_logger("t").info("thing.happened", token=TOKEN)
        finally:
            structlog.reset_defaults()
        text = out.getvalue()
        assert "thing.happened" in text
        assert TOKEN not in text

    def test_stdlib_warnings_are_bridged(self, captured: io.StringIO) -> None:
        logging.getLogger("somelib").warning("disk %s is full", "sda")
        [event] = lines(captured)
        assert (event["event"], event["message"], event["logger"]) == (
            "stdlib.log", "disk sda is full", "somelib"
        )


class TestRedaction:
    def test_bearer_tokens_in_free_text_are_redacted_in_any_case(self) -> None:
        """``Bearer``, ``BEARER`` and ``basic`` credentials inside a message are all hidden."""
        for text in ("got Authorization: Bearer tok-123", "AUTHORIZATION: BEARER tok-123",
                     "header basic tok-123"):
            assert "tok-123" not in redact(text)

    @pytest.mark.parametrize(("text", "hidden", "kept"), [
        ("GET https://h/x?access_token=tok-123&page=2 answered 500", "tok-123", "page=2"),
        ("form: client_secret=s3cr3t&grant_type=client_credentials", "s3cr3t", "grant_type"),
        ("api_key='k-999' password=\"pw-1\"", "k-999", "api_key="),
        ("api_key='k-999' password=\"pw-1\"", "pw-1", "password="),
        ("connecting to postgresql://app:pg-pass@db:5432/mfo", "pg-pass", "app:"),
        ("POST http://bob:hunter22@upstream/api/events failed", "hunter22", "bob:"),
    ])
    def test_credentials_in_urls_and_parameters_are_redacted(
            self, text: str, hidden: str, kept: str) -> None:
        """A URL's password and a parameter named like a credential lose their value; the
        rest of the text stays readable."""
        out = redact(text)
        assert hidden not in out and kept in out and REDACTED in out

    def test_ordinary_parameters_and_addresses_are_kept(self) -> None:
        for text in ("max_tokens=5 a=b", "see https://docs.example/a@b", "mailto:a@b.c",
                     "tokens_used=12"):
            assert redact(text) == text

    def test_secret_from_config_never_logged(
        self, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A value resolved from ${env:...} disappears from every field, nested or not."""
        monkeypatch.setenv("OBS_PW", SECRET)
        cfg = load_config_text(
            "auth: {mode: login, email: a@b.c, password: '${env:OBS_PW}'}\n"
        )
        log = get_logger("t")
        log.info("login.sent", body={"email": "a@b.c", "pw": cfg.auth.password})
        log.info("oops", detail=f"login failed for password={SECRET}!")
        log.info("cfg.dump", auth=cfg.auth)
        log.info("request", headers={"Authorization": f"Bearer {TOKEN}", "X-Ok": "fine"})
        log.info("raw", headers=[(b"authorization", b"Basic dXNlcjpwYXNz")])
        text = captured.getvalue()
        assert SECRET not in text
        assert TOKEN not in text
        assert "dXNlcjpwYXNz" not in text
        records = lines(captured)
        assert records[0]["body"] == {"email": "a@b.c", "pw": REDACTED}
        assert records[3]["headers"] == {"Authorization": REDACTED, "X-Ok": "fine"}

    def test_exception_text_is_redacted(self, captured: io.StringIO) -> None:
        register_secret(SECRET)
        try:
            raise RuntimeError(f"upstream said {SECRET}")
        except RuntimeError:
            get_logger("t").exception("call.failed")
        assert SECRET not in captured.getvalue()
        assert "call.failed" in captured.getvalue()

    def test_long_secret_in_a_local_variable_is_not_leaked(self, captured: io.StringIO) -> None:
        """JSON tracebacks must not show frame locals: they are cut to 80 characters, and a
        cut secret no longer matches its registered value, so a prefix of it would leak."""
        long_secret = "whsec-" + "A1b2C3d4" * 12
        register_secret(long_secret)

        def fail() -> None:
            blob = f"prefix {long_secret}"
            raise RuntimeError(f"failed with {len(blob)} bytes")

        try:
            fail()
        except RuntimeError:
            get_logger("t").exception("call.failed")
        text = captured.getvalue()
        assert "call.failed" in text
        assert "A1b2C3d4A1b2C3d4" not in text

    def test_sensitive_keys_whatever_the_value(self) -> None:
        assert redact({"password": "x", "api_key": "y", "access_token": "z", "ok": 1}) == {
            "password": REDACTED, "api_key": REDACTED, "access_token": REDACTED, "ok": 1,
        }

    def test_bearer_in_free_text(self) -> None:
        assert redact(f"Authorization: Bearer {TOKEN}") == f"Authorization: Bearer {REDACTED}"

    def test_ordinary_words_after_bearer_are_kept(self) -> None:
        """Redaction must not eat prose: these name a credential, they are not one."""
        for text in ("401 unauthorized: missing bearer token", "Bearer authentication failed",
                     "use basic auth", "BEARER TOKEN REQUIRED"):
            assert redact(text) == text

    def test_word_after_authorization_header_is_always_a_credential(self) -> None:
        assert redact("authorization: Bearer opaque") == f"authorization: Bearer {REDACTED}"
        assert redact("got Bearer abcdefghijklmnopqrstuvwxyz") == f"got Bearer {REDACTED}"

    def test_struct_values_are_redacted(self) -> None:
        class Creds(msgspec.Struct):
            user: str
            password: str

        assert redact(Creds("bob", "pw-123456")) == {"user": "bob", "password": REDACTED}

    def test_short_values_are_not_registered(self) -> None:
        """Registering 'on' would redact every word containing it."""
        register_secret("on")
        assert redact("connection") == "connection"

    def test_ordinary_values_pass_through(self) -> None:
        assert redact({"n": 1, "f": 1.5, "b": True, "none": None, "s": "text"}) == {
            "n": 1, "f": 1.5, "b": True, "none": None, "s": "text"
        }
