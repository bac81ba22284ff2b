"""One socket write per response: uvicorn's HTTP protocol with its writes held until the loop's turn ends.

uvicorn writes a response's status line and headers in one `transport.write` and its body in another, and
each write on a socket that has room is a send() system call of its own: two system calls and two TCP
segments for a response of a few bytes (`{"ok":true}` to a provider's callback). Under load those two
calls were a third of the callback endpoint's time on the event loop (py-spy, bench.callbacks; the bare
Starlette baseline pays them too). Here the writes made during one turn of the loop are joined and sent
with one call at the end of the turn (`loop.call_soon`), which for a response sent in one go is one
send().

Nothing else changes: the real transport still does the buffering and the flow control (it calls the
protocol's pause_writing and resume_writing as before), `close()` sends what is held first, `abort()` drops
it with the connection. A streamed response still goes out chunk by chunk: its producer awaits between
chunks, and every turn of the loop ends with the held bytes sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CorkedTransport:
    """A transport whose writes within one turn of the event loop reach the socket in one write."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._held)

    def close(self) -> None:
        self._flush()           # what was written before close() is sent before the connection ends
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause_reading, resume_reading, ...) is the real one's.
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CorkedTransport (relay serve passes it as uvicorn.Config(http=...))."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
