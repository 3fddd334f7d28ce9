"""Signature schemes: valid signatures from third-party signers pass, tampering fails."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from mfo_actors.actors._verify import SignatureError, verify
from mfo_actors.config import Duration, VerifyConfig

SW_SECRET = "whsec_" + base64.b64encode(b"a standard webhooks secret, 32b!").decode()
OTHER_SW_SECRET = "whsec_" + base64.b64encode(b"another secret of the same length").decode()
BODY = b'{"type":"invoice.paid","data":{"id":"in_1"}}'


def sw_headers(secret: str, body: bytes, *, ts: float, msg_id: str = "msg_1") -> dict[str, str]:
    """Headers as the `standardwebhooks` reference library signs them."""
    when = datetime.fromtimestamp(ts, tz=UTC)
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(ts)),
            "webhook-signature": signature}


class TestStandardWebhooks:
    cfg = VerifyConfig(scheme="standard-webhooks", secret=SW_SECRET)

    def test_accepts_reference_signature(self) -> None:
        """A signature made by the standardwebhooks library verifies."""
        now = time.time()
        verify(self.cfg, sw_headers(SW_SECRET, BODY, ts=now), BODY, now=now)

    def test_reference_verifier_agrees(self) -> None:
        """The reference library accepts what it signed (guards the test helper itself)."""
        now = time.time()
        Webhook(SW_SECRET).verify(BODY, sw_headers(SW_SECRET, BODY, ts=now))

    def test_accepts_one_of_several_signatures(self) -> None:
        """During key rotation the header carries several signatures; one match is enough."""
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now)
        wrong = sw_headers(OTHER_SW_SECRET, BODY, ts=now)["webhook-signature"]
        headers["webhook-signature"] = f"v1a,xyz {wrong} {headers['webhook-signature']}"
        verify(self.cfg, headers, BODY, now=now)

    def test_rejects_tampered_body(self) -> None:
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now)
        with pytest.raises(SignatureError, match="no matching signature"):
            verify(self.cfg, headers, BODY.replace(b"in_1", b"in_2"), now=now)

    def test_rejects_wrong_secret(self) -> None:
        now = time.time()
        headers = sw_headers(OTHER_SW_SECRET, BODY, ts=now)
        with pytest.raises(SignatureError):
            verify(self.cfg, headers, BODY, now=now)

    def test_rejects_stale_timestamp(self) -> None:
        """A correctly signed but 6-minute-old delivery is a replay: refused."""
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now - 360)
        with pytest.raises(SignatureError, match="too old"):
            verify(self.cfg, headers, BODY, now=now)

    def test_rejects_future_timestamp(self) -> None:
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now + 360)
        with pytest.raises(SignatureError, match="future"):
            verify(self.cfg, headers, BODY, now=now)

    def test_tolerance_is_configurable(self) -> None:
        now = time.time()
        cfg = VerifyConfig(scheme="standard-webhooks", secret=SW_SECRET,
                           tolerance=Duration(3600))
        verify(cfg, sw_headers(SW_SECRET, BODY, ts=now - 1800), BODY, now=now)

    def test_rejects_changed_id(self) -> None:
        """The id is signed too: replaying a body under a new id fails."""
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now)
        headers["webhook-id"] = "msg_2"
        with pytest.raises(SignatureError):
            verify(self.cfg, headers, BODY, now=now)

    @pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
    def test_rejects_missing_header(self, missing: str) -> None:
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now)
        del headers[missing]
        with pytest.raises(SignatureError, match="missing"):
            verify(self.cfg, headers, BODY, now=now)

    def test_rejects_garbage_signature(self) -> None:
        now = time.time()
        headers = sw_headers(SW_SECRET, BODY, ts=now)
        headers["webhook-signature"] = "v1,!!!not-base64!!!"
        with pytest.raises(SignatureError):
            verify(self.cfg, headers, BODY, now=now)


def github_headers(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"x-hub-signature-256": f"sha256={digest}", "x-github-delivery": "d-1"}


class TestGitHub:
    cfg = VerifyConfig(scheme="github", secret="It's a Secret to Everybody")

    def test_accepts_github_documented_example(self) -> None:
        """GitHub's docs give this exact secret, payload and signature."""
        body = b"Hello, World!"
        headers = {"x-hub-signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d"
                   "7586c22c46f4379c8b043e17"}
        verify(self.cfg, headers, body, now=time.time())

    def test_accepts_valid(self) -> None:
        verify(self.cfg, github_headers(self.cfg.secret, BODY), BODY, now=0)

    def test_rejects_tampered_body(self) -> None:
        with pytest.raises(SignatureError, match="does not match"):
            verify(self.cfg, github_headers(self.cfg.secret, BODY), BODY + b" ", now=0)

    def test_rejects_wrong_secret(self) -> None:
        with pytest.raises(SignatureError):
            verify(self.cfg, github_headers("wrong", BODY), BODY, now=0)

    def test_rejects_missing_or_sha1(self) -> None:
        with pytest.raises(SignatureError, match="missing"):
            verify(self.cfg, {}, BODY, now=0)
        with pytest.raises(SignatureError, match="sha256"):
            verify(self.cfg, {"x-hub-signature-256": "sha1=abc"}, BODY, now=0)


class TestHmacSha256:
    def test_hex_with_prefix(self) -> None:
        cfg = VerifyConfig(scheme="hmac-sha256", secret="s3cret", header="X-Signature",
                           prefix="sha256=")
        sig = hmac.new(b"s3cret", BODY, hashlib.sha256).hexdigest().upper()
        verify(cfg, {"x-signature": f"sha256={sig}"}, BODY, now=0)
        with pytest.raises(SignatureError, match="start with"):
            verify(cfg, {"x-signature": sig}, BODY, now=0)

    def test_base64(self) -> None:
        cfg = VerifyConfig(scheme="hmac-sha256", secret="s3cret", header="X-Sig",
                           encoding="base64")
        sig = base64.b64encode(hmac.new(b"s3cret", BODY, hashlib.sha256).digest()).decode()
        verify(cfg, {"x-sig": sig}, BODY, now=0)
        with pytest.raises(SignatureError, match="does not match"):
            verify(cfg, {"x-sig": sig}, BODY[:-1], now=0)
        with pytest.raises(SignatureError, match="base64"):
            verify(cfg, {"x-sig": "%%%"}, BODY, now=0)

    def test_rejects_wrong_secret_and_missing_header(self) -> None:
        cfg = VerifyConfig(scheme="hmac-sha256", secret="s3cret", header="X-Sig")
        sig = hmac.new(b"other", BODY, hashlib.sha256).hexdigest()
        with pytest.raises(SignatureError, match="does not match"):
            verify(cfg, {"x-sig": sig}, BODY, now=0)
        with pytest.raises(SignatureError, match="missing X-Sig"):
            verify(cfg, {}, BODY, now=0)
