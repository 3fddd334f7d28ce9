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

from hypothesis import HealthCheck, settings

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
    plain = [targets.test_config_loader_fails_only_with_config_errors,
             targets.test_flow_loader_fails_only_with_config_errors]
    with_target = [targets.test_http_core_answers_or_closes,
                   targets.test_http_core_survives_random_bytes]
    counts: dict[str, int] = {}
    end = time.monotonic() + args.minutes * 60
    with HttpTarget("asyncio").running() as http_asyncio, HttpTarget("trio").running() as http_trio:
        while time.monotonic() < end:
            for fn in plain:
                more(fn)()
                counts[fn.__name__] = counts.get(fn.__name__, 0) + ROUND
            for fn in with_target:
                for target in (http_asyncio, http_trio):
                    more(fn)(target)
                    name = f"{fn.__name__}[{target.backend}]"
                    counts[name] = counts.get(name, 0) + ROUND
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
