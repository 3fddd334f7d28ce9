"""The forwarder's tests (``tests/test_forwarder.py``) again, unchanged, with every event sent
by the lean sender, the daemon's default, instead of the httpx-based ``ClientSender``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mfo_actors.actors import forwarder as forwarder_module
from mfo_actors.actors._delivery import SenderFactory
from mfo_actors.actors._lean_sender import lean_senders
from mfo_actors.client import BaseClient
from mfo_actors.client._transport import total_timeout
from mfo_actors.runtime import Clock
from tests.test_forwarder import *  # noqa: F403  (the same tests, collected again here)

# The whole rerun is in the slow set (~25 s): the fast set keeps the lean sender's own tests
# (test_lean_sender.py compares it with ClientSender answer by answer, test_http_client.py).
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _lean_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarder's default sender becomes the lean one (as the daemon wires it)."""

    def senders(client: BaseClient, clock: Clock,
                http_factory: Callable[[], Any] | None = None) -> SenderFactory:
        return lean_senders(client, clock, timeout=total_timeout(client.http))

    monkeypatch.setattr(forwarder_module, "client_senders", senders)
