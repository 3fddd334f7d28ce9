"""``mfo-actors demo``: the real thing as a process, and its parts (providers, view, verdict).

The process tests are the demo as a user runs it: the reference server, a real daemon child
process, a few hundred signed webhooks through an outage, and the verdict line; with
``--keep-running``, the printed curl commands are pasted into a shell and must be accepted.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mfo_actors.actors._verify import SignatureError, verify
from mfo_actors.config import VerifyConfig
from mfo_actors.daemon import StateDirLock
from mfo_actors.daemon._lock import running_daemon_pid
from mfo_actors.demo import DemoOptions, Verdict, run_demo
from mfo_actors.demo import _run as demo_run
from mfo_actors.demo._providers import Tally, make_deliveries
from mfo_actors.demo._setup import GITHUB_SECRET, STANDARD_WEBHOOKS_SECRET
from mfo_actors.demo._view import LiveView, Snapshot, parse_metrics
from mfo_actors.errors import UserError
from tests.helpers import wait_for

VERDICT_OK = re.compile(r"^verdict: OK: every accepted event \((\d+)\) reached the server "
                        r"exactly once by id; nothing refused reached it$", re.MULTILINE)


def demo(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mfo_actors", "demo", *args], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]


@pytest.mark.slow
class TestDemoProcess:
    def test_demo_five_seconds_delivers_everything_exactly_once(self, tmp_path: Path) -> None:
        """The acceptance run: exit 0 and the verdict line, nothing left behind."""
        proc = demo("--duration", "5", cwd=tmp_path)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        accepted = int(VERDICT_OK.search(out).group(1))  # type: ignore[union-attr]
        assert 100 <= accepted <= 150  # 150 deliveries, less the forged and the malformed
        assert "summary (" in out and "forged signature (401)" in out
        # Plain periodic lines (not a terminal), with the outage in them.
        assert re.search(r"^demo t=.* phase=upstream .*breaker=", out, re.MULTILINE), out
        state = re.search(r"state (\S+)", out).group(1)  # type: ignore[union-attr]
        assert not Path(state).exists()  # the temporary state dir is gone
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.slow
    def test_trio_and_keep_running_curl_commands_work(self, tmp_path: Path) -> None:
        """On trio, with --keep-running: the printed signed curl commands are accepted, the
        inspection commands work, and Ctrl-C stops everything with exit 0."""
        proc = demo("--duration", "2", "--rate", "15", "--backend", "trio", "--keep-running",
                    "--state-dir", str(tmp_path / "state"))
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            lines.extend(line.rstrip("\n") for line in proc.stdout)

        with proc:  # its pipes are closed however the test ends
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                wait_for(lambda: any(line.startswith("curl -s http") and "_mock/stats" in line
                                     for line in lines), deadline=90, what="the curl commands")
                text = "\n".join(lines)
                assert VERDICT_OK.search(text), text
                blocks = text.split("\n# ")[1:]
                signup, github, inspect = blocks[0], blocks[1], blocks[2]
                for block in (signup, github):
                    script = "\n".join(block.splitlines()[1:])
                    result = subprocess.run(["bash", "-c", script], capture_output=True,
                                            text=True, timeout=30, check=False)
                    assert result.returncode == 0, result.stderr
                    answer = json.loads(result.stdout)
                    assert set(answer) == {"id"}, answer
                listing = next(ln for ln in inspect.splitlines() if " events list " in ln)
                result = subprocess.run(listing, shell=True, capture_output=True, text=True,
                                        timeout=30, check=False)
                assert result.returncode == 0 and answer["id"] in result.stdout, result.stderr
            finally:
                proc.send_signal(signal.SIGINT)
                code = proc.wait(timeout=60)
                reader.join(timeout=5)
            assert code == 0, "\n".join(lines) + (proc.stderr.read() if proc.stderr else "")
        assert (tmp_path / "state" / "demo.yaml").exists()  # --state-dir is kept


    def test_sigterm_stops_the_daemon_too(self, tmp_path: Path) -> None:
        """Whatever stops the demo (here SIGTERM mid-run) stops its daemon, in order."""
        state = tmp_path / "state"
        proc = demo("--duration", "60", "--state-dir", str(state))
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("demo t="):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "mfo-actors demo: interrupted" in out
        with StateDirLock(state):  # the daemon is gone: its lock is free
            pass


    def test_kill_9_of_the_demo_stops_its_daemon(self, tmp_path: Path) -> None:
        """The demo cannot stop its daemon when it is killed outright: the kernel does
        (parent-death signal), so no daemon keeps running against a dead server."""
        state = tmp_path / "state"
        proc = demo("--duration", "60", "--state-dir", str(state))
        daemon: int | None = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("demo t="):
                    break
            daemon = running_daemon_pid(state)
            assert daemon is not None
            proc.kill()
            proc.wait(timeout=30)
            wait_for(lambda: not alive(daemon), what="the orphaned daemon to stop")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
            if daemon is not None and alive(daemon):  # the test failed: leave no orphan
                os.kill(daemon, signal.SIGKILL)
        with StateDirLock(state):  # nobody holds the state dir any more
            pass


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie nobody reaped yet has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_package_without_the_example_flows_refuses_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A package built without flows/ (mfo_actors/demo/flows is a link to it) must not run a
    demo with no flows and still say OK."""
    monkeypatch.setattr(demo_run, "example_flows_dir", lambda: tmp_path / "flows")
    with pytest.raises(UserError, match="the example flows are missing from this install"):
        run_demo(DemoOptions(duration=1))
    (tmp_path / "flows").mkdir()
    with pytest.raises(UserError, match="flows are missing"):
        run_demo(DemoOptions(duration=1))


class TestProviders:
    def test_deliveries_are_signed_like_the_providers_sign(self) -> None:
        """Our verifier accepts every normal delivery and refuses the forged one."""
        deliveries = make_deliveries(200)
        routes = {
            "app": VerifyConfig(scheme="standard-webhooks", secret=STANDARD_WEBHOOKS_SECRET),
            "github": VerifyConfig(scheme="github", secret=GITHUB_SECRET),
        }
        kinds = [d.kind for d in deliveries]
        assert kinds.count("forged") == 1 and kinds.count("malformed") == 1
        for d in deliveries:
            _path, headers = d.request()
            lowered = {k.lower(): v for k, v in headers.items()}
            if d.kind == "forged":
                with pytest.raises(SignatureError):
                    verify(routes[d.provider], lowered, d.body, now=time.time())
                continue
            verify(routes[d.provider], lowered, d.body, now=time.time())
            if d.kind == "normal":
                assert json.loads(d.body)["delivery"] == d.delivery_id
        malformed = next(d for d in deliveries if d.kind == "malformed")
        with pytest.raises(ValueError):
            json.loads(malformed.body)
        assert len({d.delivery_id for d in deliveries}) == 200


class TestVerdict:
    def test_lost_event_fails(self) -> None:
        verdict = Verdict(accepted=3, missing=["b"], repeated=[], leaked=[])
        assert not verdict.ok and verdict.line().startswith("verdict: FAILED: 1 of 3")

    def test_refused_delivery_reaching_the_server_fails(self) -> None:
        assert not Verdict(accepted=3, missing=[], repeated=[], leaked=["d"]).ok

    def test_twice_is_not_lost(self) -> None:
        verdict = Verdict(accepted=3, missing=[], repeated=["a"], leaked=[])
        assert verdict.ok and "arrived twice with the same Idempotency-Key" in verdict.line()


METRICS = """\
# TYPE mfo_events_received_total counter
mfo_events_received_total{instance="demo",source="webhook"} 10.0
mfo_events_received_total{instance="demo",source="github"} 5.0
# TYPE mfo_events_rejected_total counter
mfo_events_rejected_total{instance="demo",reason="duplicate",source="github"} 2.0
mfo_events_rejected_total{instance="demo",reason="signature",source="webhook"} 1.0
# TYPE mfo_events_forwarded_total counter
mfo_events_forwarded_total{instance="demo"} 12.0
# TYPE mfo_outbox_depth gauge
mfo_outbox_depth{instance="demo"} 3.0
# TYPE mfo_breaker_state gauge
mfo_breaker_state{instance="demo",upstream="http://x"} 2.0
# TYPE mfo_token_refresh_total counter
mfo_token_refresh_total{instance="demo",result="ok"} 2.0
mfo_token_refresh_total{instance="demo",result="error"} 1.0
# TYPE mfo_flow_runs_total counter
mfo_flow_runs_total{flow="A",instance="demo",status="done"} 4.0
mfo_flow_runs_total{flow="B",instance="demo",status="done"} 1.0
"""


class TestView:
    def test_metrics_become_the_counts_shown(self) -> None:
        snap = parse_metrics(METRICS)
        assert (snap.stored, snap.duplicate, snap.refused, snap.received) == (15, 2, 1, 18)
        assert (snap.delivered, snap.pending, snap.breaker) == (12, 3, "OPEN")
        assert (snap.logins_ok, snap.logins_failed, snap.runs) == (2, 1, {"done": 5})

    def test_terminal_view_is_redrawn_in_place(self) -> None:
        out = io.StringIO()
        view = LiveView(out, tty=True)
        view.show(Snapshot(stored=1), Tally(), 0.1, "sending", force=True)
        first = out.getvalue()
        assert "\x1b[" not in first and "stored 1" in first
        view.show(Snapshot(stored=2), Tally(), 0.2, "sending", force=True)
        redraw = out.getvalue()[len(first):]
        assert redraw.startswith(f"\x1b[{first.count(chr(10))}F\x1b[J") and "stored 2" in redraw

    def test_plain_view_prints_periodic_lines(self) -> None:
        out = io.StringIO()
        view = LiveView(out, tty=False)
        view.show(Snapshot(stored=1), Tally(), 0.1, "sending")
        view.show(Snapshot(stored=2), Tally(), 0.2, "sending")  # too soon: not printed
        assert out.getvalue().count("\n") == 1 and "\x1b" not in out.getvalue()
        assert out.getvalue().startswith("demo t=0.1s phase=sending ")
