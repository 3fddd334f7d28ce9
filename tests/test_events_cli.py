"""``mfo-actors events ...`` against a real store file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from mfo_actors.cli import main
from mfo_actors.config import load_config
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import EventStore, open_store

ROOT = Path(__file__).resolve().parent.parent
HAVE_CLI = (ROOT / "mfo_actors" / "cli.py").exists()
SECRET_HEADERS = {
    "Authorization": "Bearer sekrit-token-123",
    "X-Hub-Signature-256": "sha256=abcdef0123456789",
    "webhook-signature": "v1,c2lnbmF0dXJlLXZhbHVl",
    "Stripe-Signature": "t=1,v1=feedface",
}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process."""
    capsys.readouterr()  # drop what the test's own store use logged
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "crm.yaml"
    path.write_text(f"instance: crm\nstate_dir: {tmp_path / 'state'}\n")
    return path


def with_store(config: Path, body: Callable[[EventStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with open_store(load_config(config)) as store:
            return await body(store)

    return anyio.run(main)


def make_event(source: str = "github", body: bytes = b'{"n": 1}', **headers: str) -> Event:
    return Event(id=new_id(), source=source, type="push", received_at=time.time(),
                 headers={"X-GitHub-Event": "push", **headers}, body=body)


@pytest.fixture
def populated(config: Path) -> dict[str, str]:
    """Three events: a pending github one, a delivered github one, a dead billing one."""

    async def body(store: EventStore) -> dict[str, str]:
        ids = {}
        for name, source in (("delivered", "github"), ("dead", "billing"),
                             ("pending", "github")):
            e = make_event(source, b'{"user": {"name": "bob", "password": "hunter22"}}',
                           **SECRET_HEADERS)
            await store.append(e)
            ids[name] = e.id
        claimed = await store.claim_due(limit=10, lease=60)
        tokens = {c.event.id: c.claim_token or "" for c in claimed}
        await store.mark_delivered(ids["delivered"], tokens[ids["delivered"]])
        await store.dead_letter(ids["dead"], tokens[ids["dead"]],
                                reason="400 Bad Request: invalid payload")
        return ids

    return dict(with_store(config, body))


def test_list_is_an_aligned_table(config: Path, populated: dict[str, str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["events", "list", "--config", str(config)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "SOURCE", "TYPE"]
    assert [ln.split()[0] for ln in lines[1:]] == [
        populated["pending"], populated["dead"], populated["delivered"]]
    status_col = lines[0].index("STATUS")
    assert {ln[status_col:].split()[0] for ln in lines[1:]} == {"pending", "dead", "delivered"}
    assert "invalid payload" in out


def test_list_filters(config: Path, populated: dict[str, str],
                      capsys: pytest.CaptureFixture[str]) -> None:
    def ids(*extra: str) -> list[str]:
        code, out, _ = run_cli(["events", "list", "--config", str(config), "--json", *extra],
                               capsys)
        assert code == 0
        return [e["id"] for e in json.loads(out)]

    assert ids("--status", "delivered") == [populated["delivered"]]
    assert ids("--source", "github") == [populated["pending"], populated["delivered"]]
    assert ids("--limit", "1") == [populated["pending"]]


def test_dead_lists_dead_events(config: Path, populated: dict[str, str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["events", "dead", "--config", str(config), "--json"], capsys)
    assert code == 0
    (dead,) = json.loads(out)
    assert (dead["id"], dead["status"], dead["last_error"]) == (
        populated["dead"], "dead", "400 Bad Request: invalid payload")


def test_empty_list(config: Path, populated: dict[str, str],
                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["events", "list", "--config", str(config), "--source", "x"], capsys)
    assert (code, out.strip()) == (0, "no events")


@pytest.mark.parametrize("as_json", [False, True])
def test_show_redacts_secrets(config: Path, populated: dict[str, str], as_json: bool,
                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["events", "show", populated["dead"], "--config", str(config)]
    code, out, err = run_cli(argv + (["--json"] if as_json else []), capsys)
    assert code == 0
    for secret in [*SECRET_HEADERS.values(), "hunter22", "sekrit"]:
        assert secret not in out + err
    assert "X-GitHub-Event" in out and "bob" in out and "[REDACTED]" in out
    if as_json:
        shown = json.loads(out)
        assert shown["headers"]["Authorization"] == "[REDACTED]"
        assert shown["payload"] == {"user": {"name": "bob", "password": "[REDACTED]"}}
        assert shown["status"] == "dead"


@pytest.mark.parametrize(("key", "shown"), [
    ("sk_live_0123456789abcdef", "[REDACTED]"),  # read from a credential header
    ("Bearer sekrit-token-123", "[REDACTED]"),  # the Authorization header itself
    ("customer-42", "customer-42"),  # a plain key from the body
])
def test_show_redacts_an_ordering_key_read_from_a_credential_header(
        config: Path, key: str, shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``ordering_key: header:X-Api-Key`` stores a credential as the event's key: ``events
    show`` does not print it (a key that is no credential header's value is shown)."""
    event = msgspec.structs.replace(make_event(), ordering_key=key, headers={
        "X-Api-Key": "sk_live_0123456789abcdef", "Authorization": "Bearer sekrit-token-123"})

    async def body(store: EventStore) -> None:
        await store.append(event)

    with_store(config, body)
    code, out, _ = run_cli(["events", "show", event.id, "--config", str(config), "--json"],
                           capsys)
    assert code == 0
    assert json.loads(out)["ordering_key"] == shown
    if shown == "[REDACTED]":
        assert key.split()[-1] not in out
    code, out, _ = run_cli(["events", "show", event.id, "--config", str(config)], capsys)
    assert code == 0 and (key.split()[-1] not in out) == (shown == "[REDACTED]")


def test_show_lists_every_attempt(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per attempt: time, status or error, latency; once delivered no stale error shows, and
    after a replay the numbering goes on."""

    async def body(store: EventStore) -> str:
        event = make_event()
        await store.append(event)
        (c,) = await store.claim_due(limit=1, lease=60)
        await store.reschedule(event.id, c.claim_token or "", next_attempt_at=0.0,
                               error="503 outage: the server is down", status=503,
                               latency=0.0123)
        (c,) = await store.claim_due(limit=1, lease=60)
        await store.dead_letter(event.id, c.claim_token or "", reason="400 bad request",
                                status=400, latency=0.002)
        await store.replay([event.id])
        (c,) = await store.claim_due(limit=1, lease=60)
        await store.mark_delivered(event.id, c.claim_token or "", latency=0.0045)
        return event.id

    event_id = with_store(config, body)
    code, out, _ = run_cli(["events", "show", event_id, "--config", str(config)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert ["last_error:", "-"] in [ln.split() for ln in lines], out
    assert ["attempts:", "3"] in [ln.split() for ln in lines], out
    start = lines.index("history:")
    header, *rows = lines[start + 1:start + 5]
    assert header.split() == ["#", "AT", "RESULT", "STATUS", "LATENCY", "ERROR"]
    assert [r.split()[0:1] + r.split()[3:7] for r in rows] == [
        ["1", "retry", "503", "12.3", "ms"],
        ["2", "dead", "400", "2.0", "ms"],
        ["3", "delivered", "-", "4.5", "ms"],
    ]
    assert rows[0].endswith("503 outage: the server is down") and rows[2].endswith("ms")

    code, out, _ = run_cli(["events", "show", event_id, "--config", str(config), "--json"],
                           capsys)
    shown = json.loads(out)
    assert shown["last_error"] is None and shown["attempts"] == 3
    assert [(h["number"], h["outcome"], h["status"], h["latency_ms"], h["error"])
            for h in shown["history"]] == [
        (1, "retry", 503, 12.3, "503 outage: the server is down"),
        (2, "dead", 400, 2.0, "400 bad request"), (3, "delivered", None, 4.5, None)]


def test_show_unknown_id(config: Path, populated: dict[str, str],
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["events", "show", "NOPE", "--config", str(config)], capsys)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "NOPE" in err


def test_replay_by_id_and_all(config: Path, populated: dict[str, str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["events", "replay", populated["dead"], populated["pending"],
                            "--config", str(config)], capsys)
    assert code == 0
    assert "replayed 1 event" in out and "skipped, not dead" in out
    stored = with_store(config, lambda s: s.get_event(populated["dead"]))
    assert (stored.status, stored.attempts, stored.attempt_base) == ("pending", 1, 1)

    code, out, _ = run_cli(["events", "replay", "--all-dead", "--config", str(config),
                            "--json"], capsys)
    assert (code, json.loads(out)["replayed"]) == (0, 0)


def test_replay_unknown_id_changes_nothing(config: Path, populated: dict[str, str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["events", "replay", populated["dead"], "NOPE",
                            "--config", str(config)], capsys)
    assert code == 1 and "NOPE" in err
    stored = with_store(config, lambda s: s.get_event(populated["dead"]))
    assert stored.status == "dead"


def test_replay_needs_ids(config: Path, populated: dict[str, str],
                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["events", "replay", "--config", str(config)], capsys)
    assert code == 1 and "--all-dead" in err


def test_missing_store_is_a_user_error(config: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["events", "list", "--config", str(config)], capsys)
    assert code == 1
    assert "no event store" in err and err.count("\n") == 1
    assert not (tmp_path / "state").exists()


def test_bad_config_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {backend: sqlite, nope: 1}\n")
    code, _, err = run_cli(["events", "list", "--config", str(bad)], capsys)
    assert code == 1 and "bad.yaml" in err and "Traceback" not in err


def test_works_while_a_daemon_holds_the_store(config: Path, populated: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI shares the file with a running store (another thread here, as a daemon)."""
    opened, stop = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def daemon() -> None:
        async def main() -> None:
            async with open_store(load_config(config)) as store:
                await store.append(make_event("daemon"))
                opened.set()
                await anyio.to_thread.run_sync(stop.wait)
                claimed = await store.claim_due(limit=10, lease=60)
                seen["claimed"] = {c.event.id for c in claimed}
                seen["stats"] = await store.stats()

        anyio.run(main)

    thread = threading.Thread(target=daemon)
    thread.start()
    try:
        assert opened.wait(10)
        code, out, _ = run_cli(["events", "replay", populated["dead"], "--config", str(config)],
                               capsys)
        assert code == 0
        code, out, _ = run_cli(["events", "list", "--config", str(config), "--json"], capsys)
        assert code == 0 and len(json.loads(out)) == 4
    finally:
        stop.set()
        thread.join(10)
    assert populated["dead"] in seen["claimed"]
    assert (seen["stats"].pending, seen["stats"].dead) == (3, 0)


@pytest.mark.skipif(not HAVE_CLI, reason="mfo_actors/cli.py is not there yet")
def test_python_m_mfo_actors_events(config: Path, populated: dict[str, str]) -> None:
    """The real entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "mfo_actors", "events", "show", populated["pending"],
         "--config", str(config), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == populated["pending"]
    assert "sekrit" not in proc.stdout + proc.stderr


def test_store_logs_never_reach_stdout(config: Path, populated: dict[str, str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Even with structlog configured to print info lines on stdout, --json stays clean."""
    import structlog

    structlog.configure(processors=[structlog.dev.ConsoleRenderer(colors=False)],
                        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
                        cache_logger_on_first_use=False)
    try:
        code, out, _ = run_cli(["events", "list", "--config", str(config), "--json"], capsys)
    finally:
        structlog.reset_defaults()
    assert code == 0
    assert len(json.loads(out)) == 3
