"""Signed, expiring download URLs: an HMAC over the URL's parts with the server's secret."""

from __future__ import annotations

import hashlib
import hmac


def sign(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def verify(secret: bytes, message: str, signature: str) -> bool:
    """Constant-time check; any text (non-ASCII included) is simply a wrong signature."""
    return hmac.compare_digest(sign(secret, message).encode(),
                               signature.encode("utf-8", "surrogatepass"))
