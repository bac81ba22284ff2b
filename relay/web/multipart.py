"""A bounded multipart/form-data reader for the OpenAI-shaped edits endpoint (relay.web.openai_compat).

Starlette's form parser needs python-multipart, which relay does not depend on (the simulator reads its
OpenAI edits the same way, relay.simulator.multipart). The body is read with a byte cap first, then split
on the boundary, so file bytes come back untouched and nothing past the cap is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from starlette.requests import Request

from relay.errors import InvalidRequest, UnsupportedMediaType
from relay.web.common import read_body

MAX_PARTS = 64          # form fields and files together: far more than an edit request has


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field {self.name!r} is not UTF-8 text", field=self.name) from None


def _params(header: str, value: str) -> Message:
    message = Message()
    message[header] = value
    return message


async def read_form(request: Request, limit: int) -> list[Part]:
    """The parts of a multipart/form-data body of at most `limit` bytes, in order.

    PayloadTooLarge past the limit; UnsupportedMediaType when the body is not multipart/form-data;
    InvalidRequest when it is malformed."""
    content_type = _params("content-type", request.headers.get("content-type", ""))
    boundary = content_type.get_param("boundary")
    if content_type.get_content_type() != "multipart/form-data":
        raise UnsupportedMediaType("the body must be multipart/form-data", field="Content-Type")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise InvalidRequest("the multipart/form-data Content-Type has no valid boundary", field="Content-Type")
    return parse(boundary, await read_body(request, limit))


def parse(boundary: str, body: bytes) -> list[Part]:
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise InvalidRequest("malformed multipart body: missing closing boundary")
    if len(sections) - 2 > MAX_PARTS:
        raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
    parts: list[Part] = []
    for section in sections[1:-1]:
        if not section.startswith(b"\r\n") or not section.endswith(b"\r\n"):
            raise InvalidRequest("malformed multipart body: bad part framing")
        head, sep, data = section[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise InvalidRequest("malformed multipart body: a part has no headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        disposition = _params("content-disposition", headers.get("content-disposition", ""))
        name = disposition.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("malformed multipart body: a part has no name")
        parts.append(Part(name, disposition.get_filename(), headers.get("content-type"), data))
    return parts
