"""What the demo shows: the daemon's counters (from its ``/metrics``), live, then a summary.

On a terminal the view is redrawn in place a few times a second; otherwise (a pipe, CI, a
log file) it prints one plain line every few seconds. No library draws it: ``rich`` would
do it in fewer lines, but structlog imports rich whenever it is installed, which would add
~50 ms to every ``mfo-actors`` command (measured, see pyproject.toml); two ANSI sequences do.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from mfo_actors.demo._providers import Tally

__all__ = ["LiveView", "Snapshot", "parse_metrics", "summary_lines"]

TTY_REFRESH = 0.25  # seconds between redraws on a terminal
PLAIN_EVERY = 2.0  # seconds between plain lines otherwise
_BREAKER = {0: "closed", 1: "half-open", 2: "OPEN"}


@dataclass
class Snapshot:
    """The daemon's counters at one moment (all zero until its first scrape)."""

    stored: int = 0  # accepted and on disk (mfo_events_received_total)
    rejected: dict[str, int] = field(default_factory=dict)  # by reason, duplicates included
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    pending: int = 0
    breaker: str = "closed"
    logins_ok: int = 0
    logins_failed: int = 0
    runs: dict[str, int] = field(default_factory=dict)  # finished runs by status
    runs_open: int = 0  # new or running (from the store)

    @property
    def duplicate(self) -> int:
        return self.rejected.get("duplicate", 0)

    @property
    def refused(self) -> int:
        """Requests refused (401, 400, 413 ...), provider retries not counted."""
        return sum(n for reason, n in self.rejected.items() if reason != "duplicate")

    @property
    def received(self) -> int:
        """Every webhook request that reached a route."""
        return self.stored + sum(self.rejected.values())


def parse_metrics(text: str) -> Snapshot:
    """A :class:`Snapshot` from the Prometheus text of the admin port's ``/metrics``."""
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "mfo_events_received_total":
                snap.stored += value
            elif name == "mfo_events_rejected_total":
                reason = labels.get("reason", "?")
                snap.rejected[reason] = snap.rejected.get(reason, 0) + value
            elif name == "mfo_events_forwarded_total":
                snap.delivered += value
            elif name == "mfo_events_retried_total":
                snap.retried += value
            elif name == "mfo_events_dead_total":
                snap.dead += value
            elif name == "mfo_outbox_depth":
                snap.pending = value
            elif name == "mfo_breaker_state":
                snap.breaker = _BREAKER.get(value, str(value))
            elif name == "mfo_token_refresh_total":
                if labels.get("result") == "ok":
                    snap.logins_ok += value
                else:
                    snap.logins_failed += value
            elif name == "mfo_flow_runs_total":
                status = labels.get("status", "?")
                snap.runs[status] = snap.runs.get(status, 0) + value
    return snap


def _runs(snap: Snapshot) -> str:
    parts = [f"{status} {n}" for status, n in sorted(snap.runs.items())]
    return ", ".join([*parts, f"open {snap.runs_open}"])


def _status_lines(snap: Snapshot, tally: Tally, elapsed: float, phase: str) -> list[str]:
    rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(snap.rejected.items())
                         if reason != "duplicate" and n) or "none"
    return [
        f"mfo-actors demo  {elapsed:5.1f}s  {phase}",
        f"  providers  sent {tally.sent}  deliveries {tally.deliveries}",
        f"  listener   received {snap.received}  stored {snap.stored}  "
        f"duplicate {snap.duplicate}  rejected {snap.refused} ({rejected})",
        f"  forwarder  delivered {snap.delivered}  pending {snap.pending}  "
        f"retried {snap.retried}  dead {snap.dead}  breaker {snap.breaker}",
        f"  auth       logins {snap.logins_ok} ok, {snap.logins_failed} failed",
        f"  flows      runs: {_runs(snap)}",
    ]


def _plain_line(snap: Snapshot, tally: Tally, elapsed: float, phase: str) -> str:
    return (f"demo t={elapsed:.1f}s phase={phase.split()[0]} sent={tally.sent} "
            f"received={snap.received} stored={snap.stored} duplicate={snap.duplicate} "
            f"rejected={snap.refused} delivered={snap.delivered} pending={snap.pending} "
            f"retried={snap.retried} dead={snap.dead} breaker={snap.breaker} "
            f"logins={snap.logins_ok} runs=[{_runs(snap)}]")


class LiveView:
    """Shows the counters: redrawn in place on a terminal, plain periodic lines otherwise."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self._out = stream or sys.stdout
        self.tty = self._out.isatty() if tty is None else tty
        self.interval = TTY_REFRESH if self.tty else PLAIN_EVERY
        self._drawn = 0  # lines on screen from the last redraw
        self._last = float("-inf")

    def show(self, snap: Snapshot, tally: Tally, elapsed: float, phase: str, *,
             force: bool = False) -> None:
        """Draw (TTY) or print a line (otherwise) if it is time to, or if *force*."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if not self.tty:
            print(_plain_line(snap, tally, elapsed, phase), file=self._out, flush=True)
            return
        width = shutil.get_terminal_size().columns - 1
        # Cut to the terminal's width: a wrapped line would take two rows, and the redraw
        # below moves up by lines.
        lines = [line[:width] for line in _status_lines(snap, tally, elapsed, phase)]
        # Up to the first line we drew last time, clear to the end of the screen, redraw.
        up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self._out.write(up + "\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)


def summary_lines(snap: Snapshot, tally: Tally, *, wall: float) -> list[str]:
    """The closing table: what the providers saw beside what the daemon counted."""
    rows = [
        ("webhook deliveries", str(tally.deliveries), ""),
        ("requests sent", str(tally.sent), f"received {snap.received}"),
        ("accepted (202)", str(len(tally.accepted)), f"stored {snap.stored}"),
        ("provider retries (200 duplicate)", str(tally.duplicates),
         f"duplicate {snap.duplicate}"),
        ("forged signature (401)", str(tally.rejected_signature),
         f"signature {snap.rejected.get('signature', 0)}"),
        ("malformed body (400)", str(tally.rejected_body), f"json {snap.rejected.get('json', 0)}"),
        ("answered 503 / no answer, resent", str(tally.unavailable), ""),
        ("delivered upstream", "", f"delivered {snap.delivered}"),
        ("attempts retried", "", f"retried {snap.retried}"),
        ("dead-lettered", "", f"dead {snap.dead}"),
        ("still pending", "", f"pending {snap.pending}"),
        ("token logins", "", f"{snap.logins_ok} ok, {snap.logins_failed} failed"),
        ("flow runs", "", _runs(snap)),
    ]
    width = max(len(r[0]) for r in rows)
    side = max(len(r[1]) for r in rows)
    lines = [f"summary ({wall:.1f}s)", f"  {'':<{width}}  {'providers':>{max(side, 9)}}  daemon"]
    lines += [f"  {what:<{width}}  {ours:>{max(side, 9)}}  {theirs}"
              for what, ours, theirs in rows]
    return lines
