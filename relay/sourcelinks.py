"""What relay reads from an image link it is asked to archive: its identity and when it dies. Pure.

`normalize_url` gives the form two spellings of one link share (so the same link twice is one archive);
`url_key` hashes it. `expiry_from_url` reads the expiry that signed-URL schemes write into the query:

    X-Amz-Date + X-Amz-Expires       AWS SigV4 presigned URLs (S3, R2, MinIO, …)
    X-Goog-Date + X-Goog-Expires     Google Cloud Storage V4 signed URLs
    Expires=<unix seconds>           CloudFront, GCS V2, S3 SigV2 (also used by many CDNs)
    se=<ISO 8601>                    Azure Blob SAS ("signed expiry")

A link that says nothing (or says it badly) gets None: the caller assumes its default (24 h).
"""

from __future__ import annotations

import calendar
import hashlib
import re
import time
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from relay.netguard import DEFAULT_PORTS

# Far-off or nonsensical values are not an expiry anyone meant (an Expires in milliseconds, a year 9999).
MAX_LIFETIME = 10 * 365 * 86400.0


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased, the default port and the fragment dropped, query pairs sorted.

    Only for recognising one link written two ways; the link itself is always fetched as given.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None or DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    pairs = sorted(parse_qsl(parts.query, keep_blank_values=True))
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def url_key(url: str) -> str:
    """The dedupe key of a link: sha256 of its normalized form (fixed length, whatever the URL's)."""
    return hashlib.sha256(normalize_url(url).encode()).hexdigest()


def expiry_from_url(url: str, *, now: float) -> float | None:
    """When the link says it expires (unix seconds), or None when it does not say, or says nonsense."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        params.setdefault(key.lower(), value)
    found = (_signed_window(params, "x-amz-date", "x-amz-expires")
             or _signed_window(params, "x-goog-date", "x-goog-expires")
             or _unix_seconds(params.get("expires"))
             or _iso_time(params.get("se")))
    if found is None or not now - MAX_LIFETIME < found < now + MAX_LIFETIME:
        return None
    return found


def _signed_window(params: dict[str, str], date_name: str, expires_name: str) -> float | None:
    """SigV4 style: signed at `YYYYMMDD'T'HHMMSS'Z'`, valid for N seconds after."""
    signed, lifetime = params.get(date_name), params.get(expires_name)
    # At most 12 digits, as for Expires=: a 400-digit lifetime overflows float() (a 500, found by review).
    if not signed or not lifetime or not lifetime.isascii() or not lifetime.isdigit() or len(lifetime) > 12:
        return None
    try:
        start = calendar.timegm(time.strptime(signed, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None
    return float(start + int(lifetime))


def _unix_seconds(value: str | None) -> float | None:
    if not value or not value.isascii() or not value.isdigit() or len(value) > 12:
        return None
    return float(int(value))


_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$")


def _iso_time(value: str | None) -> float | None:
    """Azure's `se`: a UTC date, or date and time (`2026-11-29`, `2026-11-29T10:00Z`, `…T10:00:00Z`)."""
    if not value:
        return None
    match = _ISO.match(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        seconds = calendar.timegm((int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                   int(second or 0), 0, 0, 0))
        time.strptime(f"{year}-{month}-{day}", "%Y-%m-%d")   # calendar.timegm accepts February 31st
    except (ValueError, OverflowError):
        return None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return float(seconds)
