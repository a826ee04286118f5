"""Who is calling: the one place that reads API keys and decides a request's `Principal`.

`Edge` (api/edge.py) calls `authenticate` for every HTTP request before any of its body is
read, and keeps the answer in the request's state; routes get it from `get_tenant` (FastAPI
dependency) or `tenant` (the Tinker routes' tenant name). The mode is fixed at start-up:

- `keys`: an API key (`X-API-Key: <key>` or `Authorization: Bearer <key>`) is looked up in the
  catalog (`lorafleet keys create`); a missing or unknown key is `Unauthorized` (401). Paths in
  `PUBLIC` need no key (health probes, metrics, signed download URLs).
- `none`: a single-user machine; every request is the `local` tenant with admin rights. The
  server only binds loopback (cli/serve.py), and a browser on the same machine is kept out:
  the `Host` must be a loopback name (defeats DNS rebinding, where evil.example resolves to
  127.0.0.1), and an `Origin`, which browsers send on cross-site requests and SDKs/CLI never
  send, must be a loopback origin. Both refusals are `Forbidden` (403) with the reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from fastapi import Depends, Request

from lorafleet.catalog.records import LOCAL_TENANT, Principal
from lorafleet.catalog.service import Catalog
from lorafleet.errors import Forbidden, Unauthorized

AUTH_MODES = ("none", "keys")
# Reachable without a key under `--auth keys` (prefixes of request paths). /ui holds the
# console's static assets only; its data calls go to the keyed APIs (api/routes/console.py).
PUBLIC = ("/healthz", "/readyz", "/metrics", "/api/v1/healthz", "/api/v1/files/", "/ui")
LOCAL_ADMIN = Principal(LOCAL_TENANT, admin=True)

KeyLookup = Callable[[str], Principal]  # raises Unauthorized for an unknown key


def api_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from `X-API-Key` or `Authorization: Bearer`; None when it sent none."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (brackets and a port allowed), as in Host/Origin."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_local(headers: Mapping[str, str]) -> None:
    """`--auth none`: refuse requests a browser could be tricked into sending."""
    host = headers.get("host", "")
    if not is_loopback_host(host):
        raise Forbidden(f"--auth none serves loopback clients only; Host {host!r} is not "
                        "localhost, 127.0.0.0/8 or [::1]")
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not is_loopback_host(parts.netloc):
            raise Forbidden(f"--auth none refuses cross-site requests: Origin {origin!r} is not a "
                            "loopback origin")


async def authenticate(mode: str, lookup: KeyLookup | None, path: str,
                       headers: Mapping[str, str]) -> Principal | None:
    """The request's principal, or None for a public path under `keys`. Raises
    Unauthorized/Forbidden. The key lookup (a database read) runs off the event loop."""
    if mode == "none":
        check_local(headers)
        return LOCAL_ADMIN
    assert mode == "keys" and lookup is not None, "Edge checks the mode at start-up"
    if path.startswith(PUBLIC):
        return None
    key = api_key(headers)
    if not key:
        raise Unauthorized("missing API key: send X-API-Key or Authorization: Bearer <key>")
    return await asyncio.to_thread(lookup, key)


def get_catalog(request: Request) -> Catalog:
    catalog = getattr(request.app.state, "catalog", None)
    if catalog is None:
        raise RuntimeError("app.state.catalog is not set: open a Catalog at start-up")
    return catalog


def get_tenant(request: Request) -> Principal:
    """The principal `Edge` authenticated for this request."""
    who = getattr(request.state, "principal", None)
    if who is None:
        raise Unauthorized("this path takes no API key, so it has no caller")
    return who


def tenant(request: Request) -> str:
    """The Tinker routes' tenant name."""
    return get_tenant(request).tenant


def require_admin(who: Principal = Depends(get_tenant)) -> Principal:
    if not who.admin:
        raise Unauthorized("this operation needs the local admin (auth mode 'none' or the CLI)")
    return who
