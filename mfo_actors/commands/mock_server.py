"""``mfo-actors mock-server``: run the reference MFO server until SIGTERM or Ctrl-C.

Logs one structlog line per request (``mock.request`` with method, path, status, time), but
accepted events, which are counted in one ``mock.events`` line per second. Runs on uvloop
under asyncio when it is installed (as the daemon does): the server is the yardstick of the
delivery benchmarks, so it must not be their bottleneck.
Faults given here are the start-up faults; ``POST /_mock/faults`` changes them at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from functools import partial

import anyio
import anyio.abc

from mfo_actors.errors import UserError
from mfo_actors.mock_server import MockMFOServer, MockOptions, serve_mock_server
from mfo_actors.observability import configure_logging, get_logger

__all__ = ["configure", "run_mock_server"]

log = get_logger("mfo_actors.mock_server")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a local MFO server (SLOP endpoints under /api, login under /auth, "
        "event intake with Idempotency-Key dedupe) until SIGTERM. Faults can be changed at "
        "run time with POST /_mock/faults; counters are at GET /_mock/stats."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="port (default %(default)s; 0: any)")
    parser.add_argument("--email", default="demo@example.com",
                        help="login email (default %(default)s)")
    parser.add_argument("--password", default=os.environ.get("MFO_MOCK_PASSWORD", "demo"),
                        help="login password (default: $MFO_MOCK_PASSWORD, else 'demo')")
    parser.add_argument("--no-auth", action="store_true", help="serve /api without a token")
    parser.add_argument("--token-lifetime", type=float, default=3600.0, metavar="SECONDS",
                        help="lifetime of issued tokens (default %(default)s)")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of /api requests answered with --fail-status (0..1)")
    parser.add_argument("--fail-status", type=int, default=503,
                        help="status of injected failures (default %(default)s)")
    parser.add_argument("--retry-after", type=float, default=None, metavar="SECONDS",
                        help="Retry-After sent with injected failures and outages")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="delay added to every /api and /auth request")
    parser.add_argument("--outage-for", type=float, default=0.0, metavar="SECONDS",
                        help="full outage for this long after start-up")
    parser.add_argument("--outage-mode", choices=["503", "close"], default="503",
                        help="answer 503 during an outage, or drop the connection")
    parser.add_argument("--stream-delay", type=float, default=0.0, metavar="SECONDS",
                        help="pause between two SSE chunks of a streamed chat answer")
    parser.add_argument("--job-duration", type=float, default=0.0, metavar="SECONDS",
                        help="time a job takes from new to done (new for its first quarter)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the failure coin")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio",
                        help="async backend (default %(default)s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default="info")
    parser.add_argument("--log-format", choices=["json", "console"], default=None)
    parser.set_defaults(func=run_mock_server)


def _options(args: argparse.Namespace) -> MockOptions:
    if not 0.0 <= args.fail_rate <= 1.0:
        raise UserError(f"--fail-rate must be between 0 and 1, got {args.fail_rate}")
    if not 300 <= args.fail_status <= 599:  # 3xx: a redirect at a load balancer
        raise UserError(f"--fail-status must be 300..599, got {args.fail_status}")
    for flag in ("latency", "token_lifetime", "outage_for", "stream_delay", "job_duration"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must not be negative")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    return MockOptions(
        email=args.email, password=args.password, require_auth=not args.no_auth,
        token_lifetime=args.token_lifetime, fail_rate=args.fail_rate,
        fail_status=args.fail_status, retry_after=args.retry_after, latency=args.latency,
        outage_for=args.outage_for, outage_mode=args.outage_mode, seed=args.seed,
        stream_delay=args.stream_delay, job_duration=args.job_duration,
    )


async def _main(options: MockOptions, host: str, port: int) -> None:
    app = MockMFOServer(options)
    async with anyio.create_task_group() as tg:
        try:
            bound = await tg.start(partial(serve_mock_server, app, host=host, port=port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("mock.started", host=host, port=bound, auth=options.require_auth,
                 fail_rate=options.fail_rate, latency=options.latency)
        # Machine-readable line on stdout, for scripts that start us on port 0.
        print(f"listening on http://{host}:{bound}", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("mock.stopping", signal=signal.Signals(signum).name)
                break
        tg.cancel_scope.cancel()


def run_mock_server(args: argparse.Namespace) -> int:
    configure_logging(level=args.log_level, fmt=args.log_format, stream=sys.stderr)
    options = _options(args)
    backend_options = ({"use_uvloop": importlib.util.find_spec("uvloop") is not None}
                       if args.backend == "asyncio" else {})
    anyio.run(_main, options, args.host, args.port, backend=args.backend,
              backend_options=backend_options)
    return 0
