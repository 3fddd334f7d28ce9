"""``sessions list|show|close`` and ``chat`` on the command line: output and one-line errors.
(The commands against a running daemon are in test_conversations_e2e.py.)"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mfo_actors.cli import main
from mfo_actors.config import load_config
from mfo_actors.store import open_store
from tests.helpers import free_port, write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, client={"base_url": f"http://127.0.0.1:{free_port()}",
                                          "retry": {"max_attempts": 1}})


def seed_sessions(config: Path) -> None:
    async def body() -> None:
        async with open_store(load_config(config)) as store:
            s = (await store.open_session("user-1", thread_id="thread_one", ttl=3600,
                                          max_active=10, metadata={"flow": "support"})).session
            await store.record_turn(s.session_id, thread_id="thread_one", messages=[
                {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "You said: hello there"}])
            await store.open_session("user-2", thread_id="thread_two", ttl=3600, max_active=10)

    anyio.run(body)


def test_without_a_store_is_one_line(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", "list", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mfo-actors: ") and "no store at" in err and err.count("\n") == 1


def test_list_show_close(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed_sessions(config)
    capsys.readouterr()  # the store's own log lines
    cfg = str(config)
    assert main(["sessions", "list", "--config", cfg]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KEY", "THREAD", "STATUS", "TURNS", "CREATED", "LAST",
                              "ACTIVITY"]
    assert {line.split()[0] for line in out[1:]} == {"user-1", "user-2"}
    assert main(["sessions", "show", "user-1", "--config", cfg]) == 0
    shown = capsys.readouterr().out
    assert "thread:" in shown and "thread_one" in shown and "turns:" in shown
    assert "flow:" in shown and "support" in shown
    assert "  user: hello there" in shown and "  assistant: You said: hello there" in shown
    assert main(["sessions", "close", "user-2", "--config", cfg]) == 0
    assert "closed session user-2 (thread thread_two, 0 turns)" in capsys.readouterr().out
    assert main(["sessions", "list", "--status", "closed", "--config", cfg]) == 0
    assert "closed (closed)" in capsys.readouterr().out
    assert main(["sessions", "show", "nobody", "--config", cfg]) == 1
    assert "no session with key 'nobody'" in capsys.readouterr().err


def test_chat_errors_are_one_line(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--config", str(config), "hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mfo-actors: chat failed: ") and err.count("\n") == 1
    assert main(["chat", "--config", str(config), "  "]) == 1
    assert "the message is empty" in capsys.readouterr().err
