"""``mfo-actors demo``: watch a real instance receive, store and deliver webhooks.

No config file, no network beyond loopback, nothing left behind (a temporary state dir,
unless ``--state-dir``). Exit 0 when every accepted event reached the reference server, 1
when one did not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mfo_actors.errors import UserError

__all__ = ["configure"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start the reference MFO server and a real daemon (the same code as `run`) with two "
        "signed webhook routes (Standard Webhooks and GitHub) and the example flows, play "
        "providers sending a few hundred webhooks (with provider retries, a forged "
        "signature, a malformed body) through an injected upstream outage, and show what "
        "happens live. Ends with a summary and a verdict: every accepted event reached the "
        "server exactly once by id (exit 0), or not (exit 1)."
    )
    parser.add_argument("--duration", type=_positive, default=15.0, metavar="SECONDS",
                        help="how long the providers send (default %(default)g)")
    parser.add_argument("--rate", type=_positive, default=30.0, metavar="PER_SECOND",
                        help="webhooks per second (default %(default)g)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio",
                        help="async backend of the daemon and the demo (default %(default)s)")
    parser.add_argument("--keep-running", action="store_true",
                        help="afterwards, leave the daemon and the server up and print "
                             "ready-to-paste signed curl commands (Ctrl-C stops)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="keep the instance (config, store, log) here instead of a "
                             "temporary dir that is removed at the end")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.duration * args.rate > 100_000:
        raise UserError("demo: --duration x --rate is over 100000 webhooks; try fewer")
    from mfo_actors.demo import DemoOptions, run_demo
    from mfo_actors.observability import configure_logging

    # The reference server runs in this process: its request log would cover the view.
    configure_logging(level="error", fmt="console", stream=sys.stderr)
    return run_demo(DemoOptions(duration=args.duration, rate=args.rate, backend=args.backend,
                                keep_running=args.keep_running, state_dir=args.state_dir))
