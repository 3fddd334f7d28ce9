"""The instance config: msgspec Structs with defaults, loaded from YAML once and then frozen.

One file configures one instance (ARCHITECTURE.md, "Instance config"). Loading does, in order:

1. parse YAML with PyYAML's SafeLoader, keeping the line of every key;
2. resolve secret references ``${env:NAME}``, ``${file:PATH}``, ``${credential:NAME}``
   (systemd's ``$CREDENTIALS_DIRECTORY``, else ``credentials/<instance>/`` or
   ``credentials/`` beside the config file: :func:`_read_credential`), registering every
   resolved value for log redaction (a password inside ``store.dsn`` too);
3. convert to :class:`InstanceConfig` with msgspec (unknown keys and wrong types are errors);
4. check what a type cannot say (a login without a password, two routes on one path).

Before step 2, environment variables ``MFO_<SECTION>__<KEY>`` (``__`` between levels, e.g.
``MFO_CLIENT__RETRY__MAX_ATTEMPTS=3``, ``MFO_WEBHOOK_LISTENER__ROUTES__0__VERIFY__SECRET``;
``MFO__<KEY>`` for a top-level key) override the file's values (:func:`apply_env_overrides`):
text for a text key, a YAML scalar for a typed one, a YAML flow collection when it starts
with ``{`` or ``[``; a problem in one names the variable instead of a file line.

Every problem is a :class:`~mfo_actors.errors.ConfigError` naming the file, the dotted key
path and the YAML line. A value that came from a secret reference is never echoed in one:
the message says ``(value from ${env:NAME})`` instead. Names that end up in metric labels and
log fields (``instance``, a route's ``source``) may not come from a secret reference. Empty
signing secrets, passwords and tokens are errors; a signing secret shorter than
:data:`MIN_SECRET_BYTES` is a warning (``load_config(..., warnings=list)``).

Durations read ``500ms 30s 1m 1h 1d`` (or a number of seconds),
sizes ``512KiB 1MiB 1GB`` (or a number of bytes), and ports the seed's Go style ``":8080"``.
Relative paths (``state_dir``, ``flows.dir``) are relative to the working directory, as
under systemd's ``WorkingDirectory=``. Commands that only read the store load the config
with ``need_secrets=False``: a secret they cannot resolve (one only the unit's environment
has) is no problem for them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
import types
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

from mfo_actors._yaml import (
    Duration,
    KeyPath,
    LineMap,
    Port,
    Size,
    convert_collecting,
    dotted,
    parse_duration,
    parse_size,
    parse_value,
    parse_yaml,
)
from mfo_actors.errors import ConfigError
from mfo_actors.observability import REDACTED, is_sensitive_key, redact, register_secret

__all__ = [
    "MIN_SECRET_BYTES",
    "AdminConfig",
    "AuthConfig",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ClientConfig",
    "Duration",
    "FlowsConfig",
    "ForwarderConfig",
    "InstanceConfig",
    "LoggingConfig",
    "Port",
    "RateLimitConfig",
    "RetryConfig",
    "RouteConfig",
    "SessionsConfig",
    "Size",
    "StoreConfig",
    "TlsConfig",
    "VerifyConfig",
    "WebhookListenerConfig",
    "apply_env_overrides",
    "check_config",
    "check_config_text",
    "dump_config",
    "flows_dir_problem",
    "load_config",
    "load_config_text",
    "mask_dsn",
    "parse_duration",
    "parse_ordering_key",
    "parse_size",
    "signing_key",
]

MIN_SECRET_BYTES = 16  # HMAC keys shorter than this are guessable offline from one signature


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Config sections: frozen, unknown keys are errors, keys are the seed's snake_case."""


class RetryConfig(_Base, frozen=True):
    """Backoff for calls to the MFO server (seed 000, section 2.7.2)."""

    max_attempts: int = 8
    initial_backoff: Duration = Duration(1.0)
    max_backoff: Duration = Duration(60.0)
    backoff_multiplier: float = 2.0


class CircuitBreakerConfig(_Base, frozen=True):
    """When to stop calling a failing upstream, and when to try again."""

    failure_threshold: int = 5
    reset_timeout: Duration = Duration(60.0)
    half_open_max_calls: int = 1  # probe calls allowed while half-open


class RateLimitConfig(_Base, frozen=True):
    """A token bucket: the client's (shared by every caller of the upstream), or the
    listener's inbound limits (per route, per client address)."""

    requests_per_second: float
    burst: int | None = None  # default 1: calls evenly spaced, never more than the rate


class CacheConfig(_Base, frozen=True):
    """The optional response cache for idempotent GETs (``client.cache``; off when absent).

    Only 2xx answers are kept, never one sent with ``Cache-Control: no-store`` or ``no-cache``;
    a ``max-age`` below ``ttl`` shortens the entry's life. A non-GET call to an endpoint
    group (``/api/memory``...) drops that group's entries.
    """

    ttl: Duration = Duration(60.0)
    max_entries: int = 1000


class ClientConfig(_Base, frozen=True):
    """How to reach the MFO server."""

    base_url: str = "http://127.0.0.1:9000"
    auth_base_url: str | None = None  # default: base_url + "/auth"
    timeout: Duration = Duration(30.0)
    max_connections: int = 100
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    rate_limit: RateLimitConfig | None = None
    cache: CacheConfig | None = None

    @property
    def effective_auth_base_url(self) -> str:
        return self.auth_base_url or self.base_url.rstrip("/") + "/auth"


class AuthConfig(_Base, frozen=True):
    """Who we are to the MFO server: ``login`` (email/password), ``token`` (static) or ``none``."""

    mode: Literal["login", "token", "none"] = "none"
    email: str | None = None
    password: str | None = None
    token: str | None = None
    refresh_at: float = 0.8  # refresh when this fraction of the token's lifetime has passed
    login_backoff: Duration = Duration(1.0)  # first wait after a failed login, doubling to max
    login_max_backoff: Duration = Duration(60.0)


class VerifyConfig(_Base, frozen=True):
    """Signature verification for one route."""

    scheme: Literal["standard-webhooks", "github", "hmac-sha256"]
    secret: str
    header: str | None = None  # hmac-sha256: the header carrying the signature
    encoding: Literal["hex", "base64"] = "hex"  # hmac-sha256: how the signature is written
    prefix: str = ""  # hmac-sha256: text before the signature, e.g. "sha256="
    tolerance: Duration = Duration(300.0)  # standard-webhooks: max timestamp skew
    # After a reload changes ``secret``, the previous one keeps verifying this long, so a
    # provider rotating its secret is not refused meanwhile (Svix keeps old secrets 24 h).
    rotation_grace: Duration = Duration(86400.0)


class RouteConfig(_Base, frozen=True):
    """One webhook path and what arrives on it."""

    path: str
    source: str
    verify: VerifyConfig | None = None
    type_from: str | None = None  # "header:NAME" or "json:/pointer"
    body: Literal["json", "raw"] = "json"
    dedupe_header: str | None = None  # delivery-id header, besides webhook-id / X-GitHub-Delivery
    rate_limit: RateLimitConfig | None = None  # requests to this route; over it: 429
    # forwarder.ordering: key: "json:/pointer" or "header:NAME"; None: forwarder.ordering_key
    ordering_key: str | None = None


class TlsConfig(_Base, frozen=True):
    """HTTPS on the listener: a PEM certificate chain and its private key (re-read on reload)."""

    cert: str
    key: str

    def ssl_context(self) -> ssl.SSLContext:
        """A server context with the certificate loaded (TLS 1.2 or later).

        Raises:
          OSError: a file cannot be read (the message says which: certificate or key).
          ssl.SSLError: the files are not PEM, or the key does not match the certificate.
        """
        for what, path in (("certificate", self.cert), ("key", self.key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:  # load_cert_chain would not say which file it was
                raise OSError(f"cannot read the {what} {path}: {exc.strerror}") from None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


class WebhookListenerConfig(_Base, frozen=True):
    """The front door: routes, limits and timeouts (defaults follow common server limits)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = Port(8080)
    path: str | None = None  # the seed's single-route form
    source: str = "webhook"  # source name of the single-route form
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    max_body_size: Size = Size(1024 * 1024)
    max_header_size: Size = Size(16 * 1024)  # h11's default incomplete-event limit is 16 KiB
    max_headers: int = 100  # as Go's net/http and nginx's large_client_header_buffers allow
    header_timeout: Duration = Duration(10.0)  # slowloris guard for the request head
    body_timeout: Duration = Duration(30.0)  # the whole body must arrive within this
    keepalive_timeout: Duration = Duration(75.0)  # nginx's keepalive_timeout default
    max_connections: int = 1024
    dedupe_window: Duration = Duration(86400.0)
    retry_after: Duration = Duration(5.0)  # Retry-After sent with 503
    client_rate_limit: RateLimitConfig | None = None  # per client address, all routes; 429
    max_clients_tracked: int = 10_000  # client addresses whose buckets are remembered
    tls: TlsConfig | None = None

    def effective_routes(self) -> list[RouteConfig]:
        """The routes list, with the seed's single ``path`` form turned into one route."""
        routes = list(self.routes)
        if self.path is not None and all(r.path != self.path for r in routes):
            routes.append(RouteConfig(path=self.path, source=self.source))
        if not routes:
            routes.append(RouteConfig(path="/webhook", source=self.source))
        return routes


class AdminConfig(_Base, frozen=True):
    """The admin port: /healthz, /readyz, /metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = Port(9090)


class ForwarderConfig(_Base, frozen=True):
    """Delivery of stored events to ``POST {base_url}/api/events``."""

    enabled: bool = True
    concurrency: int = 8
    # source: one event in flight per source; key: one per ordering key (routes'
    # ordering_key, else the one below, else the source); none: up to concurrency, any order
    ordering: Literal["source", "none", "key"] = "source"
    ordering_key: str | None = None  # ordering: key: the default of routes without their own
    batch_size: int = 64  # events claimed per store round trip
    lease: Duration = Duration(60.0)  # a claim not settled by then becomes due again
    poll_interval: Duration = Duration(1.0)  # idle wake-up when no append signal arrives


class FlowsConfig(_Base, frozen=True):
    """Taskflows: where they live and how many run at once."""

    enabled: bool = True
    dir: str = "./flows"
    concurrency: int = 4  # runs at once, instance-wide
    timezone: str = "UTC"  # for cron triggers
    catch_up: Literal["none", "one"] = "none"  # missed cron ticks after downtime


_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


class StoreConfig(_Base, frozen=True):
    """Where events and run history are kept."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str | None = None  # postgres: a libpq connection string or postgresql:// URL
    schema: str = "mfo"  # postgres: the schema holding the tables (created on first start)
    # postgres: a node that stops renewing its flow runs (killed, cut off) for this long has
    # them rerun by another node; its event claims come back after forwarder.lease.
    node_lease: Duration = Duration(30.0)
    # postgres: a statement waiting this long for a row or table lock (another node, a
    # migration, a DBA) gives up; the store retries the batch, then fails it (503, retried).
    lock_timeout: Duration = Duration(2.0)
    # postgres: a statement running this long is cancelled, likewise (0: no limit).
    statement_timeout: Duration = Duration(30.0)
    path: str | None = None  # sqlite file; default <state_dir>/store.sqlite3
    max_pending: int = 100_000  # events not yet delivered before the listener answers 503
    max_bytes: Size = Size(1024**3)  # bytes of pending payloads before 503
    group_commit_max: int = 512  # events committed in one transaction at most
    retention: Duration = Duration(7 * 86400)  # delivered events kept this long; 0: forever


class SessionsConfig(_Base, frozen=True):
    """Chat sessions keyed in flows (``mfo.chat`` with ``session:``), kept in the store."""

    ttl: Duration = Duration(3600.0)  # idle this long: the next message starts a new thread
    max_active: int = 10_000  # beyond this, the session idle the longest is closed
    cleanup_interval: Duration = Duration(60.0)  # how often expired sessions are closed
    context_messages: int = 20  # recent messages kept with a session (0: none)


class LoggingConfig(_Base, frozen=True):
    """Log level and format (``json`` lines, or ``console``; default json unless a TTY)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] | None = None
    # One info line (instance.summary) per interval when anything changed; 0: none.
    summary_interval: Duration = Duration(10.0)


class InstanceConfig(_Base, frozen=True):
    """One instance: everything ``mfo-actors run`` needs (ARCHITECTURE.md, "Instance config")."""

    instance: str = "default"
    state_dir: str | None = None
    async_backend: Literal["asyncio", "trio"] = "asyncio"
    uvloop: bool = True  # asyncio only: run on uvloop when it is installed (faster I/O)
    shutdown_timeout: Duration = Duration(30.0)  # drain deadline on SIGTERM
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    webhook_listener: WebhookListenerConfig = msgspec.field(default_factory=WebhookListenerConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    forwarder: ForwarderConfig = msgspec.field(default_factory=ForwarderConfig)
    flows: FlowsConfig = msgspec.field(default_factory=FlowsConfig)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    source_file: str | None = None  # set by the loader; not a YAML key users write

    @property
    def effective_state_dir(self) -> Path:
        """``state_dir``, else ``$STATE_DIRECTORY`` (systemd), else for a config in
        ``/etc/mfo-actors/`` the unit's ``/var/lib/mfo-actors/<instance>`` (so commands run
        by hand find the instance the unit runs), else ``./var/<instance>``."""
        if self.state_dir:
            return Path(self.state_dir)
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            # systemd may pass several colon-separated dirs; the first is ours.
            return Path(env.split(":")[0])
        if self.source_file and Path(self.source_file).absolute().parent == SYSTEMD_CONFIG_DIR:
            return SYSTEMD_STATE_ROOT / self.instance
        return Path("var") / self.instance


# ---------------------------------------------------------------------------------------------
# Loading


# ${credential:NAME} not in $CREDENTIALS_DIRECTORY (or without systemd's LoadCredential=):
# <config dir>/credentials/<instance>/NAME, else <config dir>/credentials/NAME.
LOCAL_CREDENTIALS_DIR = "credentials"
# The systemd unit's layout (config/mfo-actors@.service): /etc/mfo-actors/<instance>.yaml keeps
# its state in StateDirectory=mfo-actors/<instance>.
SYSTEMD_CONFIG_DIR = Path("/etc/mfo-actors")
SYSTEMD_STATE_ROOT = Path("/var/lib/mfo-actors")
_SECRET_REF = re.compile(r"\$\{(env|file|credential):([^}]*)\}")
_WHSEC_PREFIX = "whsec_"
# Values that become metric labels and log fields: a secret there would be published.
_NAME_KEYS = ("instance", "source")
# Where a resolved value came from, by key path: (text as written, value after resolution).
_Origins = dict[KeyPath, tuple[str, str]]


@lru_cache(maxsize=64)
def signing_key(scheme: str, secret: str) -> bytes:
    """The HMAC key of a route's ``verify.secret``: for ``standard-webhooks`` the base64
    after ``whsec_`` (a secret that is not valid base64 is used as its UTF-8 bytes), for the
    other schemes the secret's UTF-8 bytes. Empty when the secret is."""
    if scheme == "standard-webhooks":
        text = secret.removeprefix(_WHSEC_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        return key or text.encode("utf-8")
    return secret.encode("utf-8")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110 5.6.2)


def parse_ordering_key(spec: str) -> tuple[Literal["json", "header"], str]:
    """``json:/pointer`` -> ``("json", "/pointer")``; ``header:NAME`` -> ``("header", "name")``.

    Raises:
      ValueError: *spec* is neither (the message says what is wrong, for ``check``).
    """
    kind, sep, arg = spec.partition(":")
    if sep and kind == "header":
        name = arg.strip()
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{spec!r}: header:NAME needs a header name")
        return "header", name.lower()
    if sep and kind == "json":
        if not arg.startswith("/"):
            raise ValueError(f"{spec!r}: json: needs a JSON pointer starting with '/' "
                             "(RFC 6901), like json:/user/id")
        if re.search(r"~(?![01])", arg):
            raise ValueError(f"{spec!r}: in a JSON pointer '~' must be written ~0 and '/' "
                             "inside a name ~1")
        return "json", arg
    raise ValueError(f"{spec!r}: must be 'json:/pointer' (like json:/user/id) or "
                     "'header:NAME'")


_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct type of a section field (``RetryConfig`` or ``RateLimitConfig | None``)."""
    candidates = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _field_types(struct: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.encode_name: f.type for f in msgspec.structs.fields(struct)}


class _NullSection:
    """A section key written with no value (``client:``) that keys after it may belong to."""

    def __init__(self, key_node: yaml.Node, struct: type[msgspec.Struct]) -> None:
        self.key_node = key_node
        self.struct = struct
        self.fields = _field_types(struct)
        self.entries: list[tuple[yaml.Node, yaml.Node]] = []


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _unflatten(node: yaml.Node, struct: type[msgspec.Struct]) -> None:
    """Re-nest a config whose indentation was lost, as in the seed's printed example.

    The seed (000, "Structure de Configuration YAML (Client)") prints its example with every
    line flush left: ``client:`` has no value and ``base_url:`` follows at the top level. A
    section key with no value *opens* that section; a following key that is not valid where
    it stands goes to the innermost open section that has it. A key valid where it stands
    stays there, so a correctly indented file is never changed, and a key valid nowhere still
    fails as an unknown key on its own line. Sections that capture no key stay null.
    """
    if not isinstance(node, yaml.MappingNode):
        return
    here = _field_types(struct)
    kept: list[tuple[yaml.Node, yaml.Node]] = []
    open_sections: list[_NullSection] = []
    opened: list[_NullSection] = []
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        target_fields, target = here, kept
        if key not in here:
            for depth in range(len(open_sections) - 1, -1, -1):
                if key in open_sections[depth].fields:
                    del open_sections[depth + 1 :]
                    target_fields = open_sections[depth].fields
                    target = open_sections[depth].entries
                    break
        if target is kept:
            open_sections.clear()
        target.append((key_node, value_node))
        section = _struct_of(target_fields.get(key)) if isinstance(key, str) else None
        if section is None:
            continue
        if _is_null(value_node):
            opened.append(_NullSection(key_node, section))
            open_sections.append(opened[-1])
        else:
            _unflatten(value_node, section)
    if not opened:
        return
    by_key = {id(s.key_node): s for s in opened if s.entries}

    def rebuild(entries: list[tuple[yaml.Node, yaml.Node]]) -> list[tuple[yaml.Node, yaml.Node]]:
        out = []
        for key_node, value_node in entries:
            captured = by_key.get(id(key_node))
            if captured is not None:
                value_node = yaml.MappingNode(
                    "tag:yaml.org,2002:map", rebuild(captured.entries),
                    start_mark=key_node.start_mark, end_mark=key_node.end_mark,
                )
            out.append((key_node, value_node))
        return out

    node.value = rebuild(kept)


ENV_PREFIX = "MFO_"
ENV_SEPARATOR = "__"


class _Where:
    """Where a key was written: its file and line, or the environment variable that set it."""

    def __init__(self, file: str, lines: LineMap, overrides: Mapping[KeyPath, str]) -> None:
        self.file = file
        self.lines = lines
        self.overrides = overrides

    def error(self, message: str, path: KeyPath) -> ConfigError:
        for prefix, variable in self.overrides.items():
            # The key the variable set, something inside it, or a section it created (an
            # unknown ``MFO_NOPE__X`` is the variable's problem, not the file's first line).
            if path[: len(prefix)] == prefix or (
                    prefix[: len(path)] == path and not self.lines.written(path)):
                return ConfigError(message, file=f"environment {variable}",
                                   key=dotted(path) or None)
        return ConfigError(message, file=self.file, key=dotted(path) or None,
                           line=self.lines.line(path))


def _env_value(text: str, target: Any, variable: str) -> Any:
    """An override's value: a flow collection (``{a: 1}``, ``[1, 2]``) is read as YAML; text
    for a key that takes text (a password, a path, a level) stays exactly as written, so
    ``0123``, ``yes`` or ``#hunter2`` are not turned into numbers, booleans or nothing; for
    other keys (numbers, booleans, durations...) the text is read as a YAML scalar, so
    ``3`` is a number and ``true`` a boolean. YAML read here has the files' alias bound.

    Raises:
      ConfigError: an alias bomb (or nesting too deep) in *variable*.
    """
    if text == "" or (not text.startswith(("{", "[")) and _takes_text(target)):
        return text
    try:
        return parse_value(text, f"environment {variable}")
    except yaml.YAMLError:
        return text


def _takes_text(tp: Any) -> bool:
    """Whether a field of type *tp* takes a string (``str``, ``str | None``, a Literal of
    strings); an unknown key (*tp* None) is read as text too."""
    if tp is None or tp is str:
        return True
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_takes_text(arg) for arg in typing.get_args(tp) if arg is not type(None))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(tp))
    return False


def _type_at(path: KeyPath) -> Any:
    """The declared type of the config key at *path* (None when there is no such key)."""
    tp: Any = InstanceConfig
    for part in path:
        if isinstance(part, int):
            args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
            if not args:
                return None
            tp = args[0]
            continue
        struct = _struct_of(tp)
        if struct is None:
            return None
        tp = _field_types(struct).get(part)
        if tp is None:
            return None
    return tp


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[KeyPath, str]:
    """Apply ``MFO_<SECTION>__<KEY>[__<KEY>...]`` variables to the parsed config *data*.

    Names are matched case-insensitively (keys are snake_case, ``WEBHOOK_LISTENER`` is
    ``webhook_listener``); a number addresses a list item (``ROUTES__0__SOURCE``). Only names
    with ``__`` are overrides, so ``MFO_EMAIL`` stays an ordinary variable for ``${env:...}``;
    a top-level key is written with ``__`` right after the prefix: ``MFO__STATE_DIR``,
    ``MFO__SHUTDOWN_TIMEOUT``. How a value is read: :func:`_env_value`.

    Returns:
      The key path each variable set, for error messages.

    Raises:
      ConfigError: a variable addresses something that is not a section or list item.
    """
    applied: dict[KeyPath, str] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or ENV_SEPARATOR not in variable:
            continue
        name = variable[len(ENV_PREFIX):]
        if variable.startswith(ENV_PREFIX + "_"):  # MFO__STATE_DIR: a top-level key
            name = variable[len(ENV_PREFIX) + 1:]
        parts = name.lower().split(ENV_SEPARATOR)
        path: KeyPath = tuple(int(p) if p.isdigit() else p for p in parts)
        if not all(isinstance(p, int) or p for p in path) or isinstance(path[0], int):
            raise ConfigError(f"cannot read {variable} as MFO_<SECTION>__<KEY>",
                              file=f"environment {variable}")
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            child = _env_child(node, part)
            if child is None and isinstance(node, list):
                raise ConfigError(f"no item {part} in {dotted(path[:depth])}",
                                  file=f"environment {variable}", key=dotted(path))
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict | list):
                raise ConfigError(f"{dotted(path[: depth + 1])} is not a section",
                                  file=f"environment {variable}", key=dotted(path))
            node = child
        last = path[-1]
        value = _env_value(environ[variable], _type_at(path), variable)
        if isinstance(value, str) and is_sensitive_key(str(last)):
            register_secret(value)
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise ConfigError(f"no item {last} in {dotted(path[:-1])}",
                                  file=f"environment {variable}", key=dotted(path))
            node[last] = value
        elif isinstance(last, int):
            raise ConfigError(f"{dotted(path[:-1])} is not a list",
                              file=f"environment {variable}", key=dotted(path))
        else:
            node[last] = value
        applied[path] = variable
    return applied


def _env_child(node: Any, part: str | int) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _resolve_secret(kind: str, name: str, *, base_dir: Path, environ: Mapping[str, str],
                    instance: str | None = None) -> str:
    if not name:
        raise ValueError(f"empty secret reference ${{{kind}:}}")
    if kind == "env":
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name]
    if kind == "file":
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    if "/" in name or name in {".", ".."}:
        raise ValueError(f"invalid credential name {name!r}")
    return _read_credential(name, base_dir=base_dir, environ=environ, instance=instance)


def _read_credential(name: str, *, base_dir: Path, environ: Mapping[str, str],
                     instance: str | None) -> str:
    """``${credential:NAME}``: systemd's copy (``$CREDENTIALS_DIRECTORY/NAME``, from
    ``LoadCredential=``; frozen while the service runs), else the file an operator rotates
    (``credentials/<instance>/NAME`` beside the config, read again on every reload), else
    ``credentials/NAME`` (a clone's layout)."""
    local = base_dir / LOCAL_CREDENTIALS_DIR
    candidates: list[Path] = []
    creds = environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        candidates.append(Path(creds) / name)
    if instance and _INSTANCE_NAME.fullmatch(instance):
        candidates.append(local / instance / name)
    candidates.append(local / name)
    reasons: list[str] = []
    for path in candidates:
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            reasons.append(f"no {path}")
        except OSError as exc:  # there, but unreadable: say so rather than look further
            raise ValueError(f"cannot read credential {name} at {path}: {exc.strerror}"
                             ) from None
    where = "" if creds else (" ($CREDENTIALS_DIRECTORY is not set: systemd's LoadCredential= "
                              "sets it)")
    raise ValueError(f"credential {name} not found{where}: {'; '.join(reasons)}")


def _walk_strings(data: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any, Any]]:
    """Yield (path, container, key) for every string value in nested dicts/lists."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str):
                yield (*path, key), data, key
            else:
                yield from _walk_strings(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            if isinstance(value, str):
                yield (*path, i), data, i
            else:
                yield from _walk_strings(value, (*path, i))


def _resolve_secrets(
    data: Any, *, where: _Where, base_dir: Path, environ: Mapping[str, str],
    problems: list[ConfigError], origins: _Origins | None = None, instance: str | None = None,
    need_secrets: bool = True,
) -> list[KeyPath]:
    """Replace every ``${kind:name}`` by its value; return the paths that failed (left as
    written, their problems added to *problems*). *origins* receives, per resolved path,
    the text as written and the value (so errors never echo a secret). Without
    *need_secrets*, a reference outside ``store`` that cannot be resolved is left as written
    and is no problem (commands that only read the store)."""
    failed: list[KeyPath] = []
    for path, container, key in list(_walk_strings(data)):
        value: str = container[key]
        if "${" not in value:
            continue
        if path and path[-1] in _NAME_KEYS and _SECRET_REF.search(value):
            problems.append(where.error(
                f"{path[-1]} names metrics and log lines; it cannot come from a secret "
                "reference (${...}): write the name", path))
            failed.append(path)
            continue
        errors: list[str] = []

        def substitute(match: re.Match[str], errors: list[str] = errors) -> str:
            try:
                secret = _resolve_secret(
                    match.group(1), match.group(2), base_dir=base_dir, environ=environ,
                    instance=instance)
            except ValueError as exc:
                errors.append(str(exc))
                return match.group(0)
            register_secret(secret)
            return secret

        resolved = _SECRET_REF.sub(substitute, value)
        if errors and not need_secrets and path[:1] != ("store",):
            continue
        if errors:
            problems.extend(where.error(e, path) for e in errors)
            failed.append(path)
        else:
            container[key] = resolved
            if origins is not None and resolved != value:
                origins[path] = (value, resolved)
    return failed


def _origin(origins: _Origins, *path: str | int) -> str:
    """`` (value from ${env:X})`` when the value at *path* came from a reference."""
    found = origins.get(tuple(path))
    return f" (value from {found[0]})" if found else ""


def _scrub(error: ConfigError, origins: _Origins) -> ConfigError:
    """*error* without any value resolved from a secret reference in its message."""
    message = error.message
    for written, value in origins.values():
        if not value:
            continue
        instead = f"(value from {written})"
        for echoed in (repr(value), f"'{value}'", f'"{value}"', f"`{value}`"):
            message = message.replace(echoed, instead)
        if len(value) >= 3:  # shorter ones would clobber ordinary words
            message = message.replace(value, instead)
    if message == error.message:
        return error
    return ConfigError(message, file=error.file, key=error.key, line=error.line)

def _check_secrets(cfg: InstanceConfig, problems: _Problems, origins: _Origins,
                   warnings: list[str]) -> None:
    """Empty credentials are problems; short signing secrets are warnings."""
    def fail(message: str, *path: str | int) -> None:
        problems.add(message + _origin(origins, *path), *path)

    for name in ("password", "token"):
        if getattr(cfg.auth, name) == "":
            fail(f"{name} is empty", "auth", name)
    for i, route in enumerate(cfg.webhook_listener.routes):
        if route.verify is None:
            continue
        path = ("webhook_listener", "routes", i, "verify", "secret")
        secret = route.verify.secret
        if not secret or not secret.removeprefix(_WHSEC_PREFIX):
            fail("the signing secret is empty: anyone could sign with an empty key", *path)
        elif len(signing_key(route.verify.scheme, secret)) < MIN_SECRET_BYTES:
            warnings.append(
                f"{problems.where.error('', path)}the signing secret is shorter than "
                f"{MIN_SECRET_BYTES} bytes{_origin(origins, *path)}; use 32 random bytes")


def _check_rate_limit(limit: RateLimitConfig | None, fail: Any, *path: str | int) -> None:
    if limit is None:
        return
    if limit.requests_per_second <= 0:
        fail("must be greater than 0", *path, "requests_per_second")
    if limit.burst is not None and limit.burst < 1:
        fail("must be at least 1", *path, "burst")


class _Problems:
    """The problems found in one file; those under a key already reported are not repeated
    (a removed key's default must not produce a second, derived complaint)."""

    def __init__(self, where: _Where, reported: list[KeyPath]) -> None:
        self.where = where
        self.reported = reported
        self.found: list[ConfigError] = []

    def add(self, message: str, *path: str | int) -> None:
        if any(path[: len(r)] == r for r in self.reported):
            return
        self.found.append(self.where.error(message, path))


def _check_ordering_key(spec: str, route: RouteConfig | None, fail: Any, *path: str | int
                        ) -> None:
    """The syntax of an ``ordering_key``; a route's must be readable from its body."""
    where = f"route {route.path}: " if route is not None else ""
    try:
        kind, _ = parse_ordering_key(spec)
    except ValueError as exc:
        fail(f"{where}{exc}", *path)
        return
    if route is not None and kind == "json" and route.body == "raw":
        fail(f"{where}{spec!r} reads the JSON body, but this route takes raw bodies "
             "(body: raw); use header:NAME", *path)


def _ordering_warnings(cfg: InstanceConfig, where: Any) -> list[str]:
    """Ordering keys that will not do what they seem to: set but unused, or missing."""
    fwd = cfg.forwarder
    routes = cfg.webhook_listener.effective_routes()
    keyed = [r for r in routes if r.ordering_key is not None]
    if fwd.ordering != "key":
        if keyed or fwd.ordering_key is not None:
            path = (("forwarder", "ordering_key") if fwd.ordering_key is not None else
                    ("webhook_listener", "routes",
                     cfg.webhook_listener.routes.index(keyed[0]), "ordering_key"))
            return [f"{where.error('', path)}ordering_key is used only with "
                    f"forwarder.ordering: key (it is {fwd.ordering}): ignored"]
        return []
    if fwd.ordering_key is None:
        unkeyed = [r.path for r in routes if r.ordering_key is None]
        if unkeyed:
            which = (f"routes {', '.join(unkeyed)} have" if len(unkeyed) > 1
                     else f"route {unkeyed[0]} has")
            return [f"{where.error('', ('forwarder', 'ordering'))}ordering: key, but {which} "
                    "no ordering_key (and forwarder.ordering_key is not set): their events "
                    "are ordered by source"]
        return []
    try:
        default_kind, _ = parse_ordering_key(fwd.ordering_key)
    except ValueError:
        return []  # a problem of its own
    raw = [r.path for r in routes if r.ordering_key is None and r.body == "raw"]
    if default_kind == "json" and raw:
        which = (f"routes {', '.join(raw)} take raw bodies (body: raw) and have no "
                 "ordering_key of their own: their events" if len(raw) > 1 else
                 f"route {raw[0]} takes raw bodies (body: raw) and has no ordering_key of "
                 "its own: its events")
        return [f"{where.error('', ('forwarder', 'ordering_key'))}{fwd.ordering_key!r} reads "
                f"the JSON body, but {which} have no key and are ordered by source (give "
                "such a route ordering_key: header:NAME)"]
    return []


def _check_semantics(cfg: InstanceConfig, problems: _Problems, *, load_tls: bool = True
                     ) -> None:
    fail = problems.add
    if not _INSTANCE_NAME.fullmatch(cfg.instance):
        fail("instance name must be letters, digits, '.', '_' or '-' (at most 64)", "instance")
    auth = cfg.auth
    if auth.mode == "login":
        if not auth.email:
            fail("auth.mode login needs an email", "auth", "email")
        if not auth.password:
            fail("auth.mode login needs a password", "auth", "password")
    if auth.mode == "token" and not auth.token:
        fail("auth.mode token needs a token", "auth", "token")
    if not 0.1 <= auth.refresh_at <= 0.99:
        fail("must be between 0.1 and 0.99", "auth", "refresh_at")
    for name in ("base_url", "auth_base_url"):
        url = getattr(cfg.client, name)
        if url is not None and not url.startswith(("http://", "https://")):
            fail(f"must start with http:// or https://, got {url!r}", "client", name)
        elif url is not None:
            try:
                parts = urllib.parse.urlsplit(url)
                parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
            except ValueError as exc:
                fail(f"is not a valid URL: {exc}", "client", name)
                continue
            if "@" in parts.netloc:
                # Neither client would use them as meant (httpx turns them into Basic auth
                # that replaces the bearer token, the forwarder's lean client ignores them),
                # and the URL is logged: refuse them, without repeating them.
                fail("credentials in the URL (user:password@) are not used: give the "
                     "upstream's credentials under auth (mode: login or token)", "client", name)
    if cfg.client.retry.max_attempts < 1:
        fail("must be at least 1", "client", "retry", "max_attempts")
    if cfg.client.retry.backoff_multiplier < 1.0:
        fail("must be at least 1.0", "client", "retry", "backoff_multiplier")
    if cfg.client.circuit_breaker.failure_threshold < 1:
        fail("must be at least 1", "client", "circuit_breaker", "failure_threshold")
    _check_rate_limit(cfg.client.rate_limit, fail, "client", "rate_limit")
    listener = cfg.webhook_listener
    _check_rate_limit(listener.client_rate_limit, fail, "webhook_listener", "client_rate_limit")
    if listener.max_clients_tracked < 1:
        fail("must be at least 1", "webhook_listener", "max_clients_tracked")
    if listener.tls is not None and load_tls:
        try:
            listener.tls.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            fail(f"cannot load the certificate and key: {exc}", "webhook_listener", "tls")
    seen: dict[str, int] = {}
    for i, route in enumerate(cfg.webhook_listener.routes):
        if not route.path.startswith("/"):
            fail(f"route path must start with '/', got {route.path!r}",
                 "webhook_listener", "routes", i, "path")
        if route.path in seen:
            fail(f"path {route.path} is already used by routes[{seen[route.path]}]",
                 "webhook_listener", "routes", i, "path")
        seen.setdefault(route.path, i)
        if route.type_from is not None and not route.type_from.startswith(("header:", "json:/")):
            fail("must be 'header:NAME' or 'json:/pointer'",
                 "webhook_listener", "routes", i, "type_from")
        if route.ordering_key is not None:
            _check_ordering_key(route.ordering_key, route, fail,
                                "webhook_listener", "routes", i, "ordering_key")
        if route.verify and route.verify.scheme == "hmac-sha256" and not route.verify.header:
            fail("hmac-sha256 needs the signature header name",
                 "webhook_listener", "routes", i, "verify", "header")
        _check_rate_limit(route.rate_limit, fail, "webhook_listener", "routes", i, "rate_limit")
    if cfg.forwarder.ordering_key is not None:
        _check_ordering_key(cfg.forwarder.ordering_key, None, fail, "forwarder", "ordering_key")
    for name in ("concurrency", "batch_size"):
        if getattr(cfg.forwarder, name) < 1:
            fail("must be at least 1", "forwarder", name)
    if cfg.flows.concurrency < 1:
        fail("must be at least 1", "flows", "concurrency")
    if cfg.client.cache is not None:
        if cfg.client.cache.ttl <= 0:
            fail("must be greater than 0", "client", "cache", "ttl")
        if cfg.client.cache.max_entries < 1:
            fail("must be at least 1", "client", "cache", "max_entries")
    sessions = cfg.sessions
    if sessions.ttl <= 0:
        fail("must be greater than 0", "sessions", "ttl")
    if sessions.max_active < 1:
        fail("must be at least 1", "sessions", "max_active")
    if sessions.cleanup_interval <= 0:
        fail("must be greater than 0", "sessions", "cleanup_interval")
    if sessions.context_messages < 0:
        fail("must not be negative", "sessions", "context_messages")
    try:
        ZoneInfo(cfg.flows.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"unknown timezone {cfg.flows.timezone!r} (use an IANA name like Europe/Paris)",
             "flows", "timezone")
    if cfg.store.backend == "postgres" and not cfg.store.dsn:
        fail("the postgres backend needs store.dsn (postgresql://user@host:5432/db)",
             "store", "dsn")
    if not _SCHEMA_NAME.fullmatch(cfg.store.schema):
        fail("must be a lower-case SQL name (letters, digits, _; at most 40 characters)",
             "store", "schema")
    if cfg.store.node_lease < 3:
        fail("must be at least 3s (a node renews its runs every third of it)",
             "store", "node_lease")
    for name in ("lock_timeout", "statement_timeout"):
        value = float(getattr(cfg.store, name))
        if value != 0 and not 0.01 <= value <= 3600:
            fail("must be 0 (no limit) or between 10ms and 1h", "store", name)
    if 0 < float(cfg.store.statement_timeout) < float(cfg.store.lock_timeout):
        fail("must not be shorter than store.lock_timeout", "store", "statement_timeout")


def check_config_text(
    text: str, *, file: str = "<config>", environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None, need_secrets: bool = True,
) -> tuple[InstanceConfig | None, list[ConfigError]]:
    """Load an instance config from YAML text, collecting every problem.

    *warnings* receives one line per thing that works but should not be so (a signing secret
    shorter than 16 bytes). No problem echoes a value resolved from a secret reference.

    Each problem is reported once: a key found wrong is set aside (its default applies) and
    the rest of the file is still checked, so one typo does not hide the next. Problems are
    in file order.

    Returns:
      ``(config, problems)``: the config is None when the file could not be read as a
      config at all (invalid YAML, not a mapping); otherwise it is what the file would
      give with every wrong key set aside.
    """
    problems: list[ConfigError] = []
    try:
        data, lines = parse_yaml(text, file, prepare=partial(_unflatten, struct=InstanceConfig),
                                 problems=problems)
    except ConfigError as exc:
        return None, [exc]
    if not isinstance(data, dict):
        return None, [ConfigError("the config must be a YAML mapping", file=file,
                                  line=lines.line(()))]
    base_dir = Path(file).parent if file != "<config>" else Path.cwd()
    env = os.environ if environ is None else environ
    try:
        where = _Where(file, lines, apply_env_overrides(data, env))
    except ConfigError as exc:
        return None, [*problems, exc]
    if "instance" not in data and file != "<config>":
        data["instance"] = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(file).stem) or "default"
    instance = data.get("instance")
    origins: _Origins = {}
    set_aside = _resolve_secrets(
        data, where=where, base_dir=base_dir, environ=env, problems=problems, origins=origins,
        instance=instance if isinstance(instance, str) else None, need_secrets=need_secrets)
    if "source_file" in data:
        problems.append(where.error("unknown key", ("source_file",)))
        del data["source_file"]
    data["source_file"] = file
    cfg, invalid, removed = convert_collecting(data, InstanceConfig)
    problems.extend(where.error(message, path) for message, path in invalid)
    if cfg is not None:
        if cfg.store.dsn:
            _register_dsn_password(cfg.store.dsn)
        semantic = _Problems(where, [*set_aside, *removed])
        _check_secrets(cfg, semantic, origins, warnings if warnings is not None else [])
        _check_semantics(cfg, semantic, load_tls=need_secrets)
        if warnings is not None:
            warnings.extend(_ordering_warnings(cfg, where))
        problems.extend(semantic.found)
    problems = [_scrub(p, origins) for p in problems]
    problems.sort(key=lambda p: p.line or 0)
    return cfg, problems


def load_config_text(
    text: str, *, file: str = "<config>", environ: Mapping[str, str] | None = None,
    warnings: list[str] | None = None, need_secrets: bool = True,
) -> InstanceConfig:
    """Load an instance config from YAML text.

    Args:
      text: The YAML document.
      file: The name used in error messages; relative ``${file:...}`` paths resolve beside it.
      environ: Where ``${env:...}`` and ``$CREDENTIALS_DIRECTORY`` are looked up
        (default: ``os.environ``).
      warnings: Receives one line per thing that works but should not be so (a signing
        secret shorter than 16 bytes), ``file:line: key: message``.
      need_secrets: False for commands that only read the store (``events``, ``runs``...):
        a secret reference outside ``store`` that cannot be resolved is left as written,
        and the TLS files are not loaded.

    Raises:
      ConfigError: naming the file, key path and line of the first problem (and how many
        more there are: ``mfo-actors check`` lists them all).
    """
    cfg, problems = check_config_text(text, file=file, environ=environ, warnings=warnings,
                                      need_secrets=need_secrets)
    if problems:
        raise _first_of(problems)
    assert cfg is not None  # no problem means a config
    return cfg


def _first_of(problems: list[ConfigError]) -> ConfigError:
    first = problems[0]
    if len(problems) == 1:
        return first
    more = len(problems) - 1
    return ConfigError(
        f"{first.message} (and {more} more problem{'s' if more > 1 else ''}: "
        "mfo-actors check --config lists them)",
        file=first.file, key=first.key, line=first.line,
    )


def _read_config(file: str) -> str:
    try:
        return Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", file=file) from None
    except UnicodeDecodeError:
        raise ConfigError("config is not valid UTF-8", file=file) from None


def check_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None,
                 warnings: list[str] | None = None
                 ) -> tuple[InstanceConfig | None, list[ConfigError]]:
    """Load the instance config file at *path*, collecting every problem (``check``);
    *warnings* as for :func:`check_config_text`."""
    file = os.fspath(path)
    try:
        text = _read_config(file)
    except ConfigError as exc:
        return None, [exc]
    return check_config_text(text, file=file, environ=environ, warnings=warnings)


def load_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None,
                warnings: list[str] | None = None, need_secrets: bool = True
                ) -> InstanceConfig:
    """Load and validate the instance config file at *path*.

    The instance name defaults to the file's stem (``crm.yaml`` -> ``crm``). *warnings*: as
    for :func:`load_config_text`.

    Raises:
      ConfigError: the file cannot be read, or names the key path and line of the problem.
    """
    file = os.fspath(path)
    return load_config_text(_read_config(file), file=file, environ=environ, warnings=warnings,
                            need_secrets=need_secrets)


def dump_config(cfg: InstanceConfig) -> str:
    """The effective config as YAML (file, defaults and environment overrides merged), with
    every secret masked: values resolved from ``${...}``, keys that name a credential, and
    the password inside ``store.dsn``."""
    data = msgspec.to_builtins(cfg, enc_hook=_plain)
    data.pop("source_file", None)
    if cfg.store.dsn:
        data["store"]["dsn"] = mask_dsn(cfg.store.dsn)
    masked = redact(data)
    return yaml.safe_dump(masked, sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, float) else int(value)


def flows_dir_problem(cfg: InstanceConfig) -> str | None:
    """Why *cfg* loads no flows although flows are on: ``flows.dir`` does not exist (a typo,
    or a deploy half done, reads as "no flows"); None when the directory is there."""
    if not cfg.flows.enabled or os.path.isdir(cfg.flows.dir):
        return None
    return (f"flows.dir: {cfg.flows.dir} does not exist, so no flows are loaded (create it, "
            "or set flows.enabled: false)")


# libpq key=value: password=VALUE, VALUE bare or single-quoted with backslash escapes.
_CONNINFO_PASSWORD = re.compile(r"\bpassword\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)")


def mask_dsn(dsn: str) -> str:
    """*dsn* (a ``postgresql://`` URL or libpq ``key=value`` string) with its password
    replaced by ``[REDACTED]``; all of it when it cannot be parsed."""
    from psycopg import Error as PsycopgError  # only for a DSN: psycopg is slow to import
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except PsycopgError:
        return REDACTED
    if "password" not in params:
        return dsn
    if "://" not in dsn:
        return _CONNINFO_PASSWORD.sub(f"password={REDACTED}", dsn)
    url = urllib.parse.urlsplit(dsn)
    netloc = url.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc = f"{user}:{REDACTED}@{hosts}"
    query = "&".join(f"password={REDACTED}" if pair.partition("=")[0] == "password" else pair
                     for pair in url.query.split("&")) if url.query else ""
    return urllib.parse.urlunsplit(url._replace(netloc=netloc, query=query))


def _register_dsn_password(dsn: str) -> None:
    """Keep the password written inside a DSN out of every log line."""
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        password = conninfo_to_dict(dsn).get("password")
    except PsycopgError:
        return
    if isinstance(password, str) and password:
        register_secret(password)
