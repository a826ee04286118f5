"""Who is calling: the tenant of a request, from its `X-API-Key`.

`--auth none`: every caller (any `tml-` key, or none) is the one local tenant; the server
refuses to bind a non-loopback address in this mode (see `cli/serve.py`).
`--auth keys`: keys are looked up in the catalog (`lorafleet keys create`) through
`Catalog.principal_for_key`; an unknown key is `Unauthorized` (401).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable

from fastapi import Request

from lorafleet.errors import Unauthorized

LOCAL_TENANT = "local"


class Tenancy:
    """Maps a request to a tenant name."""

    def __init__(self, mode: str = "none", lookup: Callable[[str], str | None] | None = None) -> None:
        if mode not in ("none", "keys"):
            raise ValueError(f"auth mode must be 'none' or 'keys', got {mode!r}")
        if mode == "keys" and lookup is None:
            raise ValueError("--auth keys needs the catalog's API keys (use_catalog)")
        self.mode = mode
        self.lookup = lookup

    def tenant(self, request: Request) -> str:
        key = request.headers.get("x-api-key", "")
        if self.mode == "none":
            return LOCAL_TENANT
        if not key:
            raise Unauthorized("missing X-API-Key header")
        tenant = self.lookup(key) if self.lookup else None
        if tenant is None:
            raise Unauthorized("unknown API key")
        return tenant


def sign(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()[:32]


def verify(secret: bytes, message: str, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, message), signature)


def any_of(d: dict[str, Any], *keys: str) -> Any:
    return next((d[k] for k in keys if k in d), None)
