"""Webhook signature verification: Standard Webhooks, GitHub, and a generic HMAC-SHA256.

Each scheme checks an HMAC-SHA256 of the raw body (Standard Webhooks: of
``"{id}.{timestamp}.{body}"``) with :func:`hmac.compare_digest`, so the time taken does not
tell an attacker how much of a guessed signature was right. Failures raise
:class:`SignatureError` with a short reason that is safe to show the sender and to log (it
never contains the secret or the expected signature).

Schemes (``verify.scheme`` of a route):

* ``standard-webhooks`` (https://www.standardwebhooks.com/, used by Svix, Stripe-likes):
  headers ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``, a
  space-separated list of ``v1,<base64>`` signatures (several during key rotation; other
  versions are ignored). The secret is ``whsec_<base64>``; a secret that is not valid base64
  is used as its UTF-8 bytes. The timestamp must be within ``verify.tolerance`` (default 5 min)
  of now, either way, which bounds replays.
* ``github``: ``X-Hub-Signature-256: sha256=<hex>`` over the body, secret as UTF-8.
* ``hmac-sha256``: the configured ``verify.header`` holds ``<prefix><signature>`` with the
  signature in ``hex`` or ``base64`` (``verify.encoding``), secret as UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from mfo_actors.config import VerifyConfig, signing_key
from mfo_actors.errors import MFOError

__all__ = ["SignatureError", "sign_github", "sign_standard_webhooks", "verify"]


class SignatureError(MFOError):
    """The request's signature is missing, malformed, wrong or too old: the sender's fault."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _hmac(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def sign_standard_webhooks(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value a Standard Webhooks sender puts on *body*.

    The sending side of :func:`verify` (the demo's simulated providers; tests): ``v1,`` and
    the base64 HMAC-SHA256 of ``"{msg_id}.{timestamp}.{body}"`` under the ``whsec_`` key.
    """
    mac = _hmac(signing_key("standard-webhooks", secret), msg_id.encode("utf-8"), b".",
                str(timestamp).encode("ascii"), b".", body)
    return "v1," + base64.b64encode(mac).decode("ascii")


def sign_github(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub puts on *body*: ``sha256=<hex>``."""
    return "sha256=" + _hmac(signing_key("github", secret), body).hex()


def _verify_standard(
    cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, now: float
) -> None:
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not timestamp or not signatures:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(timestamp.strip())
    except ValueError:
        raise SignatureError("webhook-timestamp is not a Unix time in seconds") from None
    if ts < now - cfg.tolerance:
        raise SignatureError("webhook-timestamp is too old")
    if ts > now + cfg.tolerance:
        raise SignatureError("webhook-timestamp is in the future")
    expected = base64.b64decode(
        sign_standard_webhooks(cfg.secret, msg_id, ts, body).removeprefix("v1,"))
    found_v1 = False
    for item in signatures.split():
        version, _, value = item.partition(",")
        if version != "v1":
            continue
        found_v1 = True
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, given):
            return
    raise SignatureError("no matching signature" if found_v1 else "no v1 signature")


def _verify_github(cfg: VerifyConfig, headers: Mapping[str, str], body: bytes) -> None:
    given = headers.get("x-hub-signature-256")
    if not given:
        raise SignatureError("missing X-Hub-Signature-256 header")
    algo, _, value = given.strip().partition("=")
    if algo != "sha256" or not value:
        raise SignatureError("X-Hub-Signature-256 is not sha256=<hex>")
    expected = sign_github(cfg.secret, body).removeprefix("sha256=")
    if not hmac.compare_digest(expected.encode("ascii"), value.lower().encode("ascii", "replace")):
        raise SignatureError("signature does not match")


def _verify_hmac(cfg: VerifyConfig, headers: Mapping[str, str], body: bytes) -> None:
    name = (cfg.header or "").lower()
    given = headers.get(name)
    if not given:
        raise SignatureError(f"missing {cfg.header} header")
    given = given.strip()
    if cfg.prefix:
        if not given.startswith(cfg.prefix):
            raise SignatureError(f"{cfg.header} does not start with {cfg.prefix!r}")
        given = given[len(cfg.prefix):]
    expected = _hmac(signing_key(cfg.scheme, cfg.secret), body)
    if cfg.encoding == "hex":
        ok = hmac.compare_digest(
            expected.hex().encode("ascii"), given.lower().encode("ascii", "replace")
        )
    else:
        try:
            ok = hmac.compare_digest(expected, base64.b64decode(given, validate=True))
        except (binascii.Error, ValueError):
            raise SignatureError(f"{cfg.header} is not base64") from None
    if not ok:
        raise SignatureError("signature does not match")


def verify(cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
    """Check the signature of one request.

    Args:
      cfg: The route's ``verify`` section.
      headers: Request headers with lower-case names (``RequestHead.headers``).
      body: The raw body, exactly as received.
      now: Current Unix time, for the Standard Webhooks timestamp tolerance.

    Raises:
      SignatureError: with a reason safe to return to the sender; always when no secret is
        configured (an empty key would let anyone sign: the config loader refuses it too).
    """
    if not signing_key(cfg.scheme, cfg.secret):
        raise SignatureError("no signing secret is configured for this route")
    if cfg.scheme == "standard-webhooks":
        _verify_standard(cfg, headers, body, now)
    elif cfg.scheme == "github":
        _verify_github(cfg, headers, body)
    else:
        _verify_hmac(cfg, headers, body)
