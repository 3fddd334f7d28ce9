"""The request parser alone (sans-IO): what it adds to llhttp, byte by byte, no sockets.

The socket-level behaviour (answers, closes, timeouts) is pinned in test_http_server.py and
test_http_hostile.py; these pin the parser's own decisions, including heads split across
reads, which a socket test cannot place exactly.
"""

from __future__ import annotations

import pytest

from mfo_actors.http import HttpError, HttpLimits
from mfo_actors.http._parser import END, NEED_DATA, Event, ParsedHead, RequestParser


def events(*chunks: bytes, limits: HttpLimits = HttpLimits()) -> list[Event]:
    parser = RequestParser(limits, ("127.0.0.1", 1))
    out: list[Event] = []
    for data in chunks:
        parser.feed(data)
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def head(data: bytes) -> ParsedHead:
    (first, *_) = events(data)
    assert isinstance(first, ParsedHead), first
    return first


def error(*chunks: bytes, limits: HttpLimits = HttpLimits()) -> HttpError:
    last = events(*chunks, limits=limits)[-1]
    assert isinstance(last, HttpError), last
    return last


class TestHeads:
    def test_head_fields(self) -> None:
        """Names lower-cased, values trimmed both sides, the last of a repeated header wins
        in ``headers`` while ``raw_headers`` keeps both, the query split off."""
        parsed = head(b"POST /hooks/a?x=1 HTTP/1.1\r\nHost: t\r\nX-A:  v1  \r\nX-A: v2\r\n"
                      b"Content-Length: 0\r\n\r\n")
        h = parsed.head
        assert (h.method, h.path, h.query, h.client) == ("POST", "/hooks/a", "x=1",
                                                         ("127.0.0.1", 1))
        assert h.headers["x-a"] == "v2"
        assert [v for k, v in h.raw_headers if k == "x-a"] == ["v1", "v2"]
        assert parsed.keep_alive and not parsed.has_body and not parsed.close_after

    def test_absolute_form_is_routed_by_path(self) -> None:
        h = head(b"GET HTTP://example.com:80?q=1 HTTP/1.1\r\nHost: t\r\n\r\n").head
        assert (h.path, h.query) == ("/", "q=1")

    def test_head_split_across_reads(self) -> None:
        out = events(b"POST /a", b"bc HTTP/1.1\r\nHo", b"st: t\r\nContent-Le", b"ngth: 2\r\n\r\n{",
                     b"}")
        assert isinstance(out[0], ParsedHead) and out[0].head.path == "/abc"
        assert out[1:] == [b"{", b"}", END]

    def test_pipelined_requests_come_in_order(self) -> None:
        out = events(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 1\r\n\r\nzGET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
        paths = [e.head.path for e in out if isinstance(e, ParsedHead)]
        assert paths == ["/1", "/2", "/3"]
        assert out.count(END) == 3 and b"z" in out

    def test_http_1_0_is_not_kept_alive(self) -> None:
        assert not head(b"GET / HTTP/1.0\r\n\r\n").keep_alive

    def test_connection_close_is_not_kept_alive(self) -> None:
        assert not head(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").keep_alive

    def test_expect_100_continue(self) -> None:
        assert head(b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-Continue\r\n"
                    b"Content-Length: 3\r\n\r\n").expect_continue


class TestFraming:
    def test_content_length_with_chunked_is_framed_by_chunked_and_closes(self) -> None:
        out = events(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        first = out[0]
        assert isinstance(first, ParsedHead) and first.close_after and not first.keep_alive
        assert out[1:] == [b"abc", END]

    def test_transfer_coding_other_than_chunked_is_501(self) -> None:
        assert error(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     ).status == 501

    @pytest.mark.parametrize("line", [b"GET / HTTP/2.0", b"GET / HTTP/1.2", b"GET / HTTP/3.0",
                                      b"PRI * HTTP/2.0"])
    def test_other_versions_are_505(self, line: bytes) -> None:
        assert error(line + b"\r\nHost: t\r\n\r\n").status == 505

    @pytest.mark.parametrize("data", [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: zz\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ])
    def test_malformed_is_400(self, data: bytes) -> None:
        assert error(data).status == 400

    def test_trailers_are_not_headers(self) -> None:
        out = events(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"1\r\nx\r\n0\r\nX-Trailer: t\r\n\r\n")
        first = out[0]
        assert isinstance(first, ParsedHead) and "x-trailer" not in first.head.headers
        assert out[1:] == [b"x", END]

    def test_upgrade_without_body_is_served_then_closed(self) -> None:
        out = events(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                     b"Connection: upgrade\r\n\r\nnot http any more")
        first = out[0]
        assert isinstance(first, ParsedHead) and first.close_after
        assert out[1:] == [END]

    def test_upgrade_with_body_is_400(self) -> None:
        assert error(b"POST / HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\nConnection: upgrade\r\n"
                     b"Content-Length: 2\r\n\r\n{}").status == 400


class TestLimits:
    def test_too_many_headers_is_431(self) -> None:
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(11))
        assert error(b"GET / HTTP/1.1\r\nHost: t\r\n" + lines + b"\r\n",
                     limits=HttpLimits(max_headers=10)).status == 431

    def test_big_head_in_one_read_is_431(self) -> None:
        assert error(b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 3000 + b"\r\n\r\n",
                     limits=HttpLimits(max_header_size=2048)).status == 431

    def test_head_growing_over_reads_is_cut_off(self) -> None:
        """A head that never ends is refused once it passes the limit (plus one read), not
        gathered in memory for ever."""
        limits = HttpLimits(max_header_size=2048)
        parser = RequestParser(limits, None)
        parser.feed(b"GET / HTTP/1.1\r\nHost: t\r\nX: ")
        fed = 0
        while (event := parser.next_event()) is NEED_DATA and fed < 1024 * 1024:
            parser.feed(b"a" * 1000)
            fed += 1000
        assert isinstance(event, HttpError) and event.status == 431
        assert fed <= 2048 + 2000

    def test_endless_trailer_is_cut_off(self) -> None:
        parser = RequestParser(HttpLimits(max_header_size=2048), None)
        parser.feed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"1\r\nx\r\n0\r\nX-T: ")
        seen: list[Event] = []
        for _ in range(1000):
            parser.feed(b"b" * 1000)
            while (event := parser.next_event()) is not NEED_DATA:
                seen.append(event)
            if seen and isinstance(seen[-1], HttpError):
                break
        last = seen[-1]
        assert isinstance(last, HttpError) and last.status == 431

    def test_nothing_is_parsed_after_an_error(self) -> None:
        out = events(b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert len(out) == 1 and isinstance(out[0], HttpError)


class TestWholeBody:
    """``whole_body``: the connection takes a body that came with its head at once, and
    reads event by event otherwise (nothing taken then)."""

    @staticmethod
    def parsed(*chunks: bytes) -> RequestParser:
        parser = RequestParser(HttpLimits(), None)
        for data in chunks:
            parser.feed(data)
        assert isinstance(parser.next_event(), ParsedHead)
        return parser

    def test_a_body_queued_whole_is_taken_with_its_end(self) -> None:
        parser = self.parsed(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
                             b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        assert parser.whole_body(2) == b"{}"
        nxt = parser.next_event()  # the pipelined request behind it is untouched
        assert isinstance(nxt, ParsedHead) and nxt.head.path == "/next"

    @pytest.mark.parametrize("chunks", [
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n{}",),  # half of it
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n{}", b"{}"),  # two pieces
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\n2\r\n{}\r\n0\r\n\r\n",),  # two chunks
    ])
    def test_otherwise_nothing_is_taken(self, chunks: tuple[bytes, ...]) -> None:
        parser = self.parsed(*chunks)
        queued = list(parser._events)
        assert parser.whole_body(100) is None
        assert list(parser._events) == queued

    def test_a_body_over_the_limit_is_left_to_the_event_path(self) -> None:
        parser = self.parsed(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"4\r\nabcd\r\n0\r\n\r\n")
        assert parser.whole_body(3) is None
        assert parser.next_event() == b"abcd" and parser.next_event() is END
