"""The HTTP edge: every request is authenticated, then its body bounded, before a route runs.

An ASGI middleware (not a FastAPI dependency) because both checks must happen before any of
the body is read: a caller without a valid key gets a fast 401 however large its body, and a
body over its limit gets a 413 naming the limit, whether it declares its size
(`Content-Length`, refused up front) or streams it chunked (counted as it arrives, buffered
up to the limit, which is no more than the route would hold). Refusals use the one error
map (api/errors.py).

Two limits: bulk routes (`BULK`: Tinker forward_backward/forward/train_step, checkpoint
and catalog adapter uploads)
take up to `max_body_bytes`; every other body is metadata, prompts or parameters and takes
up to `max_json_bytes`. JSON parsing holds the GIL (a worker thread does not help), so this
smaller bound is what keeps a parse from stalling the event loop: 16 MiB parse in ~0.3 s.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.api import auth
from lorafleet.api.errors import error_response
from lorafleet.errors import InvalidRequest, LorafleetError, TooLarge

DEFAULT_MAX_BODY_BYTES = 64 << 20  # a Tinker forward_backward chunk is well under this
DEFAULT_MAX_JSON_BYTES = 16 << 20
BULK = re.compile(r"/api/v1/(forward(_backward)?|train_step|checkpoints/upload"
                  r"|mint/forward_backward_reverse_kl)|/catalog/v1/policies/[^/]+/[^/]+/revisions")


class Edge:
    """ASGI middleware: `auth.authenticate`, then the body limit, then the app.

    Args:
        app: the wrapped ASGI app.
        mode: 'none' or 'keys' (see api/auth.py).
        lookup: API key -> Principal (raises Unauthorized); required for 'keys'.
        max_body_bytes: the largest body of a `BULK` route.
        max_json_bytes: the largest body of any other route.
    """

    def __init__(self, app: ASGIApp, mode: str, lookup: auth.KeyLookup | None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        if mode not in auth.AUTH_MODES or (mode == "keys" and lookup is None):
            raise ValueError(f"auth mode must be one of {auth.AUTH_MODES} ('keys' needs a key lookup), "
                             f"got {mode!r}")
        if min(max_body_bytes, max_json_bytes) < 1:
            raise ValueError(f"body limits must be positive, got {max_body_bytes}, {max_json_bytes}")
        self.app = app
        self.mode = mode
        self.lookup = lookup
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = min(max_json_bytes, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            who = await auth.authenticate(self.mode, self.lookup, scope["path"], headers)
            bulk = BULK.fullmatch(scope["path"]) is not None
            receive = await self._bounded(headers, receive, bulk)
        except LorafleetError as e:
            return await error_response(e, scope["path"])(scope, receive, send)
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)

    async def _bounded(self, headers: Headers, receive: Receive, bulk: bool) -> Receive:
        """`receive` for a body within the limit; TooLarge otherwise."""
        limit, flag = ((self.max_body_bytes, "--max-body-bytes") if bulk
                       else (self.max_json_bytes, "--max-json-bytes"))
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest(f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                raise TooLarge(f"request body of {int(declared)} bytes is over this server's "
                               f"limit of {limit} bytes for this route ({flag})")
            return receive  # the server reads exactly Content-Length bytes
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message])
            size += len(message.get("body", b""))
            if size > limit:
                raise TooLarge(f"request body is over this server's limit of {limit} bytes "
                               f"for this route ({flag})")
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                       receive)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A `receive` that yields `messages`, then defers to `then` (disconnect detection)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
