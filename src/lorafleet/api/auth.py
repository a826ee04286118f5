"""Who is calling: API keys (`X-API-Key` or `Authorization: Bearer`) -> tenant.

The app decides the mode once at start-up: `app.state.auth_mode` is 'keys' (the default) or
'none' (a single-user machine: every request is the `local` tenant with admin rights), and
`app.state.catalog` is the open Catalog. These are the FastAPI dependency providers.
"""

from __future__ import annotations

from fastapi import Depends, Request

from lorafleet.catalog.records import LOCAL_TENANT, Principal
from lorafleet.catalog.service import Catalog
from lorafleet.errors import InvalidRequest, Unauthorized

AUTH_MODES = ("none", "keys")


def get_catalog(request: Request) -> Catalog:
    catalog = getattr(request.app.state, "catalog", None)
    if catalog is None:
        raise RuntimeError("app.state.catalog is not set: open a Catalog at start-up")
    return catalog


def api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def get_tenant(request: Request, catalog: Catalog = Depends(get_catalog)) -> Principal:
    mode = getattr(request.app.state, "auth_mode", "keys")
    if mode == "none":
        return Principal(LOCAL_TENANT, admin=True)
    if mode != "keys":
        raise InvalidRequest(f"unknown auth mode {mode!r}; expected one of {AUTH_MODES}")
    key = api_key(request)
    if not key:
        raise Unauthorized("missing API key: send X-API-Key or Authorization: Bearer <key>")
    return catalog.principal_for_key(key)


def require_admin(who: Principal = Depends(get_tenant)) -> Principal:
    if not who.admin:
        raise Unauthorized("this operation needs the local admin (auth mode 'none' or the CLI)")
    return who
