"""Long fuzz runs: ``python -m tests.fuzz --minutes 10 [--socket-requests 20000]``.

Repeats the hypothesis targets of ``test_fuzz_targets.py`` (1,000 examples a round, fresh
seeds each round) until the time is up, then, with ``--socket-requests``, runs the
socket-level fuzzer against a real daemon on asyncio+uvloop, asyncio and trio. Prints the
example counts, and the RSS and fd figures of each daemon.
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, given, settings

from tests.fuzz import test_fuzz_targets as targets
from tests.fuzz.harness import HttpTarget
from tests.fuzz.socket_fuzz import BACKENDS, run_socket_fuzz

ROUND = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--socket-requests", type=int, default=0,
                        help="mutated requests per backend for the daemon fuzzer (0: skip)")
    args = parser.parse_args(argv)
    more = settings(max_examples=ROUND, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    plain = {"config_loader": more(given(**targets.CONFIG_TEXT)(targets.config_text)),
             "flow_loader": more(given(**targets.FLOW_TEXT)(targets.flow_text))}
    with_target = {"http_mutated": more(given(**targets.HTTP_MUTATED)(targets.http_mutated)),
                   "http_random": more(given(**targets.HTTP_RANDOM)(targets.http_random))}
    counts: dict[str, int] = {}
    end = time.monotonic() + args.minutes * 60
    with HttpTarget("asyncio").running() as on_asyncio, HttpTarget("trio").running() as on_trio:
        while time.monotonic() < end:
            for name, fn in plain.items():
                fn()
                counts[name] = counts.get(name, 0) + ROUND
            for name, fn in with_target.items():
                for target in (on_asyncio, on_trio):
                    fn(target)
                    key = f"{name}[{target.backend}]"
                    counts[key] = counts.get(key, 0) + ROUND
    for name, n in counts.items():
        print(f"{name:60s} {n:>8,d} examples, no failure")
    if args.socket_requests:
        for backend in BACKENDS:
            report = run_socket_fuzz(backend, requests=args.socket_requests)
            print(report.line())
            if not report.ok:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
