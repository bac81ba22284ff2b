"""Standard Webhooks signing (relay.signing), checked against the PyPI `standardwebhooks` library."""

from __future__ import annotations

import base64
import time
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay import signing
from relay.signing import SignatureError

BODY = b'{"type":"task.succeeded","timestamp":"2026-11-22T10:00:00.000Z","data":{"id":"tsk_1","note":"\xc3\xa9"}}'
MSG = "evt_01JD0000000000000000000000"


def test_library_verifies_our_v1_signature() -> None:
    """What we sign now, the reference library verifies with the same whsec_ secret."""
    secret = signing.generate_secret()
    headers = signing.headers(MSG, BODY, [secret], now=time.time())
    assert Webhook(secret).verify(BODY, headers)["data"]["id"] == "tsk_1"


def test_our_signature_equals_the_library_signature() -> None:
    """Byte for byte, our v1 entry is the library's own `sign` output."""
    secret = signing.generate_secret()
    ts = 1_790_000_000
    ours = signing.sign(MSG, ts, BODY, [secret])
    assert ours == Webhook(secret).sign(MSG, datetime.fromtimestamp(ts, tz=timezone.utc), BODY.decode())


def test_several_keys_make_a_space_separated_list_any_verifies() -> None:
    """During a rotation the header carries one signature per key; the library accepts either secret."""
    old, new = signing.generate_secret(), signing.generate_secret()
    headers = signing.headers(MSG, BODY, [new, old], now=time.time())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.generate_secret()).verify(BODY, headers)


def test_ed25519_v1a_verifies_with_the_public_key_and_library_skips_it() -> None:
    """A whsk_ key signs v1a; its whpk_ verifies it; the library still verifies the v1 beside it."""
    secret, key = signing.generate_secret(), signing.generate_signing_key()
    public = signing.public_key_of(key)
    assert public.startswith("whpk_") and len(base64.b64decode(public[5:])) == 32
    now = time.time()
    headers = signing.headers(MSG, BODY, [secret, key], now=now)
    versions = [entry.split(",")[0] for entry in headers["webhook-signature"].split(" ")]
    assert versions == ["v1", "v1a"]
    signing.verify(BODY, headers, [public], now=now)           # v1a alone
    Webhook(secret).verify(BODY, headers)                       # v1 through the library
    with pytest.raises(SignatureError):
        signing.verify(BODY, headers, [signing.public_key_of(signing.generate_signing_key())], now=now)


def test_verify_refuses_tampering_and_stale_or_future_timestamps() -> None:
    """A changed body, a timestamp outside ±5 min, or missing headers are refused."""
    secret = signing.generate_secret()
    now = 1_790_000_000.0
    headers = signing.headers(MSG, BODY, [secret], now=now)
    signing.verify(BODY, headers, [secret], now=now + 299)
    with pytest.raises(SignatureError, match="no matching"):
        signing.verify(BODY + b" ", headers, [secret], now=now)
    with pytest.raises(SignatureError, match="too old"):
        signing.verify(BODY, headers, [secret], now=now + 301)
    with pytest.raises(SignatureError, match="too new"):
        signing.verify(BODY, headers, [secret], now=now - 301)
    with pytest.raises(SignatureError, match="missing"):
        signing.verify(BODY, {"webhook-id": MSG}, [secret], now=now)


@pytest.mark.parametrize("stamp", ["²", "1790000000²", "١٧٩٠٠٠٠٠٠٠", "9" * 5000, "1790000000.5", "-1",
                                   " 1790000000", "0x6AB0F880", "", "abc"])
def test_verify_refuses_a_bad_timestamp_with_its_own_error(stamp: str) -> None:
    """A timestamp that is not ASCII unix seconds is a SignatureError (never a ValueError), as in the library.

    "²" and "١٧٩٠٠٠٠٠٠٠" pass str.isdigit() (int() refuses the first and reads the second as
    1790000000); 5000 digits are past int()'s limit.
    """
    secret = signing.generate_secret()
    now = 1_790_000_000.0
    headers = {**signing.headers(MSG, BODY, [secret], now=now), "webhook-timestamp": stamp}
    with pytest.raises(SignatureError):
        signing.verify(BODY, headers, [secret], now=now)
    # The reference library refuses them too (its own verification error).
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, headers)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(msg_id=st.text(max_size=20), stamp=st.text(max_size=20), signature=st.text(max_size=60))
def test_verify_raises_only_signature_errors(msg_id: str, stamp: str, signature: str) -> None:
    """Any header values: verified or SignatureError, nothing else."""
    secret = signing.generate_secret()
    received = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    try:
        signing.verify(BODY, received, [secret, signing.public_key_of(signing.generate_signing_key())],
                       now=1_790_000_000.0)
    except SignatureError:
        pass


@pytest.mark.parametrize("bad", ["secret", "whsec_", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()])
def test_malformed_secrets_are_refused(bad: str) -> None:
    """A secret must be whsec_ + base64 of 24..64 bytes."""
    with pytest.raises(SignatureError):
        signing.secret_bytes(bad)


def test_message_id_with_a_dot_is_refused() -> None:
    """The signed content is dot-separated, so an id must not contain one."""
    with pytest.raises(SignatureError):
        signing.sign("evt.1", 1, b"{}", [signing.generate_secret()])
