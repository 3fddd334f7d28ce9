"""The README's by-hand walk-through, run as written: mock-server, run, curl, inspect.

The commands are read from the README itself (the ``sh`` block under "The same, by hand"),
so the test and the README cannot drift apart. Only the ports change (other engineers run
tests on this machine: 9000/8080/9090 may be taken) and ``.venv/bin/mfo-actors`` becomes this
interpreter's ``-m mfo_actors``; everything else (``config/example.yaml`` as shipped, its
credential, the example flows, the curl) is the README's.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, running_daemon, wait_for, wait_http_ok

REPO = Path(__file__).resolve().parent.parent
CLI = ".venv/bin/mfo-actors"

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## The same, by hand", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_walkthrough_delivers_the_event(tmp_path: Path) -> None:
    commands = readme_commands()
    mock_cmd, run_cmd, send, upstream_events, *inspect = commands
    assert mock_cmd == f"{CLI} mock-server"
    assert run_cmd == f"{CLI} run --config config/example.yaml"
    assert send.startswith("curl -s http://127.0.0.1:8080/webhook ")
    assert upstream_events == "curl -s http://127.0.0.1:9000/_mock/events"
    assert [c.split()[1:3] for c in inspect] == [["events", "list"], ["events", "show"],
                                                ["runs", "list"]]

    ports = {9000: free_port(), 8080: free_port(), 9090: free_port()}

    def moved(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            text = re.sub(rf"\bport: {old}\b", f"port: {new}", text)
        return text

    work = tmp_path / "clone"
    (work / "config").mkdir(parents=True)
    example = (REPO / "config" / "example.yaml").read_text()
    (work / "config" / "example.yaml").write_text(moved(example))
    settings = "\n".join(line.split("#")[0] for line in moved(example).splitlines())
    assert not re.search(r"\b(9000|8080|9090)\b", settings)  # every port moved
    shutil.copytree(REPO / "config" / "credentials", work / "config" / "credentials")
    shutil.copytree(REPO / "flows", work / "flows")

    def cli(command: str) -> list[str]:
        assert command.startswith(CLI + " ")
        return [sys.executable, "-m", "mfo_actors", *command[len(CLI) + 1:].split()]

    def shell(command: str) -> str:
        result = subprocess.run(["bash", "-c", moved(command)], cwd=work, capture_output=True,
                                text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    mock = subprocess.Popen([*cli(mock_cmd), "--port", str(ports[9000])], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{ports[9000]}/_mock/stats")
        with running_daemon(Path("config/example.yaml"), cwd=work) as daemon:
            wait_http_ok(f"http://127.0.0.1:{ports[9090]}/readyz")
            answer = json.loads(shell(send))
            event_id = answer["id"]

            def arrived() -> bool:
                events = json.loads(shell(upstream_events))["events"]
                return any(e["idempotency_key"] == event_id for e in events)

            wait_for(arrived, what="the event at the reference server")

            def listed(command: str, *words: str) -> str | None:
                result = subprocess.run(cli(command), cwd=work, capture_output=True,
                                        text=True, timeout=30, check=False)
                assert result.returncode == 0, result.stderr
                return result.stdout if all(w in result.stdout for w in words) else None

            assert listed(inspect[0], event_id, "delivered")
            shown = listed(inspect[1].replace("EVENT_ID", event_id), "delivered")
            assert shown is not None and "history:" in shown, shown
            wait_for(lambda: listed(inspect[2], "UserSignupFlow", "done"),
                     what="UserSignupFlow done")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit() == 0
            errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
            assert errors == [], errors
    finally:
        mock.terminate()
        mock.wait(timeout=10)
