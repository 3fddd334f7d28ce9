"""Start-up checks that turn the environment's refusals into one-line user errors, early.

``run`` must not print a page of log lines, tracebacks and restarts because port 8080 is
taken: before any actor starts (and before the first log line), the daemon binds each address
its config names and lets go at once. A port in use or not permitted, or a host that is not
this machine's, is a :class:`~mfo_actors.errors.ListenError` naming the file and section.
The server actors check again when they bind for real (a port taken in between is the same
one-line error, and the supervisor does not restart an actor that cannot start).
"""

from __future__ import annotations

import contextlib
import socket

from mfo_actors.config import InstanceConfig
from mfo_actors.errors import ListenError

__all__ = ["check_listen_addresses"]


def check_listen_addresses(cfg: InstanceConfig) -> None:
    """Bind and listen on every address the webhook listener and the admin port will use.

    Binds as ``anyio.create_tcp_listener`` does (every address the host resolves to,
    ``SO_REUSEADDR``, IPv6 only on IPv6 sockets), all at once, so the listener and the admin
    port configured on one port are caught too. Port 0 (any free port) is not checked.

    Raises:
      ListenError: an address cannot be listened on.
    """
    wanted: list[tuple[str, str, int]] = []
    if cfg.webhook_listener.enabled:
        wanted.append(("webhook_listener", cfg.webhook_listener.host,
                       int(cfg.webhook_listener.port)))
    if cfg.admin.enabled:
        wanted.append(("admin", cfg.admin.host, int(cfg.admin.port)))
    with contextlib.ExitStack() as held:
        for section, host, port in wanted:
            if port == 0:
                continue
            where = f"{cfg.source_file or '<config>'}: {section}"
            try:
                for sock in _listen_all(host, port):
                    held.callback(sock.close)
            except OSError as exc:
                raise ListenError(where, host, port, exc) from None


def _listen_all(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of *host*; closed again if one fails."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    opened: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(1)  # a bound, not listening, socket would not clash with a sibling's
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened
