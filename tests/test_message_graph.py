"""The message architecture is true: every message of ``mfo_actors/messages.py`` has a
producer and a consumer among the actors an instance is built with, over a declared channel.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from mfo_actors import messages
from mfo_actors.config import load_config_text
from mfo_actors.daemon import DaemonContext, SystemdNotifier, declare_channels, open_instance
from mfo_actors.daemon._graph import check_channels
from mfo_actors.runtime import Watch, open_channel

CONFIG = """
instance: graph
state_dir: {state_dir}
client: {{base_url: "http://127.0.0.1:9"}}
auth: {{mode: login, email: a@example.com, password: pw-123456}}
webhook_listener: {{port: 0, routes: [{{path: /hook, source: hook}}]}}
admin: {{enabled: false}}
"""


def message_types() -> list[type]:
    return [obj for _, obj in inspect.getmembers(messages, inspect.isclass)
            if issubclass(obj, msgspec.Struct) and obj is not messages.Message
            and obj.__module__ == messages.__name__]


@pytest.mark.anyio
async def test_every_message_has_a_producer_and_a_consumer(tmp_path: Path) -> None:
    cfg = load_config_text(CONFIG.format(state_dir=tmp_path))
    ctx = DaemonContext(state_dir=tmp_path, notifier=SystemdNotifier(None), environ={})
    async with open_instance(cfg, ctx) as actors:
        running = {actor.name for actor in actors}
    channels = declare_channels(cfg)
    assert message_types(), "no messages found"
    for message in message_types():
        carrying = [ch for ch in channels if ch.message is message]
        assert carrying, f"{message.__name__}: no channel carries it"
        producers = {p for ch in carrying for p in ch.producers}
        consumers = {c for ch in carrying for c in ch.consumers}
        assert producers & running, f"{message.__name__}: no running producer ({producers})"
        assert consumers & running, f"{message.__name__}: no running consumer ({consumers})"
    for ch in channels:
        assert set(ch.producers) <= running and set(ch.consumers) <= running, ch.name


def test_an_opened_channel_that_differs_from_its_declaration_is_refused(tmp_path: Path) -> None:
    cfg = load_config_text(CONFIG.format(state_dir=tmp_path))
    declared = declare_channels(cfg)
    sender, receiver = open_channel(messages.DeliveryOutcome, 3)
    with sender, receiver, pytest.raises(RuntimeError, match="outcomes"):
        check_channels(declared, {"outcomes": sender})
    with pytest.raises(RuntimeError, match="not declared"):
        check_channels(declared, {"elsewhere": Watch(messages.BreakerState, None)})


def test_check_graph_prints_mermaid(tmp_path: Path) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(CONFIG.format(state_dir=tmp_path))
    out = subprocess.run([sys.executable, "-m", "mfo_actors", "check", "--config",
                          str(path), "--graph"], capture_output=True, text=True, check=True)
    assert "flowchart LR" in out.stdout
    for text in ("DeliveryOutcome", "BreakerState", "TokenIssued", "TokenRejected",
                 "Event", "bound 256", "latest value", "ch_outcomes --> breaker"):
        assert text in out.stdout, text
    run = subprocess.run([sys.executable, "-m", "mfo_actors", "run", "--config",
                          str(path), "--print-graph"], capture_output=True, text=True, check=True)
    assert run.stdout == out.stdout.split("\n", 1)[1]
