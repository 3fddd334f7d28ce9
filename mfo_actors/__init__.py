"""mfo-actors: a durable webhook-to-MFO gateway and taskflow runner built as anyio actors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mfo-actors")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
