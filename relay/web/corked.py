"""One socket write per response: uvicorn's HTTP protocol with its writes held until the loop's turn ends.

uvicorn writes a response's status line and headers in one `transport.write` and its body in another, and
each write on a socket that has room is a send() system call of its own: two system calls and two TCP
segments for a response of a few bytes (`{"ok":true}` to a provider's callback). Under load those two
calls were a third of the callback endpoint's time on the event loop (py-spy, bench.callbacks; the bare
Starlette baseline pays them too). Here the writes made during one turn of the loop are joined and sent
with one call at the end of the turn (`loop.call_soon`), which for a response sent in one go is one
send().

What else changes, and what does not:
- The real transport still buffers and does the flow control (it calls the protocol's pause_writing and
  resume_writing as before). So that it sees a large body in time to pause its producer, at most HOLD_BYTES
  are held: a write that brings the held bytes to that size sends them at once (a streamed response whose
  producer does not suspend between chunks is sent as it comes, not gathered in memory).
- `close()` and `write_eof()` send what is held first; `abort()` drops it with the connection. When the peer
  ends its side (a request followed by shutdown(SHUT_WR), a TLS close_notify), uvicorn lets the real
  transport close itself: the protocol sends what is held before that (eof_received).
- The bytes leave at the end of the turn, after the other callbacks ready in it: a response is sent up to
  one turn of the loop later than uvicorn alone would send it (microseconds when the loop is idle, about a
  millisecond under full load), and on the loopback the receiver is woken once instead of twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


HOLD_BYTES = 64 * 1024     # held at most; a response head and a small body are far below it


class CorkedTransport:
    """A transport whose writes within one turn of the event loop reach the socket in one write."""

    __slots__ = ("_transport", "_loop", "_held", "_held_bytes", "_ended")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._ended = False          # write_eof() was called: later writes are dropped, as after close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._ended:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= HOLD_BYTES:
            self.flush()        # a large body goes on now: the real transport's flow control must see it

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is held (the scheduled call at the turn's end finds nothing left, or what came after)."""
        held, self._held, self._held_bytes = self._held, [], 0
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def write_eof(self) -> None:
        self.flush()
        self._ended = True     # the real transport would raise on a later write (a handler answering late)
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()            # what was written before close() is sent before the connection ends
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause_reading, resume_reading, ...) is the real one's.
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CorkedTransport (relay serve passes it as uvicorn.Config(http=...))."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.corked = CorkedTransport(transport, self.loop)
        super().connection_made(self.corked)  # type: ignore[arg-type]

    def eof_received(self) -> None:
        # uvicorn answers the peer's end of stream by letting the real transport close itself, which drops
        # what is held: a response already written in this turn (the peer half-closed after its request).
        self.corked.flush()
        super().eof_received()
