"""Limits on what a client may send before relay sees a request: the size of its head and the time it takes.

uvicorn on httptools (what `relay serve` runs) sets neither. It appends every piece of a request line and every
header it is given, without a cap (httptools grows a header's value piece by piece too), and it starts no timer
until a first response has been sent. So one client could grow relay's memory without end by sending a header
that never ends (the copies also cost the event loop more as it grows), and any number of clients could hold
connections open forever by sending nothing, or a byte now and then (slowloris), until relay runs out of file
descriptors. Neither needs an API key.

Here:
- A request's line and headers may take at most HEAD_BYTES; past that the client is answered 431 in relay's
  error shape and the connection is closed.
- A connection that has no request under way (just opened, or its last response sent) must bring a whole
  request head within HEAD_SECONDS, however it trickles in, or it is closed. uvicorn's own keep-alive timeout
  (5 s) still closes a connection that stays silent after a response; any byte cancels that one, not this.
  A request body is not timed here: each endpoint caps what it reads, and a slow upload is a legitimate one.
- The 400 for a request httptools cannot parse is in relay's error shape too (uvicorn's is plain text).
- Either refusal ends relay's side of the connection after the answer (a FIN) and then reads and drops what
  still comes for up to LINGER_SECONDS before closing: closed at once with the client's bytes unread, the
  kernel would answer with a reset, which can reach the client before the answer does (a lingering close).
"""

from __future__ import annotations

import asyncio
import json

from relay.web.corked import CorkedHttpToolsProtocol

HEAD_BYTES = 64 * 1024      # a request line and its headers; browsers and proxies stay far below (8-16 KiB)
HEAD_SECONDS = 20.0         # for a whole request head, from the connection or the last response
LINGER_SECONDS = 2.0        # after a refusal, for the client to read it


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


HEAD_TOO_LARGE = _error_response(431, "Request Header Fields Too Large", "payload_too_large",
                                 f"the request line and headers are larger than {HEAD_BYTES} bytes")


class LimitedHttpToolsProtocol(CorkedHttpToolsProtocol):
    """uvicorn's httptools protocol (corked, relay.web.corked) with a bounded request head and a deadline for it.

    `head_seconds` is read when a head becomes due (tests shorten it on a subclass). No timer is made per request:
    a request only notes when its connection's next head is due, and one timer per connection looks now and
    then (a timer made and cancelled for every request cost the bare endpoint a few per cent)."""

    head_seconds = HEAD_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Bytes received that were not body since the last head ended: a head, a chunked body's framing, its
        # trailers (which httptools grows without a cap as it does headers, after the head's deadline stopped).
        self._unbodied = 0
        self._body_bytes = 0           # body received since the last head ended: its framing may grow with it
        self._refused = False          # answered 400/431: what still comes is dropped until the close
        super().connection_made(transport)
        self._head_due: float | None = self.loop.time() + self.head_seconds   # None: a request is under way
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_seconds, self._look)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unbodied += len(data)
        super().data_received(data)
        # Counted before parsing and judged after: what of this read was body is taken off as it is parsed
        # (on_body), and a head still open holds at most one read more than the limit (trailers too: the count
        # starts over where their request's head ended, which may be in their first read). A chunked body's
        # framing may add an eighth of the body (a client writing chunks of 64 bytes stays far below).
        if self._unbodied > HEAD_BYTES + (self._body_bytes >> 3) and not self._refused and \
                not self.transport.is_closing():
            self._refuse(HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self._unbodied = self._body_bytes = 0
        self._head_due = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._unbodied -= len(body)
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        # The next head starts from nothing: a body (perhaps read and dropped after an early answer) must not
        # widen its limit.
        self._unbodied = self._body_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head is due now, unless a pipelined request (its head already in) has just been started.
        if not self._refused and (self.cycle is None or self.cycle.response_complete):
            self._head_due = self.loop.time() + self.head_seconds

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to what httptools cannot parse, in relay's error shape.
        self._refuse(_error_response(400, "Bad Request", "invalid_request", msg))

    def _refuse(self, answer: bytes) -> None:
        self._refused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body or self.pipeline:
                # An earlier request is under way or waits its turn (a pipelined one): the client would read the
                # answer as that request's. As uvicorn does, close.
                self.transport.close()
                return
            # The request under way is the one refused (its trailers): the answer is its own. Its handler sees a
            # client gone (as at a close), sends no 100 Continue, and answers nothing after this.
            cycle.disconnected = True
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
        self.flow.resume_reading()      # the linger reads and drops what comes, also if reading was paused
        self.transport.write(answer)
        if self.transport.can_write_eof():      # not on TLS: there the close after the linger ends it
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _look(self) -> None:
        """The connection's timer: close it if its head is overdue, else look again when it will be due."""
        self._timer = None
        if self.transport.is_closing():
            return
        now, due = self.loop.time(), self._head_due
        if due is not None and now >= due:
            self.transport.close()
            return
        self._timer = self.loop.call_later(self.head_seconds if due is None else due - now, self._look)
