"""A bounded multipart/form-data reader for the OpenAI-shaped edits endpoint (relay.web.openai_compat).

The body is read with a byte cap first, then split by relay.multipart (the parser the simulator uses too),
so nothing past the cap is ever held.
"""

from __future__ import annotations

from starlette.requests import Request

from relay.multipart import Part, boundary_of, parse
from relay.web.common import read_body


async def read_form(request: Request, limit: int) -> list[Part]:
    """The parts of a multipart/form-data body of at most `limit` bytes, in order.

    PayloadTooLarge past the limit; UnsupportedMediaType when the body is not multipart/form-data;
    InvalidRequest when it is malformed."""
    boundary = boundary_of(request.headers.get("content-type", ""))
    return parse(boundary, await read_body(request, limit))
