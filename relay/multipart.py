"""multipart/form-data, read exactly: the one parser behind relay's OpenAI-shaped edits endpoint
(relay.web.multipart) and the simulator's (relay.simulator.dialects.openai).

Starlette's form parser needs python-multipart, which relay does not depend on. The body is split on the
boundary by hand, so file bytes come back untouched. UnsupportedMediaType when the Content-Type is not
multipart/form-data; InvalidRequest when it has no usable boundary or the body is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from relay.errors import InvalidRequest, UnsupportedMediaType

MAX_PARTS = 64          # form fields and files together: far more than an edit request has
MAX_BOUNDARY = 200


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


def boundary_of(content_type: str) -> str:
    """The boundary of a multipart/form-data Content-Type header value."""
    header = _params("content-type", content_type)
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data":
        raise UnsupportedMediaType("the body must be multipart/form-data", field="Content-Type")
    if not isinstance(boundary, str) or not boundary or len(boundary) > MAX_BOUNDARY:
        raise InvalidRequest("the multipart/form-data Content-Type has no valid boundary", field="Content-Type")
    return boundary


def parse(boundary: str, body: bytes) -> list[Part]:
    """The parts of a multipart/form-data body, in order (at most MAX_PARTS)."""
    delimiter = b"--" + boundary.encode("latin-1")
    # Counted before splitting: a body that is nothing but delimiters would otherwise be cut into millions of
    # small bytes objects (about 8x the body in memory) before the limit refused it.
    if body.count(delimiter) - 1 > MAX_PARTS:
        raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise InvalidRequest("malformed multipart body: missing closing boundary")
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
