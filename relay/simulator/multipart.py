"""A small, exact multipart/form-data reader for the OpenAI edits endpoint.

Starlette's form parser needs python-multipart, which relay does not depend
on; this splits on the boundary by hand so file bytes come back untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from .respond import BodyError


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError(f"form field {self.name!r} is not UTF-8 text") from None


def _header_params(name: str, value: str) -> Message:
    message = Message()
    message[name] = value
    return message


def parse(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/form-data body, in order. BodyError if it is not one."""
    header = _header_params("content-type", content_type)
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise BodyError("expected a multipart/form-data body with a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise BodyError("malformed multipart body: missing closing boundary")
    parts: list[Part] = []
    for section in sections[1:-1]:
        if not section.startswith(b"\r\n") or not section.endswith(b"\r\n"):
            raise BodyError("malformed multipart body: bad part framing")
        head, sep, data = section[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise BodyError("malformed multipart body: a part has no headers")
        fields: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                fields[key.strip().lower()] = value.strip()
        disposition = _header_params("content-disposition", fields.get("content-disposition", ""))
        name = disposition.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise BodyError("malformed multipart body: a part has no name")
        parts.append(Part(name, disposition.get_filename(), fields.get("content-type", "text/plain"), data))
    return parts
