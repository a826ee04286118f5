"""The HTTP edge: every request is authenticated, then its body bounded, before a route runs.

An ASGI middleware (not a FastAPI dependency) because both checks must happen before any of
the body is read: a caller without a valid key gets a fast 401 however large its body, and a
body over `max_body_bytes` gets a 413 naming the limit, whether it declares its size
(`Content-Length`, refused up front) or streams it chunked (counted as it arrives, buffered
up to the limit, which is no more than the route would hold). Refusals use the one error
map (api/errors.py).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.api import auth
from lorafleet.api.errors import error_response
from lorafleet.errors import InvalidRequest, LorafleetError, TooLarge

DEFAULT_MAX_BODY_BYTES = 64 << 20  # a Tinker forward_backward chunk is well under this


class Edge:
    """ASGI middleware: `auth.authenticate`, then the body limit, then the app.

    Args:
        app: the wrapped ASGI app.
        mode: 'none' or 'keys' (see api/auth.py).
        lookup: API key -> Principal (raises Unauthorized); required for 'keys'.
        max_body_bytes: the largest request body accepted.
    """

    def __init__(self, app: ASGIApp, mode: str, lookup: auth.KeyLookup | None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if mode not in auth.AUTH_MODES or (mode == "keys" and lookup is None):
            raise ValueError(f"auth mode must be one of {auth.AUTH_MODES} ('keys' needs a key lookup), "
                             f"got {mode!r}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.mode = mode
        self.lookup = lookup
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            who = await auth.authenticate(self.mode, self.lookup, scope["path"], headers)
            receive = await self._bounded(headers, receive)
        except LorafleetError as e:
            return await error_response(e, scope["path"])(scope, receive, send)
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)

    async def _bounded(self, headers: Headers, receive: Receive) -> Receive:
        """`receive` for a body within the limit; TooLarge otherwise."""
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest(f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                raise TooLarge(f"request body of {int(declared)} bytes is over this server's "
                               f"limit of {limit} bytes (--max-body-bytes)")
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
                               "(--max-body-bytes)")
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
