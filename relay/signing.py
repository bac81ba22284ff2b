"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign and verify. Pure; takes `now`.

Signed content is `{msg_id}.{timestamp}.{body}` (timestamp in unix seconds).
Keys carry their scheme in their prefix:

    whsec_<base64 24–64 bytes>   symmetric secret      signs and verifies  v1  (HMAC-SHA256)
    whsk_<base64 32-byte seed>   Ed25519 signing key   signs               v1a
    whpk_<base64 32-byte key>    Ed25519 public key    verifies            v1a

`webhook-signature` is a space-separated list of `<version>,<base64>`, one per
key: several keys (during a secret rotation, or HMAC beside Ed25519) simply
mean several entries, and a receiver accepts the message if any entry verifies
with a key it holds. The PyPI `standardwebhooks` library verifies `v1` and
skips `v1a`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.errors import RelayError

SECRET_PREFIX = "whsec_"
SIGNING_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"
TOLERANCE = 300.0      # seconds either side of now, as the reference libraries


class SignatureError(RelayError):
    """A webhook does not verify (missing headers, stale timestamp, no matching signature), or a key is malformed."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not valid base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- keys ----------------------------------------------------------------------------------------
def generate_secret(nbytes: int = 32) -> str:
    """A new symmetric secret, `whsec_…`."""
    return SECRET_PREFIX + _b64(os.urandom(nbytes))


def generate_signing_key() -> str:
    """A new Ed25519 signing key, `whsk_…` (keep it secret; publish `public_key_of` it)."""
    return SIGNING_KEY_PREFIX + _b64(os.urandom(32))


def secret_bytes(secret: str) -> bytes:
    """The raw bytes of a `whsec_` secret; SignatureError if malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise SignatureError("a webhook secret must start with whsec_")
    raw = _b64decode(secret[len(SECRET_PREFIX):], "the webhook secret")
    if not 24 <= len(raw) <= 64:
        raise SignatureError("a webhook secret must hold 24 to 64 bytes")
    return raw


def _private_key(signing_key: str) -> Ed25519PrivateKey:
    if not signing_key.startswith(SIGNING_KEY_PREFIX):
        raise SignatureError("an Ed25519 signing key must start with whsk_")
    raw = _b64decode(signing_key[len(SIGNING_KEY_PREFIX):], "the signing key")
    if len(raw) != 32:
        raise SignatureError("an Ed25519 signing key must hold 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def _public_key(public_key: str) -> Ed25519PublicKey:
    if not public_key.startswith(PUBLIC_KEY_PREFIX):
        raise SignatureError("an Ed25519 public key must start with whpk_")
    raw = _b64decode(public_key[len(PUBLIC_KEY_PREFIX):], "the public key")
    if len(raw) != 32:
        raise SignatureError("an Ed25519 public key must hold 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_of(signing_key: str) -> str:
    """The `whpk_…` public key that verifies what `signing_key` signs."""
    raw = _private_key(signing_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + _b64(raw)


# ---- signing -------------------------------------------------------------------------------------
def _content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    if "." in msg_id:
        raise SignatureError("a message id must not contain '.'")
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(msg_id: str, timestamp: int, body: bytes, keys: Sequence[str]) -> str:
    """The `webhook-signature` value: one `v1,…` per whsec_ key and one `v1a,…` per whsk_ key, in order."""
    if not keys:
        raise SignatureError("at least one key is needed to sign")
    content = _content(msg_id, timestamp, body)
    parts = []
    for key in keys:
        if key.startswith(SECRET_PREFIX):
            parts.append("v1," + _b64(hmac.new(secret_bytes(key), content, hashlib.sha256).digest()))
        elif key.startswith(SIGNING_KEY_PREFIX):
            parts.append("v1a," + _b64(_private_key(key).sign(content)))
        else:
            raise SignatureError("a signing key must start with whsec_ or whsk_")
    return " ".join(parts)


def headers(msg_id: str, body: bytes, keys: Sequence[str], *, now: float) -> dict[str, str]:
    """The three Standard Webhooks headers for a message sent at `now`."""
    timestamp = int(now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(msg_id, timestamp, body, keys)}


# ---- verifying -----------------------------------------------------------------------------------
def verify(body: bytes, received: Mapping[str, str], keys: Sequence[str], *, now: float,
           tolerance: float = TOLERANCE) -> None:
    """Accept the message if its timestamp is within `tolerance` of `now` and any signature matches a key.

    `keys` are whsec_ secrets (checked against v1) and/or whpk_ public keys (checked against v1a).
    Raises SignatureError otherwise; comparisons are constant-time.
    """
    lowered = {k.lower(): v for k, v in received.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not (msg_id and stamp and signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    # ASCII digits of a sane length: str.isdigit() is also true for "²" (int() refuses it) and for
    # other scripts' digits, and int() refuses more than 4300 digits; each would be a ValueError.
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 18):
        raise SignatureError("webhook-timestamp must be unix seconds")
    timestamp = int(stamp)
    if timestamp < now - tolerance:
        raise SignatureError("the message timestamp is too old")
    if timestamp > now + tolerance:
        raise SignatureError("the message timestamp is too new")
    content = _content(msg_id, timestamp, body)
    secrets = [secret_bytes(k) for k in keys if k.startswith(SECRET_PREFIX)]
    publics = [_public_key(k) for k in keys if k.startswith(PUBLIC_KEY_PREFIX)]
    macs = [hmac.new(s, content, hashlib.sha256).digest() for s in secrets]
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if version == "v1":
            if any(hmac.compare_digest(mac, signature) for mac in macs):
                return
        elif version == "v1a":
            for public in publics:
                try:
                    public.verify(signature, content)
                except InvalidSignature:
                    continue
                return
    raise SignatureError("no matching signature")
