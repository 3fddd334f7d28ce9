"""A daemon that cannot start says why in one line on stderr, exits 78 (EX_CONFIG), and is
not restarted.

Each test starts ``mfo-actors run`` as a real process with a real config whose environment
refuses it something (a port, the state dir, the store file, a secret file), and checks the
whole of stderr: exactly one line, naming the problem, no traceback, no restart.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mfo_actors.actors.admin import AdminActor
from mfo_actors.commands.run import EXIT_CONFIG
from mfo_actors.config import AdminConfig, Port
from mfo_actors.errors import ListenError
from mfo_actors.runtime import ReadySignal
from tests.helpers import free_port, write_config


def run_daemon(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfo_actors", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 78 and a single ``mfo-actors: ...`` line holding every fragment."""
    assert result.returncode == EXIT_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("mfo-actors: ")
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stderr and "restart" not in result.stderr
    return line


@contextmanager
def port_taken() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


class TestListenAddresses:
    def test_listener_port_in_use(self, tmp_path: Path) -> None:
        with port_taken() as port:
            config = write_config(tmp_path, webhook_listener={
                "host": "127.0.0.1", "port": port, "path": "/webhook"})
            result = run_daemon(config)
        assert_one_line_error(result, f"{config}: webhook_listener: cannot listen on "
                                      f"127.0.0.1:{port}: address already in use")
        assert not (tmp_path / "state" / "store.sqlite3").exists()  # nothing was started

    def test_admin_port_in_use(self, tmp_path: Path) -> None:
        with port_taken() as port:
            config = write_config(tmp_path, admin={"host": "127.0.0.1", "port": port})
            result = run_daemon(config)
        assert_one_line_error(result, f"{config}: admin: cannot listen on 127.0.0.1:{port}")

    def test_listener_and_admin_on_one_port(self, tmp_path: Path) -> None:
        port = free_port()
        config = write_config(
            tmp_path, webhook_listener={"host": "127.0.0.1", "port": port, "path": "/webhook"},
            admin={"host": "127.0.0.1", "port": port})
        assert_one_line_error(run_daemon(config), "admin: cannot listen on",
                              "address already in use")

    def test_address_not_on_this_host(self, tmp_path: Path) -> None:
        """192.0.2.1 (TEST-NET-1, RFC 5737) is never a local address; nothing is sent to it."""
        config = write_config(tmp_path, admin={"host": "192.0.2.1", "port": free_port()})
        assert_one_line_error(run_daemon(config), "admin: cannot listen on 192.0.2.1:",
                              "no such address on this host")

    def test_permission_denied_names_the_fix(self) -> None:
        """EACCES (a port below 1024 without the capability) says what would allow it."""
        err = ListenError("x.yaml: webhook_listener", "0.0.0.0", 80,
                          PermissionError(errno.EACCES, "Permission denied"))
        assert str(err) == ("x.yaml: webhook_listener: cannot listen on 0.0.0.0:80: permission "
                            "denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)")


class TestServerActorBind:
    """The second line of defence: a port taken after the pre-flight check."""

    pytestmark = pytest.mark.anyio

    async def test_bind_failure_is_a_listen_error(self) -> None:
        async def readiness() -> tuple[bool, dict[str, Any]]:
            return True, {}

        with port_taken() as port:
            actor = AdminActor(AdminConfig(host="127.0.0.1", port=Port(port)), instance="t",
                               readiness=readiness, config_file="t.yaml")
            with pytest.raises(ListenError, match=f"t.yaml: admin: cannot listen on "
                                                  f"127.0.0.1:{port}: address already in use"):
                await actor.run(ReadySignal())


class TestStateAndStore:
    def test_state_dir_cannot_be_created(self, tmp_path: Path) -> None:
        """A file where the state dir should be (root passes permission checks, not this)."""
        (tmp_path / "blocker").write_text("")
        config = write_config(tmp_path, state_dir=str(tmp_path / "blocker" / "state"))
        assert_one_line_error(run_daemon(config),
                              f"cannot use state_dir {tmp_path / 'blocker' / 'state'}")

    def test_corrupt_store_file(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        store = tmp_path / "state" / "store.sqlite3"
        store.parent.mkdir()
        store.write_bytes(b"\x00garbage, not SQLite" * 256)
        line = assert_one_line_error(run_daemon(config), f"{config}: store: {store}",
                                     "is not an mfo-actors store, or it is corrupt")
        assert store.read_bytes().startswith(b"\x00garbage"), line  # left as it was

    def test_another_programs_database(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        store = tmp_path / "state" / "store.sqlite3"
        store.parent.mkdir()
        conn = sqlite3.connect(store)
        conn.execute("CREATE TABLE invoices (n INTEGER)")
        conn.commit()
        conn.close()
        assert_one_line_error(run_daemon(config), "is not an mfo-actors store",
                              "tables: invoices")


class TestSecrets:
    def test_secret_file_unreadable(self, tmp_path: Path) -> None:
        """A directory where the secret file should be: unreadable even for root."""
        (tmp_path / "hook-secret").mkdir()
        config = write_config(tmp_path, webhook_listener={
            "host": "127.0.0.1", "port": free_port(), "routes": [{
                "path": "/gh", "source": "github",
                "verify": {"scheme": "github", "secret": "${file:hook-secret}"}}]})
        assert_one_line_error(run_daemon(config), "webhook_listener.routes[0].verify.secret",
                              "cannot read secret file")
