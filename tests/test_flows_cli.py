"""``flows list|graph|run`` and ``runs list|show``, through the real CLI in a subprocess."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from mfo_actors.ids import new_id
from mfo_actors.store import RunRequest, open_sqlite_store
from tests.helpers import free_port

OK_FLOW = """
name: Hello
description: greets
triggers:
  - event: {source: crm, type: "user.*"}
  - interval: 30s
outputs: {greeting: "${b.text}"}
tasks:
  - id: a
    type: set
    config: {values: {who: "${input.who}"}}
  - id: b
    type: set
    dependencies: [a]
    config: {values: {text: "hello ${a.who}"}}
  - id: c
    type: log
    dependencies: [a]
    config: {message: "logged ${a.who}"}
"""

BAD_FLOW = """
name: Broken
tasks:
  - {id: a, type: set, config: {values: {x: 1}}}
  - {id: b, type: set, dependencies: [a], config: {values: {y: "${input.missing}"}}}
  - {id: c, type: set, dependencies: [b], config: {values: {z: 2}}}
"""


def cli(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mfo_actors", *args], capture_output=True,
                          text=True, timeout=60)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def config(tmp_path: Path) -> Path:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "hello.yaml").write_text(OK_FLOW, encoding="utf-8")
    (flows / "broken.yaml").write_text(BAD_FLOW, encoding="utf-8")
    cfg = {
        "instance": "cli-test",
        "state_dir": str(tmp_path / "state"),
        # Nobody listens there: flows without mfo.* tasks must not care.
        "client": {"base_url": f"http://127.0.0.1:{free_port()}"},
        "auth": {"mode": "none"},
        "flows": {"dir": str(flows)},
    }
    path = tmp_path / "instance.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_flows_list(config: Path) -> None:
    out = cli("flows", "list", "--config", str(config), check_rc=0).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TRIGGERS", "TASKS", "FILE"]
    broken = next(line for line in lines if line.startswith("Broken"))
    hello = next(line for line in lines if line.startswith("Hello"))
    assert "manual" in broken and " 3 " in broken and broken.endswith("broken.yaml")
    assert "event crm/user.*" in hello and "every 30s" in hello and " 3 " in hello
    listed = json.loads(cli("flows", "list", "--config", str(config), "--json",
                            check_rc=0).stdout)
    by_name = {f["name"]: f for f in listed}
    assert by_name["Hello"]["tasks"] == 3
    assert by_name["Hello"]["triggers"] == ["event crm/user.*", "every 30s"]
    assert by_name["Hello"]["file"].endswith("hello.yaml")


def test_flows_graph(config: Path) -> None:
    out = cli("flows", "graph", "Hello", "--config", str(config), check_rc=0).stdout
    assert out.startswith("graph TD\n")
    assert "t0 --> t1" in out and "t0 --> t2" in out  # a -> b, a -> c
    assert "trigger0" in out
    line = one_line_error(cli("flows", "graph", "Nope", "--config", str(config)))
    assert "unknown flow 'Nope'" in line and "Broken, Hello" in line


@pytest.mark.slow
def test_flows_run_records_runs_and_runs_cli_shows_them(config: Path) -> None:
    ok = cli("flows", "run", "Hello", "--config", str(config), "--input", '{"who": "bob"}',
             check_rc=0)
    assert "[1/3] done: a (" in ok.stderr
    assert "[3/3] done: " in ok.stderr
    assert ": done in " in ok.stdout
    assert '"greeting": "hello bob"' in ok.stdout

    bad = cli("flows", "run", "Broken", "--config", str(config))
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "error: b" in bad.stderr and "skipped: c" in bad.stderr
    assert "input.missing" in bad.stdout

    runs = json.loads(cli("runs", "list", "--config", str(config), "--json",
                          check_rc=0).stdout)
    assert [(r["flow"], r["status"], r["trigger"]) for r in runs] == [
        ("Broken", "error", "manual"), ("Hello", "done", "manual")]

    table = cli("runs", "list", "--config", str(config), check_rc=0).stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "FLOW", "STATUS", "TRIGGER"]
    assert len(table) == 3
    only = cli("runs", "list", "--config", str(config), "--status", "done", check_rc=0).stdout
    assert "Hello" in only and "Broken" not in only
    only = cli("runs", "list", "--config", str(config), "--flow", "Broken", "--json",
               check_rc=0).stdout
    assert [r["flow"] for r in json.loads(only)] == ["Broken"]

    broken_id = runs[0]["id"]
    show = cli("runs", "show", broken_id, "--config", str(config), check_rc=0).stdout
    assert "status:   error" in show
    rows = {line.split()[0]: line.split() for line in show.splitlines()
            if line.split() and line.split()[0] in ("a", "b", "c")}
    assert rows["a"][1:3] == ["done", "1"]
    assert rows["b"][1:3] == ["error", "1"] and "TemplateError" in " ".join(rows["b"])
    assert rows["c"][1:3] == ["skipped", "0"]
    detail = json.loads(cli("runs", "show", runs[1]["id"], "--config", str(config), "--json",
                            check_rc=0).stdout)
    assert detail["input"] == {"who": "bob"}
    assert detail["outputs"] == {"greeting": "hello bob"}
    assert [t["task"] for t in detail["tasks"]] == ["a", "b", "c"]
    assert detail["tasks"][1]["output"] == {"text": "hello bob"}

    line = one_line_error(cli("runs", "show", "nope", "--config", str(config)))
    assert "no run with id nope" in line


def test_flows_run_is_a_node_of_its_own(config: Path) -> None:
    """``flows run`` claims its run as node ``<daemon's node>/cli-<pid>``: a daemon of the
    instance (re)starting meanwhile does not take the run back as its own and run it twice."""
    import sqlite3

    from mfo_actors.config import load_config
    from mfo_actors.store import node_id, sqlite_path

    cfg = load_config(str(config))
    cli("flows", "run", "Hello", "--config", str(config), "--input", '{"who": "x"}',
        check_rc=0)
    with sqlite3.connect(sqlite_path(cfg)) as conn:
        (node,) = conn.execute("SELECT node FROM runs").fetchone()
    assert node.startswith(node_id(cfg) + "/cli-") and node != node_id(cfg)


def test_flows_run_json_output(config: Path) -> None:
    out = cli("flows", "run", "Hello", "--config", str(config), "--json", "--input",
              '{"who": "ann"}', check_rc=0).stdout
    result = json.loads(out)
    assert result["status"] == "done" and result["outputs"] == {"greeting": "hello ann"}
    assert result["tasks"]["b"] == {"state": "done", "attempts": 1, "error": None}


def test_flows_run_error_does_not_show_a_credential(config: Path) -> None:
    """A task that fails on a URL carrying a token (``?access_token=``) from the run's
    input: ``flows run`` and ``runs show`` print the error with the token redacted."""

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            (config.parent / "flows" / "leaky.yaml").write_text(
                "name: Leaky\n"
                "tasks:\n"
                "  - id: call\n"
                "    type: http.request\n"
                "    config: {method: GET, raise_for_status: true, url: 'http://127.0.0.1:"
                f"{server.server_port}/x?access_token=${{input.api_token}}&page=2'}}\n",
                encoding="utf-8")
            proc = cli("flows", "run", "Leaky", "--config", str(config), "--input",
                       '{"api_token": "sekrit-42"}', check_rc=1)
        finally:
            server.shutdown()
    assert "answered 500" in proc.stdout and "page=2" in proc.stdout
    assert "sekrit-42" not in proc.stdout + proc.stderr
    run_id = proc.stdout.split()[1]
    shown = cli("runs", "show", run_id, "--config", str(config), check_rc=0)
    assert "answered 500" in shown.stdout
    assert "sekrit-42" not in shown.stdout + shown.stderr


@pytest.mark.parametrize(("given", "expected"), [
    ("{nope", "--input is not valid JSON"),
    ("[1, 2]", "--input must be a JSON object"),
])
def test_flows_run_bad_input(config: Path, given: str, expected: str) -> None:
    line = one_line_error(cli("flows", "run", "Hello", "--config", str(config),
                              "--input", given))
    assert expected in line


def test_flows_run_unknown_flow(config: Path) -> None:
    line = one_line_error(cli("flows", "run", "Nope", "--config", str(config)))
    assert "unknown flow 'Nope'" in line and "known flows: Broken, Hello" in line


def test_runs_list_without_a_store(config: Path) -> None:
    line = one_line_error(cli("runs", "list", "--config", str(config)))
    assert "no store at" in line


def test_bad_flow_file_is_one_line(config: Path, tmp_path: Path) -> None:
    (tmp_path / "flows" / "cycle.yaml").write_text(
        "name: Cycle\ntasks:\n  - {id: a, type: set, dependencies: [b]}\n"
        "  - {id: b, type: set, dependencies: [a]}\n", encoding="utf-8")
    line = one_line_error(cli("flows", "list", "--config", str(config)))
    assert "cycle.yaml" in line


# -- the store side of a foreground run ----------------------------------------------------


@pytest.mark.anyio
async def test_foreground_runs_are_created_claimed(tmp_path: Path) -> None:
    """``flows run`` creates its run ``active``, so a daemon's scheduler never claims it."""
    async with open_sqlite_store(tmp_path / "s.sqlite3") as store:
        mine = RunRequest(run_id=new_id(), flow="f", trigger="manual", input={"a": 1})
        assert await store.create_runs([mine], claim=True) == [mine.run_id]
        assert await store.claim_runs(limit=10) == []
        found = await store.get_run(mine.run_id)
        assert found is not None
        run: Any = found[0]
        assert run.status == "active" and run.started_at is not None
        await store.finish_run(mine.run_id, status="done")
        found = await store.get_run(mine.run_id)
        assert found is not None and found[0].status == "done"
