"""HMAC tokens relay hands out: signed image links and provider callback tokens. Pure; takes `now`."""

from __future__ import annotations

import hmac
from urllib.parse import urlencode


class Signer:
    def __init__(self, secret: str | bytes) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret

    def _mac(self, purpose: str, message: str) -> str:
        # hmac.digest: the one-shot C implementation, several times faster than hmac.new() (callback hot path)
        return hmac.digest(self._key, f"{purpose}:{message}".encode(), "sha256").hex()

    # ---- image links ------------------------------------------------------------------------------
    def image_query(self, image_id: str, expires: int) -> str:
        return urlencode({"exp": expires, "sig": self._mac("image", f"{image_id}.{expires}")})

    def image_url(self, public_url: str, image_id: str, *, now: float, ttl: float) -> str:
        expires = int(now + ttl)
        return f"{public_url}/v1/images/{image_id}?{self.image_query(image_id, expires)}"

    def verify_image(self, image_id: str, exp: str | None, sig: str | None, *, now: float) -> bool:
        """True when (exp, sig) is a valid, unexpired link for this image."""
        if not exp or not sig or not exp.isdigit():
            return False
        if int(exp) < now:
            return False
        return hmac.compare_digest(sig, self._mac("image", f"{image_id}.{exp}"))

    def derived_key(self, purpose: str) -> bytes:
        """A key of its own for `purpose` (e.g. dashboard sessions), derived from the signing secret: the same on
        every replica that shares the secret, and useless for forging image links or callback tokens."""
        return hmac.digest(self._key, f"derive:{purpose}".encode(), "sha256")

    # ---- provider callbacks ------------------------------------------------------------------------
    def callback_token(self, provider: str, task_id: str) -> str:
        return self._mac("callback", f"{provider}.{task_id}")[:40]

    def verify_callback_token(self, provider: str, task_id: str, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.callback_token(provider, task_id).encode())
