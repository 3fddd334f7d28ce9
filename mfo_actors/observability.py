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

import msgspec
import structlog
import structlog.tracebacks

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "is_sensitive_key",
    "redact",
    "redact_processor",
    "register_secret",
    "set_log_level",
]

REDACTED = "[REDACTED]"
# The last word of a name that holds a credential (a field, a header, a URL parameter).
_CREDENTIAL_WORDS = r"authorization|password|passwd|secret|token|api[_-]?key|cookie|signature"
# Field names that hold credentials whatever their value looks like.
_SENSITIVE_KEY = re.compile(
    rf"(^|[_-])({_CREDENTIAL_WORDS})$|"
    r"^(x-hub-signature(-256)?|webhook-signature|proxy-authorization)$",
    re.IGNORECASE,
)
# Bearer tokens in free text ("Authorization: Bearer abc"). The word after "bearer" is a
# credential when it looks like one (a digit or a token character in it, or 20+ letters) or
# follows "Authorization:"; an ordinary word is not ("missing bearer token" stays readable).
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+([A-Za-z0-9._~+/=-]+)")
_CREDENTIAL_LIKE = re.compile(r"[0-9._~+/=-]|[A-Za-z]{20}")
_AUTHORIZATION_BEFORE = re.compile(r"(?i)authorization\s*:\s*$")
# Credentials in URLs and key=value text (an httpx error naming the URL it failed on, a form
# body echoed back): the password of ``scheme://user:password@``, and the value of a query or
# form parameter named as a sensitive field is (``access_token=``, ``api_key=``, ``password=``).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*):([^\s/@]+)@")
_SENSITIVE_PARAM = re.compile(
    rf"(?i)(?<![A-Za-z0-9_-])((?:[A-Za-z0-9_-]*[_-])?(?:{_CREDENTIAL_WORDS}))"
    r"=([\"']?)[^&\s#;,\"']+")
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
    if "earer" in text or "asic" in text or "EARER" in text or "ASIC" in text:
        text = _BEARER.sub(lambda m: _redact_credential(m, text), text)
    if "=" in text:
        text = _SENSITIVE_PARAM.sub(rf"\1=\2{REDACTED}", text)
    if "@" in text and "://" in text:
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    return text


def _redact_credential(match: re.Match[str], text: str) -> str:
    word = match.group(2)
    if _CREDENTIAL_LIKE.search(word) or _AUTHORIZATION_BEFORE.search(text, 0, match.start()):
        return f"{match.group(1)} {REDACTED}"
    return match.group(0)


def _key_name(key: object) -> str:
    return key.decode("latin-1") if isinstance(key, bytes) else str(key)


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str | bytes) and bool(_SENSITIVE_KEY.search(_key_name(key)))


def is_sensitive_key(name: str) -> bool:
    """Whether a field named *name* holds a credential (``password``, ``secret``, ``token``...)."""
    return _is_sensitive(name)


def _to_builtin(obj: Any) -> Any:
    """msgspec's fallback for float/int subclasses (Duration, Size) and other objects."""
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, int):
        return int(obj)
    return str(obj)


def redact(value: Any, key: str | None = None) -> Any:
    """Return *value* with secrets replaced by ``[REDACTED]``, recursing into containers.

    Strings lose every registered secret and every ``Bearer``/``Basic`` credential; a value
    under a sensitive key (``authorization``, ``password``, ``token`` ...) is dropped whole,
    including header pairs such as ``(b"authorization", b"...")``. Structs become dicts and
    other objects their ``str()``, so no renderer can print an unredacted ``repr`` later.
    """
    if key is not None and _is_sensitive(key) and value not in (None, "", b""):
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, bytes | bytearray):
        return _redact_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {_key_name(k): redact(v, _key_name(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        if len(items) == 2 and _is_sensitive(items[0]):  # a (name, value) header pair
            return [_key_name(items[0]), REDACTED]
        return [redact(v) for v in items]
    if isinstance(value, msgspec.Struct):
        return redact(msgspec.to_builtins(value, str_keys=True, enc_hook=_to_builtin))
    if isinstance(value, BaseException):
        return _redact_text(repr(value))
    return _redact_text(str(value))


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
    cache: bool = True,
) -> None:
    """Configure structlog for this process; call once, from the entry point.

    Args:
      level: Minimum level: debug, info, warning or error.
      fmt: ``json`` lines or ``console``; default JSON unless *stream* is a TTY.
      instance: Added to every event as ``instance``.
      stream: Where lines go (default ``sys.stderr``, which systemd's journal captures).
      cache: Cache each logger on first use (fast); tests that reconfigure pass False.

    Warnings and errors logged by libraries through the stdlib ``logging`` module go through
    the same chain (and redaction), as ``stdlib.log`` events.
    """
    global _instance
    set_log_level(level)
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if _isatty(out) else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=_isatty(out))
    )
    _instance = instance
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_identity,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks become data before redaction, so their text is redacted too.
            _DICT_TRACEBACKS if fmt == "json" else structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=_LevelFilteringLogger,
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=cache,
    )
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge(logging.WARNING))


_instance: str | None = None
_min_level = logging.INFO


def set_log_level(level: str) -> None:
    """Log *level* (debug, info, warning, error) and above from now on, in every logger
    already made too (a reload changes ``logging.level`` without a restart)."""
    global _min_level
    _min_level = logging.getLevelNamesMapping()[level.upper()]


class _LevelFilteringLogger(structlog.BoundLoggerBase):
    """structlog's filtering bound logger, but the level is read on each call (one integer
    comparison) instead of fixed when the logger class is made, so it can change live."""

    def _at(self, level: int, name: str, event: str | None, args: tuple[Any, ...],
            kw: dict[str, Any]) -> Any:
        if level < _min_level:
            return None
        if args and isinstance(event, str):
            event = event % args
        return self._proxy_to_logger(name, event, **kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, args, kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, args, kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, args, kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, args, kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "error", event, args, kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.CRITICAL, "critical", event, args, kw)

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        name = logging.getLevelName(level).lower()
        return self._at(level, "warning" if name == "warn" else name, event, args, kw)

# Without frame locals: structlog cuts each local's repr to 80 characters, and a cut secret
# no longer matches its registered value, so a prefix of it would escape redaction (locals
# also hold webhook payloads, which have no place in a log).
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _add_identity(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
                  ) -> MutableMapping[str, Any]:
    """Every event names its instance and actor (``-`` outside any actor)."""
    event_dict.setdefault("instance", _instance or "-")
    event_dict.setdefault("actor", "-")
    return event_dict


class _StdlibBridge(logging.Handler):
    """Sends stdlib ``logging`` records (httpx, psycopg ...) through structlog's chain."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields: dict[str, Any] = {"logger": record.name, "message": message}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, "stdlib.log", **fields)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def get_logger(name: str) -> Any:
    """A structlog logger named after its module (``mfo_actors.actors.forwarder``)."""
    return structlog.get_logger(name)
