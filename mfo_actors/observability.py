"""Logging, configured once per process: structlog JSON lines (or console) with secrets redacted.

Every event carries ``instance`` and ``actor`` (bound through contextvars by the daemon and the
supervisor). Redaction happens in one processor that runs last before rendering, so no code
path can forget it: values resolved from secret references (registered by the config loader
through :func:`register_secret`), and any field whose name says it holds a credential
(``authorization``, ``password``, ``token``, ``secret`` ...), nested dicts and lists included.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "redact",
    "redact_processor",
    "register_secret",
]

REDACTED = "[REDACTED]"
# Field names that hold credentials whatever their value looks like.
_SENSITIVE_KEY = re.compile(
    r"(^|[_-])(authorization|password|passwd|secret|token|api[_-]?key|cookie|signature)$|"
    r"^(x-hub-signature(-256)?|webhook-signature|proxy-authorization)$",
    re.IGNORECASE,
)
# Bearer tokens in free text ("Authorization: Bearer abc").
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """Remember *value* so that it never appears in a log line, wherever it turns up."""
    global _secret_pattern
    if len(value) < _MIN_SECRET_LEN:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first, so a secret that contains another is redacted whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def _redact_text(text: str) -> str:
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    if "earer" in text or "asic" in text:
        text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return text


def redact(value: Any, key: str | None = None) -> Any:
    """Return *value* with secrets replaced by ``[REDACTED]`` (recursing into dicts and lists)."""
    if key is not None and _SENSITIVE_KEY.search(key) and value not in (None, "", b""):
        return REDACTED
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, bytes):
        return _redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, BaseException):
        return _redact_text(repr(value))
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every field of the event (see :func:`redact`)."""
    for key in list(event_dict):
        event_dict[key] = redact(event_dict[key], key)
    return event_dict


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["json", "console"] | None = None,
    instance: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for this process; call once, from the entry point.

    Args:
      level: Minimum level: debug, info, warning or error.
      fmt: ``json`` lines or ``console``; default JSON unless *stream* is a TTY.
      instance: Bound to every event as ``instance``.
      stream: Where lines go (default ``sys.stderr``, which systemd's journal captures).
    """
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if fmt == "json" else _identity,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if instance is not None:
        structlog.contextvars.bind_contextvars(instance=instance)


def _identity(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
              ) -> MutableMapping[str, Any]:
    return event_dict


def get_logger(name: str) -> Any:
    """A structlog logger named after its module (``mfo_actors.actors.forwarder``)."""
    return structlog.get_logger(name)
