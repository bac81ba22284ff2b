"""Reading a link: its normalized identity (one archive per link) and the expiry signed into it."""

from __future__ import annotations

import calendar

import pytest

from relay.sourcelinks import expiry_from_url, normalize_url, url_key

NOW = float(calendar.timegm((2026, 11, 28, 12, 0, 0, 0, 0, 0)))


def utc(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:9]))


def test_aws_sigv4_expiry_is_signing_time_plus_lifetime() -> None:
    """X-Amz-Date + X-Amz-Expires (any letter case) give the end of the presigned window."""
    url = ("https://bucket.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20261128T100000Z"
           "&X-Amz-Expires=3600&X-Amz-Signature=abc")
    assert expiry_from_url(url, now=NOW) == utc(2026, 11, 28, 11, 0, 0)
    assert expiry_from_url(url.lower().replace("bucket", "b"), now=NOW) == utc(2026, 11, 28, 11, 0, 0)


def test_gcs_v4_expiry() -> None:
    """Google's X-Goog-Date + X-Goog-Expires work like AWS's."""
    url = "https://storage.googleapis.com/b/o.png?X-Goog-Date=20261128T000000Z&X-Goog-Expires=86400&X-Goog-Signature=s"
    assert expiry_from_url(url, now=NOW) == utc(2026, 11, 29, 0, 0, 0)


def test_cloudfront_and_gcs_v2_expires_unix_seconds() -> None:
    """Expires=<unix seconds> (CloudFront, GCS V2, S3 SigV2) is the expiry itself."""
    assert expiry_from_url(f"https://d1.cloudfront.net/a.webp?Expires={int(NOW) + 600}&Signature=x&Key-Pair-Id=K",
                           now=NOW) == NOW + 600


@pytest.mark.parametrize(("se", "expected"), [
    ("2026-11-29T10:00:00Z", utc(2026, 11, 29, 10, 0, 0)),
    ("2026-11-29T10:00Z", utc(2026, 11, 29, 10, 0, 0)),
    ("2026-11-29", utc(2026, 11, 29, 0, 0, 0)),
    ("2026-11-29T12:00:00+02:00", utc(2026, 11, 29, 10, 0, 0)),
])
def test_azure_sas_signed_expiry(se: str, expected: float) -> None:
    """Azure's `se` (signed expiry) in each ISO 8601 form a SAS token uses."""
    url = f"https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&se={se.replace('+', '%2B')}&sp=r&sig=x"
    assert expiry_from_url(url, now=NOW) == expected


@pytest.mark.parametrize("url", [
    "https://cdn.example/a.png",                                    # says nothing
    "https://cdn.example/a.png?Expires=soon",                       # not a number
    "https://cdn.example/a.png?Expires=1795000000000",              # milliseconds: not meant as seconds
    "https://cdn.example/a.png?X-Amz-Date=20261128T100000Z",        # no lifetime
    "https://cdn.example/a.png?X-Amz-Date=bogus&X-Amz-Expires=60",  # no signing time
    "https://cdn.example/a.png?se=2026-02-31",                      # no such day
    "https://cdn.example/a.png?se=tomorrow",
    "https://cdn.example/a.png?X-Amz-Date=20261128T100000Z&X-Amz-Expires=" + "9" * 400,   # overflowed float()
    "https://cdn.example/a.png?X-Goog-Date=20261128T100000Z&X-Goog-Expires=" + "9" * 5000,  # int() refused it
])
def test_links_that_do_not_say_give_none(url: str) -> None:
    """Absent or nonsensical expiry parameters give None (the caller then assumes 24 h)."""
    assert expiry_from_url(url, now=NOW) is None


def test_a_link_already_expired_reads_as_past() -> None:
    """An expiry in the past is reported as is: the archive job fails it at once as expired."""
    assert expiry_from_url(f"https://x.test/a.png?Expires={int(NOW) - 5}", now=NOW) == NOW - 5


def test_normalized_spellings_of_one_link_share_a_key() -> None:
    """Host case, default port, fragment and query order do not make a different link; path and values do."""
    a = "https://CDN.Example.com:443/img/a.png?b=2&a=1#frag"
    b = "https://cdn.example.com/img/a.png?a=1&b=2"
    assert normalize_url(a) == normalize_url(b) == "https://cdn.example.com/img/a.png?a=1&b=2"
    assert url_key(a) == url_key(b)
    assert url_key("https://cdn.example.com/img/A.png?a=1&b=2") != url_key(b)
    assert url_key("https://cdn.example.com/img/a.png?a=1&b=3") != url_key(b)
    assert url_key("http://cdn.example.com/img/a.png?a=1&b=2") != url_key(b)


def test_archive_expiry_is_capped_at_seven_days_whoever_states_it() -> None:
    """A link (or a request) saying it lives for years is believed for seven days at most: transient errors are
    retried until the expiry, and an archive must settle some day."""
    from relay.archives import MAX_LINK_LIFETIME, ArchiveService

    far = "https://cdn.example/a.png?Expires=" + str(int(NOW) + 5 * 365 * 86400)
    assert ArchiveService.expiry(far, None, NOW) == NOW + MAX_LINK_LIFETIME == NOW + 7 * 86400
    assert ArchiveService.expiry("https://cdn.example/a.png", utc(9999, 12, 31), NOW) == NOW + MAX_LINK_LIFETIME
    assert ArchiveService.expiry("https://cdn.example/a.png", None, NOW) == NOW + 24 * 3600
    assert ArchiveService.expiry("https://cdn.example/a.png", NOW + 60, NOW) == NOW + 60
