"""The demo's instance: a real config file, its secrets and free ports, in a state dir.

Everything the daemon needs is written to disk the way a user would write it (the config
refers to its secrets with ``${file:...}``), so ``mfo-actors events list --config
<state>/demo.yaml`` works from another terminal while the demo runs (``--keep-running``).
"""

from __future__ import annotations

import base64
import json
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEMO_EMAIL",
    "DEMO_PASSWORD",
    "GITHUB_SECRET",
    "STANDARD_WEBHOOKS_SECRET",
    "DemoSetup",
    "example_flows_dir",
    "write_instance",
]

# Demo credentials, printed in --keep-running's curl commands: not secrets of anything real.
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "mfo-demo-login"
STANDARD_WEBHOOKS_SECRET = "whsec_" + base64.b64encode(b"mfo-actors demo signing key").decode()
GITHUB_SECRET = "mfo-demo-github-secret"

APP_PATH = "/hooks/app"  # Standard Webhooks (Svix-style) provider: source "webhook"
GITHUB_PATH = "/hooks/github"  # GitHub-style HMAC: source "github"


@dataclass(frozen=True)
class DemoSetup:
    """Where the demo instance lives and how to reach it."""

    state_dir: Path
    config: Path
    listener_port: int
    admin_port: int
    upstream_port: int
    log_file: Path

    @property
    def listener_url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


def example_flows_dir() -> Path:
    """The example flows shipped in the package (a link to the repository's ``flows/``)."""
    return Path(__file__).resolve().parent / "flows"


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; the demo binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_instance(state_dir: Path, *, upstream_port: int, backend: str) -> DemoSetup:
    """Write ``demo.yaml`` and its secret files into *state_dir*; return where things are."""
    state_dir.mkdir(parents=True, exist_ok=True)
    secrets = state_dir / "secrets"
    secrets.mkdir(exist_ok=True)
    for name, value in (("mfo_password", DEMO_PASSWORD),
                        ("standard_webhooks_secret", STANDARD_WEBHOOKS_SECRET),
                        ("github_secret", GITHUB_SECRET)):
        (secrets / name).write_text(value + "\n", encoding="utf-8")
    setup = DemoSetup(state_dir=state_dir, config=state_dir / "demo.yaml",
                      listener_port=free_port(), admin_port=free_port(),
                      upstream_port=upstream_port, log_file=state_dir / "daemon.log")
    config = {
        "instance": "demo",
        "state_dir": str(state_dir),
        "async_backend": backend,
        "shutdown_timeout": "10s",
        "client": {
            "base_url": setup.upstream_url,
            "timeout": "5s",
            # Quick retries so the outage's backlog drains within seconds of the recovery.
            "retry": {"max_attempts": 30, "initial_backoff": "200ms", "max_backoff": "2s"},
            "circuit_breaker": {"failure_threshold": 5, "reset_timeout": "2s"},
        },
        "auth": {"mode": "login", "email": DEMO_EMAIL,
                 "password": "${file:secrets/mfo_password}", "login_max_backoff": "2s"},
        "webhook_listener": {
            "host": "127.0.0.1", "port": setup.listener_port,
            "routes": [
                {"path": APP_PATH, "source": "webhook",
                 "verify": {"scheme": "standard-webhooks",
                            "secret": "${file:secrets/standard_webhooks_secret}"}},
                {"path": GITHUB_PATH, "source": "github",
                 "verify": {"scheme": "github", "secret": "${file:secrets/github_secret}"}},
            ],
        },
        "admin": {"host": "127.0.0.1", "port": setup.admin_port},
        "forwarder": {"concurrency": 8},
        "flows": {"dir": str(example_flows_dir()), "concurrency": 4},
        "logging": {"level": "info", "format": "json", "summary_interval": "2s"},
    }
    header = ("# Written by `mfo-actors demo`: the demo's instance, a config like any other.\n"
              "# Inspect it while it runs: mfo-actors events list --config "
              f"{setup.config}\n")
    setup.config.write_text(header + json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return setup
