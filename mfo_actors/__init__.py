"""mfo-actors: a durable webhook-to-MFO gateway and taskflow runner built as anyio actors."""

# The one place the version is written (pyproject.toml reads it): a plain string, because
# importlib.metadata alone costs ~30 ms, more than the rest of ``mfo-actors --version``.
__version__ = "0.1.0"

__all__ = ["__version__"]
