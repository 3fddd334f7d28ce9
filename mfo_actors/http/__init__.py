"""A small HTTP/1.1 core: httptools' parser over anyio sockets (no MFO knowledge): the server that
the listener, the admin port and the reference server share, and a lean client for one upstream."""

from mfo_actors.http._client import ClientResponse as ClientResponse
from mfo_actors.http._client import ExchangeError as ExchangeError
from mfo_actors.http._client import UpstreamPool as UpstreamPool
from mfo_actors.http._client import header_line as header_line
from mfo_actors.http._limits import HttpError as HttpError
from mfo_actors.http._limits import HttpLimits as HttpLimits
from mfo_actors.http._limits import error_response as error_response
from mfo_actors.http._server import HttpServer as HttpServer
from mfo_actors.http._server import serve_http as serve_http
from mfo_actors.http._types import Handler as Handler
from mfo_actors.http._types import HeadCheck as HeadCheck
from mfo_actors.http._types import Request as Request
from mfo_actors.http._types import RequestHead as RequestHead
from mfo_actors.http._types import Response as Response

__all__ = [
    "ClientResponse",
    "ExchangeError",
    "Handler",
    "HeadCheck",
    "HttpError",
    "HttpLimits",
    "HttpServer",
    "Request",
    "RequestHead",
    "Response",
    "UpstreamPool",
    "error_response",
    "header_line",
    "serve_http",
]
