"""A Server-Sent Events parser (WHATWG HTML, "Parsing an event stream"), fed byte chunks.

Handles what real streams do: lines ending in LF, CR or CRLF (also split across chunks),
several ``data:`` lines joined by ``\\n``, ``:`` comments (keep-alives), ``event:``, ``id:``
and ``retry:`` fields, a leading BOM, and an event still pending at EOF without the final
blank line (dispatched by :meth:`SSEParser.close`, as most clients do, rather than dropped).
We never reconnect: a chat stream is one request.

One event is capped (:data:`MAX_EVENT_SIZE` characters: its pending line and its ``data:``
lines so far): past it the parser raises a :class:`~mfo_actors.client.ValidationError`
instead of buffering what a broken or hostile upstream sends without ever ending a line or
an event; the caller's ``async with`` then closes the stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from dataclasses import dataclass

from mfo_actors.client.errors import ValidationError

__all__ = ["MAX_EVENT_SIZE", "SSEEvent", "SSEParser", "iter_sse"]

MAX_EVENT_SIZE = 1024 * 1024  # characters of one event (a chat chunk is a few hundred)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Incremental parser: :meth:`feed` bytes, get the events completed so far.

    Args:
      max_event_size: Characters one event may hold (pending line and data lines together).
    """

    def __init__(self, max_event_size: int = MAX_EVENT_SIZE) -> None:
        self._max = max_event_size
        self._size = 0  # characters of the data lines of the event being read
        self._buffer = ""
        self._decoder_tail = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._started = False
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse *chunk*; return the events that a blank line completed."""
        text = self._decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across two chunks
        self._pending_cr = False
        self._buffer += text
        events = list(self._drain_lines())
        self._check(len(self._buffer))
        return events

    def _check(self, pending: int) -> None:
        """Raise ValidationError once the event being read holds more than the cap."""
        if self._size + pending > self._max:
            raise ValidationError(
                f"stream event larger than {self._max} characters (an unterminated line or "
                f"event): the stream is closed", field=None)

    def close(self) -> list[SSEEvent]:
        """End of stream: a last line without its terminator, and a pending event, count."""
        events: list[SSEEvent] = []
        if self._decoder_tail:
            self._buffer += self._decoder_tail.decode("utf-8", "replace")
            self._decoder_tail = b""
        if self._buffer:
            line, self._buffer = self._buffer, ""
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _decode(self, chunk: bytes) -> str:
        data = self._decoder_tail + chunk
        # Keep an incomplete UTF-8 sequence at the end for the next chunk.
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
                continue
            if byte & 0x80:  # lead byte: is its sequence complete?
                need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
                if back < need:
                    cut = len(data) - back
            break
        self._decoder_tail = data[cut:]
        return data[:cut].decode("utf-8", "replace")

    def _drain_lines(self) -> Iterator[SSEEvent]:
        buf = self._buffer
        start = 0
        length = len(buf)
        while start < length:
            lf = buf.find("\n", start)
            cr = buf.find("\r", start)
            if lf == -1 and cr == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end = cr
                if cr + 1 < length:
                    nxt = cr + 2 if buf[cr + 1] == "\n" else cr + 1
                else:  # CR at the very end: its LF may come with the next chunk
                    nxt = cr + 1
                    self._pending_cr = True
            else:
                end, nxt = lf, lf + 1
            line = buf[start:end]
            start = nxt
            event = self._process_line(line)
            if event is not None:
                yield event
        self._buffer = buf[start:]

    def _process_line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1
            self._check(0)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event, self._size = [], "", 0
        if not data:  # the spec: an event without data is not dispatched
            return None
        return SSEEvent(data="\n".join(data), event=event or "message", id=self._id,
                        retry=self._retry)


async def iter_sse(chunks: AsyncIterable[bytes], *, max_event_size: int = MAX_EVENT_SIZE
                   ) -> AsyncGenerator[SSEEvent, None]:
    """Events from a byte stream, the last pending one included at EOF.

    Close it (``contextlib.aclosing``) when you stop before the end; it does not close
    *chunks*, which belong to the caller.

    Raises:
      ValidationError: one event exceeds *max_event_size* characters."""
    parser = SSEParser(max_event_size)
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event
