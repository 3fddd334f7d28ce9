"""``mfo-actors demo``: the reference server, a real daemon, simulated providers, a verdict.

The daemon is the production one: ``python -m mfo_actors run --config <state>/demo.yaml``
in a child process (its own session, its logs in ``<state>/daemon.log``), exactly what a
user runs. The reference MFO server runs in this process. The providers send signed
webhooks at ``--rate`` for ``--duration`` seconds; part way through, the server goes down
for a few seconds (every ``/api`` and ``/auth`` request answered 503). Then the demo waits
for the daemon to deliver its backlog and compares, by event id, what was accepted (202)
with what the server received (``GET /_mock/events``): the verdict.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.to_thread
import httpx

from mfo_actors.config import load_config
from mfo_actors.demo._providers import Tally, make_deliveries, play
from mfo_actors.demo._setup import (
    APP_PATH,
    DEMO_EMAIL,
    DEMO_PASSWORD,
    GITHUB_PATH,
    GITHUB_SECRET,
    STANDARD_WEBHOOKS_SECRET,
    DemoSetup,
    example_flows_dir,
    write_instance,
)
from mfo_actors.demo._view import LiveView, Snapshot, parse_metrics, summary_lines
from mfo_actors.errors import UserError
from mfo_actors.mock_server import MockMFOServer, MockOptions, serve_mock_server
from mfo_actors.store import open_store

__all__ = ["DemoOptions", "Verdict", "run_demo"]

READY_DEADLINE = 30.0  # seconds for the daemon to answer /readyz 200 (a loaded CI machine)
DRAIN_DEADLINE = 30.0  # seconds after the providers stop for the backlog to be delivered
STOP_DEADLINE = 15.0  # seconds for the daemon's graceful stop (its shutdown_timeout is 10 s)
TOKEN_LIFETIME = 8.0  # seconds: short, so the live view shows the token being renewed
MAX_OUTAGE = 4.0  # seconds of upstream outage, at most
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the CLI reports an interruption


@dataclass(frozen=True)
class DemoOptions:
    """The ``demo`` command's flags."""

    duration: float = 15.0
    rate: float = 30.0
    backend: str = "asyncio"
    keep_running: bool = False
    state_dir: Path | None = None


@dataclass(frozen=True)
class Verdict:
    """Accepted events against what the reference server received, by event id."""

    accepted: int
    missing: list[str]  # accepted, never received
    repeated: list[str]  # received more than once (same Idempotency-Key)
    leaked: list[str]  # delivery ids refused on purpose that reached the server anyway

    @property
    def ok(self) -> bool:
        return not self.missing and not self.leaked

    def line(self) -> str:
        if self.ok and not self.repeated:
            return (f"verdict: OK: every accepted event ({self.accepted}) reached the server "
                    "exactly once by id; nothing refused reached it")
        if self.ok:
            return (f"verdict: OK: every accepted event ({self.accepted}) reached the server; "
                    f"{len(self.repeated)} arrived twice with the same Idempotency-Key "
                    "(at least once, never lost)")
        return (f"verdict: FAILED: {len(self.missing)} of {self.accepted} accepted events "
                f"never reached the server, {len(self.leaked)} refused deliveries did")


def run_demo(options: DemoOptions, *, out: TextIO | None = None) -> int:
    """Run the demo; return the exit code (0: nothing lost, 1: something was).

    Raises:
      UserError: this install has no example flows (a package built without ``flows/``).
    """
    flows = example_flows_dir()
    if not flows.is_dir() or not any(flows.glob("*.yaml")):
        raise UserError(f"the example flows are missing from this install ({flows}): the "
                        "package was built without the repository's flows/ directory")
    stream = out or sys.stdout
    temporary = options.state_dir is None
    state_dir = (Path(tempfile.mkdtemp(prefix="mfo-actors-demo-")) if temporary
                 else Path(options.state_dir or "").absolute())
    try:
        code: int = anyio.run(partial(_demo, options, state_dir, stream),
                              backend=options.backend)
        return code
    finally:
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


class _Result:
    """How the demo ended: its exit code once known, and whether a signal cut it short."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.waiting = False  # --keep-running: done, waiting for Ctrl-C
        self.interrupted = False


async def _demo(options: DemoOptions, state_dir: Path, out: TextIO) -> int:
    """Run everything; SIGINT, SIGTERM or SIGHUP (a closed terminal) end it in order.

    The daemon runs in its own session (so Ctrl-C is not delivered to it twice); these
    handlers make sure the demo always stops it, whatever stops the demo.
    """
    result = _Result()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, signals, tg.cancel_scope, result)
            await _run_all(options, state_dir, out, result)
            tg.cancel_scope.cancel()
    if result.interrupted and not result.waiting:
        print("mfo-actors demo: interrupted", file=out, flush=True)
        return EXIT_INTERRUPTED
    return result.code if result.code is not None else 1


async def _stop_on_signal(signals: Any, scope: anyio.CancelScope, result: _Result) -> None:
    async for _ in signals:
        result.interrupted = True
        scope.cancel()
        return


async def _run_all(options: DemoOptions, state_dir: Path, out: TextIO, result: _Result) -> None:
    app = MockMFOServer(MockOptions(email=DEMO_EMAIL, password=DEMO_PASSWORD,
                                    token_lifetime=TOKEN_LIFETIME, seed=1))
    async with anyio.create_task_group() as tg:
        upstream_port = await tg.start(partial(serve_mock_server, app, host="127.0.0.1",
                                               port=0))
        setup = write_instance(state_dir, upstream_port=upstream_port, backend=options.backend)
        print(f"mfo-actors demo: reference server {setup.upstream_url}, daemon "
              f"{setup.listener_url} (admin {setup.admin_url}), state {state_dir}", file=out)
        print(f"  daemon log: {setup.log_file}", file=out, flush=True)
        daemon = _start_daemon(setup)
        try:
            await _with_daemon(options, setup, daemon, out, result)
        finally:
            with anyio.CancelScope(shield=True):
                stopped = await _stop_daemon(daemon)
                if stopped != 0:
                    print(f"the daemon exited {stopped} (expected 0); see {setup.log_file}",
                          file=out)
                    result.code = 1
        tg.cancel_scope.cancel()


# The daemon's first step, before it becomes `mfo-actors run`: ask the kernel for SIGTERM
# when the demo dies, even by kill -9 (Linux prctl PR_SET_PDEATHSIG, kept across exec), so no
# daemon is left running against a dead reference server; then exec the real command. If the
# demo is already gone (the parent pid changed), do nothing. Elsewhere: just exec.
_EXIT_WITH_PARENT = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _start_daemon(setup: DemoSetup) -> subprocess.Popen[bytes]:
    """Start the daemon (see ``_EXIT_WITH_PARENT``).

    Started here, in the main thread, not through the event loop: the kernel's parent-death
    signal follows the thread that forked, and trio forks in a worker thread that ends when
    idle (the daemon would be stopped a few seconds in).
    """
    env = {k: v for k, v in os.environ.items()
           if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    command = [sys.executable, "-m", "mfo_actors", "run", "--config", str(setup.config)]
    with setup.log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _EXIT_WITH_PARENT, str(os.getpid()), *command[1:]],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the daemon in order
        )


async def _wait_exit(daemon: subprocess.Popen[bytes], seconds: float) -> int | None:
    """The daemon's exit code once it exits, or None after *seconds*."""
    try:
        return await anyio.to_thread.run_sync(partial(daemon.wait, timeout=seconds),
                                              abandon_on_cancel=True)
    except subprocess.TimeoutExpired:
        return None


async def _stop_daemon(daemon: subprocess.Popen[bytes]) -> int | None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        if await _wait_exit(daemon, STOP_DEADLINE) is None:
            daemon.kill()
            await _wait_exit(daemon, STOP_DEADLINE)
    return daemon.returncode


async def _wait_ready(setup: DemoSetup, daemon: subprocess.Popen[bytes],
                      admin: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        if daemon.poll() is not None:
            tail = setup.log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise UserError(f"the demo's daemon exited ({daemon.returncode}) before it was "
                            f"ready: {' | '.join(tail) or 'no output'}")
        try:
            if (await admin.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the demo's daemon was not ready within {READY_DEADLINE:g}s; "
                            f"see {setup.log_file}")
        await anyio.sleep(0.05)


async def _with_daemon(options: DemoOptions, setup: DemoSetup,
                       daemon: subprocess.Popen[bytes], out: TextIO, result: _Result) -> None:
    timeout = httpx.Timeout(10.0)
    async with httpx.AsyncClient(base_url=setup.admin_url, timeout=timeout) as admin, \
            httpx.AsyncClient(base_url=setup.listener_url, timeout=timeout) as listener, \
            httpx.AsyncClient(base_url=setup.upstream_url, timeout=timeout) as upstream:
        await _wait_ready(setup, daemon, admin)
        show = _Show(LiveView(out), admin, setup)
        tally = Tally()
        started = time.monotonic()
        deliveries = make_deliveries(max(2, round(options.duration * options.rate)))
        async with open_store(load_config(setup.config), must_exist=True) as store:
            show.store = store
            async with anyio.create_task_group() as tg:
                tg.start_soon(show.loop, tally, started)
                tg.start_soon(_outage, upstream, options, started, show)
                show.phase = f"sending {len(deliveries)} webhooks at {options.rate:g}/s"
                await play(listener, deliveries, rate=options.rate, tally=tally)
                show.phase = "draining the backlog"
                await _drain(show, upstream, tally)
                tg.cancel_scope.cancel()
            show.phase = "done"
            await show.refresh(tally, started, force=True)
        verdict = await _verdict(upstream, tally)
        for line in summary_lines(show.snapshot, tally, wall=time.monotonic() - started):
            print(line, file=out)
        for problem in tally.unexpected[:5]:
            print(f"  unexpected answer: {problem}", file=out)
        print(verdict.line(), file=out, flush=True)
        ok = verdict.ok and not tally.unexpected and not tally.duplicate_mismatch
        result.code = 0 if ok else 1
        if options.keep_running:
            _print_try_it(setup, out)
            result.waiting = True
            await anyio.sleep_forever()  # until a signal cancels us


class _Show:
    """Keeps the latest snapshot and the phase, and draws them."""

    def __init__(self, view: LiveView, admin: httpx.AsyncClient, setup: DemoSetup) -> None:
        self.view = view
        self.admin = admin
        self.setup = setup
        self.snapshot = Snapshot()
        self.phase = "starting"
        self.store: Any = None
        self._runs_checked = float("-inf")
        self._runs_open = 0

    async def refresh(self, tally: Tally, started: float, *, force: bool = False) -> None:
        try:
            snap = parse_metrics((await self.admin.get("/metrics")).text)
        except httpx.HTTPError:
            snap = self.snapshot  # keep showing the last one
        now = time.monotonic()
        if self.store is not None and now - self._runs_checked >= 1.0:
            self._runs_checked = now
            self._runs_open = sum([len(await self.store.list_runs(status=s, limit=100_000))
                                   for s in ("new", "active")])
        snap.runs_open = self._runs_open
        self.snapshot = snap
        self.view.show(snap, tally, now - started, self.phase, force=force)

    async def loop(self, tally: Tally, started: float) -> None:
        while True:
            await self.refresh(tally, started)
            await anyio.sleep(min(self.view.interval, 0.25))


async def _outage(upstream: httpx.AsyncClient, options: DemoOptions, started: float,
                  show: _Show) -> None:
    """Take the reference server down for a few seconds, a third of the way in."""
    length = min(MAX_OUTAGE, max(1.0, options.duration * 0.3))
    await anyio.sleep(max(0.0, started + options.duration * 0.35 - time.monotonic()))
    await upstream.post("/_mock/faults", json={"outage_for": length})
    before, show.phase = show.phase, f"upstream DOWN for {length:g}s (injected outage)"
    await anyio.sleep(length)
    if show.phase.startswith("upstream DOWN"):
        show.phase = before


async def _drain(show: _Show, upstream: httpx.AsyncClient, tally: Tally) -> None:
    """Wait until every accepted event is delivered, the outbox is empty and the flow runs
    they started have finished (or time is up: the verdict then tells what is missing)."""
    deadline = time.monotonic() + DRAIN_DEADLINE
    while time.monotonic() < deadline:
        snap = show.snapshot
        stats = (await upstream.get("/_mock/stats")).json()
        if snap.pending == 0 and snap.delivered >= snap.stored >= len(tally.accepted) \
                and stats["unique_event_ids"] >= len(tally.accepted) and snap.runs_open == 0:
            return
        await anyio.sleep(0.2)


async def _verdict(upstream: httpx.AsyncClient, tally: Tally) -> Verdict:
    """What reached the reference server, by Idempotency-Key, against what was accepted."""
    events = (await upstream.get("/_mock/events")).json()["events"]
    count = {e["idempotency_key"]: e["count"] for e in events}
    reached = {_delivery_of(e["body"]) for e in events}
    accepted = set(tally.accepted.values())
    return Verdict(
        accepted=len(accepted),
        missing=sorted(i for i in accepted if i not in count),
        repeated=sorted(i for i in accepted if count.get(i, 0) > 1),
        leaked=sorted(d for d in tally.refused if d in reached),
    )


def _delivery_of(body: Any) -> Any:
    payload = body.get("payload") if isinstance(body, dict) else None
    return payload.get("delivery") if isinstance(payload, dict) else None


def _print_try_it(setup: DemoSetup, out: TextIO) -> None:
    """Ready-to-paste commands: signed webhooks (openssl signs at paste time) and the CLI."""
    key_hex = _whsec_hex(STANDARD_WEBHOOKS_SECRET)
    script = Path(sys.executable).parent / "mfo-actors"  # the venv's console script
    cli = str(script) if script.exists() else f"{sys.executable} -m mfo_actors"
    print(f"""
The daemon and the reference server keep running (Ctrl-C stops both). In another terminal:

# A user signs up (Standard Webhooks: id, timestamp and signature headers; UserSignupFlow runs)
body='{{"type":"user.signup","email":"ada@example.com","email_verified":true,"plan":"pro"}}'
id="msg_$(date +%s%N)"; ts="$(date +%s)"
sig="$(printf '%s' "$id.$ts.$body" | openssl dgst -sha256 -mac HMAC -macopt hexkey:{key_hex} -binary | base64)"
curl -s {setup.listener_url}{APP_PATH} -H 'content-type: application/json' -H "webhook-id: $id" -H "webhook-timestamp: $ts" -H "webhook-signature: v1,$sig" -d "$body"; echo

# A GitHub issue event (X-Hub-Signature-256 over the body)
body='{{"action":"opened","issue":{{"title":"Checkout is slow"}}}}'
sig="$(printf '%s' "$body" | openssl dgst -sha256 -hmac '{GITHUB_SECRET}' | sed 's/^.* //')"
curl -s {setup.listener_url}{GITHUB_PATH} -H 'content-type: application/json' -H 'X-GitHub-Event: issues' -H "X-GitHub-Delivery: $(date +%s%N)" -H "X-Hub-Signature-256: sha256=$sig" -d "$body"; echo

# Look at what happened
{cli} events list --config {setup.config}
{cli} events show EVENT_ID --config {setup.config}
{cli} flows list --config {setup.config}
{cli} runs list --config {setup.config}
curl -s {setup.admin_url}/metrics | grep ^mfo_events
curl -s {setup.upstream_url}/_mock/stats; echo
""", file=out, flush=True)  # noqa: E501 (commands stay on one line, ready to paste)


def _whsec_hex(secret: str) -> str:
    """The HMAC key of a ``whsec_`` secret in hex, as ``openssl -macopt hexkey:`` takes it."""
    return base64.b64decode(secret.removeprefix("whsec_")).hex()
