"""The reference MFO (SLOP) server with fault injection (``mfo-actors mock-server``)."""

from mfo_actors.mock_server._app import MockMFOServer as MockMFOServer
from mfo_actors.mock_server._app import MockOptions as MockOptions
from mfo_actors.mock_server._app import MockStats as MockStats
from mfo_actors.mock_server._serve import serve_mock_server as serve_mock_server

__all__ = ["MockMFOServer", "MockOptions", "MockStats", "serve_mock_server"]
