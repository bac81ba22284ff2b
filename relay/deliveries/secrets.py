"""Secrets at rest: subscription keys are stored encrypted (AES-256-GCM), and the task-webhook secret.

The encryption key is derived (HKDF-SHA256) from `deliveries.encryption_key`,
or, when that is empty, from the relay's signing secret (`auth.signing_secret`
or the one generated into the data directory), so the embedded default works
with no configuration. A stored value reads `enc1:<key id>:<base64 nonce‖ciphertext>`
and is bound to its row (the subscription id is the associated data), so a
value copied to another row does not decrypt. Keys listed in
`deliveries.previous_encryption_keys`, and the signing secret, still decrypt;
only the current key encrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.errors import RelayError
from relay.signing import SECRET_PREFIX

_FORMAT = "enc1"


class SecretsError(RelayError):
    """A stored secret cannot be decrypted (unknown key, or the value was tampered with)."""


def _derive(material: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"relay", info=info).derive(material.encode())


class SecretBox:
    def __init__(self, key_material: str, previous: Sequence[str] = ()) -> None:
        if not key_material:
            raise ValueError("the encryption key material must not be empty")
        self._ciphers: dict[str, AESGCM] = {}
        self._current = ""
        for index, material in enumerate([key_material, *previous]):
            key = _derive(material, b"relay deliveries: secrets at rest v1")
            key_id = hashlib.sha256(key).hexdigest()[:12]
            self._ciphers.setdefault(key_id, AESGCM(key))
            if index == 0:
                self._current = key_id

    def __repr__(self) -> str:
        return f"SecretBox(keys={len(self._ciphers)})"

    def encrypt(self, plaintext: str, *, bound_to: str) -> str:
        nonce = os.urandom(12)
        sealed = self._ciphers[self._current].encrypt(nonce, plaintext.encode(), bound_to.encode())
        return f"{_FORMAT}:{self._current}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def decrypt(self, token: str, *, bound_to: str) -> str:
        """The clear text; SecretsError if the key is unknown or the value does not authenticate."""
        fmt, _, rest = token.partition(":")
        key_id, _, data = rest.partition(":")
        if fmt != _FORMAT or not data:
            raise SecretsError("a stored secret is not in a known format")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SecretsError(f"a stored secret was encrypted with an unknown key ({key_id}); "
                               "add the old key to deliveries.previous_encryption_keys")
        try:
            raw = base64.b64decode(data, validate=True)
            return cipher.decrypt(raw[:12], raw[12:], bound_to.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsError("a stored secret does not decrypt (wrong key or tampered)") from None


def task_webhook_secret(configured: str, signing_secret: str) -> str:
    """The secret that signs per-task `webhook_url` deliveries: configured, or derived from the signing secret."""
    if configured:
        return configured
    return SECRET_PREFIX + base64.b64encode(_derive(signing_secret, b"relay task webhook secret v1")).decode("ascii")
