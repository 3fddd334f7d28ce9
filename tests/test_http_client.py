"""The lean HTTP client (``mfo_actors.http.UpstreamPool``) against a scripted upstream on a
real socket: keep-alive, closes, framing, caps, garbage, TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import anyio
import pytest
import trustme

from mfo_actors.http import ExchangeError, UpstreamPool, header_line
from tests.raw_upstream import (
    CLOSE,
    STALL,
    answer,
    raw_upstream,
    refusing_upstream,
    then_close,
    trickle,
)
from tests.test_listener_reload import client_context, write_cert

pytestmark = pytest.mark.anyio

CAP = 1024


def pool(url: str, **kw: object) -> UpstreamPool:
    return UpstreamPool(url + "/api/events", headers=header_line("Accept", "application/json"),
                        **kw)  # type: ignore[arg-type]


class TestKeepAlive:
    async def test_requests_reuse_one_connection(self) -> None:
        """Sequential requests go over one kept-alive connection, each with its own
        Content-Length and header lines after the prebuilt head."""
        async with raw_upstream([], default=answer(202, b'{"id":"x"}')) as up:
            async with pool(up.url) as client:
                for n in range(5):
                    got = await client.post(
                        b'{"n":%d}' % n, header_lines=header_line("Idempotency-Key", f"k{n}"),
                        cap=CAP)
                    assert (got.status, got.body, got.truncated) == (202, b'{"id":"x"}', False)
        assert up.connections == 1
        first = up.requests[0]
        assert first.startswith(b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nAccept: application/json\r\nIdempotency-Key: k0\r\n" in first
        assert first.endswith(b"Content-Length: 7\r\n\r\n{\"n\":0}")

    async def test_server_closing_between_requests_is_retried_on_a_new_connection(
        self) -> None:
        """A kept-alive connection the server closed after its answer (a keep-alive timeout
        the client could not see) costs nothing: the request goes out again, once."""
        ok = answer(200, b"{}")
        async with raw_upstream([then_close(ok), then_close(ok), ok]) as up:
            async with pool(up.url) as client:
                for _ in range(3):
                    assert (await client.post(b"{}", cap=CAP)).status == 200
        assert up.connections == 3 and len(up.requests) == 3

    async def test_connection_close_answer_is_not_reused(self) -> None:
        """``Connection: close`` is obeyed: the next request opens a new connection."""
        closing = answer(200, b"{}", "Connection: close")
        async with raw_upstream([closing, answer(200, b"{}")]) as up:
            async with pool(up.url) as client:
                await client.post(b"{}", cap=CAP)
                await client.post(b"{}", cap=CAP)
        assert up.connections == 2

    async def test_a_fresh_connection_closed_without_answer_is_an_error(self) -> None:
        """Only a reused connection is retried: a new one that gets no answer fails."""
        async with raw_upstream([CLOSE]) as up:
            async with pool(up.url) as client:
                with pytest.raises(ExchangeError) as err:
                    await client.post(b"{}", cap=CAP)
        assert err.value.kind in ("closed", "network") and up.connections == 1

    async def test_refused_connection_is_a_connect_error(self) -> None:
        async with raw_upstream([]) as up:
            url = up.url
        async with pool(url) as client:
            with pytest.raises(ExchangeError) as err:
                await client.post(b"{}", cap=CAP)
        assert err.value.kind == "connect"


class TestFraming:
    async def test_chunked_answer(self) -> None:
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n")
        async with raw_upstream([chunked, answer(201, b"[]")]) as up:
            async with pool(up.url) as client:
                got = await client.post(b"{}", cap=CAP)
                assert (got.status, got.body) == (200, b'{"a":1}')
                assert (await client.post(b"{}", cap=CAP)).body == b"[]"
        assert up.connections == 1

    async def test_answer_delimited_by_close(self) -> None:
        """No Content-Length, no chunking: the body ends with the connection."""
        async with raw_upstream([then_close(b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\n\r\nbusy")]
                                ) as up:
            async with pool(up.url) as client:
                got = await client.post(b"{}", cap=CAP)
        assert (got.status, got.body, got.headers["retry-after"]) == (503, b"busy", "3")

    async def test_informational_answer_is_skipped(self) -> None:
        async with raw_upstream([b"HTTP/1.1 100 Continue\r\n\r\n" + answer(204)]) as up:
            async with pool(up.url) as client:
                got = await client.post(b"{}", cap=CAP)
        assert got.status == 204

    async def test_oversized_body_is_capped_and_the_connection_dropped(self) -> None:
        big = answer(500, b"x" * (CAP * 10))
        async with raw_upstream([big, answer(200, b"{}")]) as up:
            async with pool(up.url) as client:
                got = await client.post(b"{}", cap=CAP)
                assert (got.status, len(got.body), got.truncated) == (500, CAP, True)
                assert (await client.post(b"{}", cap=CAP)).status == 200
        assert up.connections == 2

    async def test_body_of_exactly_the_cap_is_whole(self) -> None:
        async with raw_upstream([answer(200, b"y" * CAP)]) as up:
            async with pool(up.url) as client:
                got = await client.post(b"{}", cap=CAP)
        assert (len(got.body), got.truncated) == (CAP, False)

    @pytest.mark.parametrize("garbage", [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ])
    async def test_garbage_is_a_protocol_error(self, garbage: bytes) -> None:
        async with raw_upstream([garbage]) as up:
            async with pool(up.url) as client:
                with pytest.raises(ExchangeError) as err:
                    await client.post(b"{}", cap=CAP)
        assert err.value.kind == "protocol"

    async def test_answer_cut_off_is_closed(self) -> None:
        async with raw_upstream([then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")]
                                ) as up:
            async with pool(up.url) as client:
                with pytest.raises(ExchangeError) as err:
                    await client.post(b"{}", cap=CAP)
        assert err.value.kind == "closed"

    async def test_large_request_body_goes_out_whole(self) -> None:
        body = b"[" + b"1," * 100_000 + b"1]"
        async with raw_upstream([answer(200)]) as up:
            async with pool(up.url) as client:
                await client.post(body, cap=CAP)
        assert up.requests[0].endswith(body)


    async def test_large_body_on_a_connection_the_server_closed_goes_out_again(self) -> None:
        """A large body (sent while the answer is read) on a kept-alive connection the server
        closed after its last answer: no answer on it, so the request goes out once more on a
        new connection, as a small one does."""
        body = b"x" * 200_000
        ok = answer(200, b"{}")
        async with raw_upstream([then_close(ok), then_close(ok), ok]) as up:
            async with pool(up.url) as client:
                for _ in range(3):
                    assert (await client.post(body, cap=CAP)).status == 200
        assert up.connections == 3 and len(up.requests) == 3
        assert all(r.endswith(body) for r in up.requests)

    async def test_answer_before_the_body_was_read_is_the_outcome(self) -> None:
        """A server that refuses a large body after its head (413) and closes resets the
        connection under the body still being sent: the answer that came is the outcome,
        not the write error, and the connection is not used again."""
        refused = answer(413, b"too large", "Connection: close")
        async with refusing_upstream(refused) as up:
            async with pool(up.url) as client:
                for _ in range(2):
                    got = await client.post(b"x" * 8_000_000, cap=CAP)
                    assert (got.status, got.body) == (413, b"too large")
        assert up.connections == 2
        assert up.requests[0].startswith(b"POST /api/events HTTP/1.1\r\n")


class TestTimeouts:
    async def test_cancelled_exchange_drops_the_connection(self) -> None:
        """A caller's deadline mid-answer closes that connection; the next request opens a
        new one (the old one may still carry the late answer)."""
        async with raw_upstream([trickle(answer(200, b"{}"), 0.05), answer(200, b"{}")]) as up:
            async with pool(up.url) as client:
                with anyio.move_on_after(0.1) as scope:
                    await client.post(b"{}", cap=CAP)
                assert scope.cancelled_caught
                assert (await client.post(b"{}", cap=CAP)).status == 200
        assert up.connections == 2

    async def test_stalled_server_is_bounded_by_the_caller(self) -> None:
        async with raw_upstream([STALL]) as up:
            async with pool(up.url) as client:
                with anyio.move_on_after(0.1) as scope:
                    await client.post(b"{}", cap=CAP)
        assert scope.cancelled_caught


class TestTls:
    async def test_https_with_a_self_signed_certificate(self, tmp_path: Path) -> None:
        """TLS to an upstream whose CA the client context trusts; kept alive like plain."""
        ca = trustme.CA()
        pem = write_cert(ca, tmp_path, "upstream")

        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(pem)
        async with raw_upstream([], default=answer(202, b"{}"),
                                ssl_context=server_context) as up:
            async with pool(up.url, ssl_context=client_context(ca)) as client:
                for _ in range(3):
                    assert (await client.post(b"{}", cap=CAP)).status == 202
        assert up.connections == 1

    async def test_large_bodies_and_an_early_refusal_over_tls(self, tmp_path: Path) -> None:
        """A large body is sent while the answer is read on a TLS stream too: taken whole
        (kept alive), and refused early (the 413 is the outcome)."""
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(write_cert(ca, tmp_path, "upstream"))
        body = b"x" * 8_000_000
        async with raw_upstream([], default=answer(202, b"{}"),
                                ssl_context=server_context) as up:
            async with pool(up.url, ssl_context=client_context(ca)) as client:
                for _ in range(2):
                    assert (await client.post(body, cap=CAP)).status == 202
        assert up.connections == 1 and all(r.endswith(body) for r in up.requests)
        async with refusing_upstream(answer(413, b"too large"),
                                     ssl_context=server_context) as up:
            async with pool(up.url, ssl_context=client_context(ca)) as client:
                got = await client.post(body, cap=CAP)
        assert (got.status, got.body) == (413, b"too large")

    async def test_untrusted_certificate_is_a_connect_error(self, tmp_path: Path) -> None:
        pem = write_cert(trustme.CA(), tmp_path, "upstream")
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(pem)
        async with raw_upstream([], default=answer(202), ssl_context=server_context) as up:
            async with pool(up.url, ssl_context=client_context(trustme.CA())) as client:
                with pytest.raises(ExchangeError) as err:
                    await client.post(b"{}", cap=CAP)
        assert err.value.kind == "connect"
        assert "certificate" in err.value.detail.lower()


def test_header_values_cannot_inject_lines() -> None:
    with pytest.raises(ValueError):
        header_line("Authorization", "Bearer x\r\nX-Evil: 1")


def test_https_needs_a_context() -> None:
    with pytest.raises(ValueError):
        UpstreamPool("https://example.test/api/events")
