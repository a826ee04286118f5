"""Futures: every compute call returns a request id at once; results are long-polled.

Semantics (reference/tinker_protocol.md §4-§5, peers.md §3):
- `submit` is idempotent: the same (scope, seq_id) or the same idempotency key with the same
  content fingerprint returns the original request id; different content is a `Conflict`
  (422, never 409, which the SDK retries for minutes).
- `wait` holds a poll up to `hold_s` (~30 s, below the SDK's 45 s read timeout) and returns
  None for "try again". On the server computing a future, all its polls share one in-process
  event that the engine thread sets through `loop.call_soon_threadsafe` (no database polling).
- A result is kept `keep_delivered_s` (>= 5 min) after its first delivery and
  `keep_undelivered_s` before; past that the payload is dropped and the row answers `Expired`
  (HTTP 410) instead of a bare 404.
- Rows live in the catalog's database (api/tinker/repo.py), so after a restart every future
  still answers, and several API servers share them: a future created through one server can
  be retrieved through any other. Each row names the server instance computing it (`owner`,
  api/tinker/instance.py). A poll on the owning server waits on an in-process event that the
  engine thread sets; a poll anywhere else reads the database every `poll_s` (growing to
  `max_poll_s`), and fails the future at once when its owner is no longer alive.
- Futures whose owner died (a crash, a restart) fail with an error saying the work was lost:
  at start (`recover`), in the janitor, and when a poll finds them.
- JSON results are stored as strict JSON: one holding NaN or infinity fails the future with
  a user error instead. A failure keeps a lorafleet error's message (category "user"); any
  other exception is a server fault whose text stays in the server log (`internal_error`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.api.errors import client_message
from lorafleet.api.tinker.instance import Instance
from lorafleet.api.tinker.repo import DONE, EXPIRED, FAILED, PENDING, TinkerRepo, idem_hash, now
from lorafleet.errors import Conflict, Expired, InvalidRequest, LorafleetError, NoCapacity, NotFound

__all__ = ["DONE", "EXPIRED", "FAILED", "PENDING", "FutureResult", "FutureTable"]
JSON_TYPE, PROTO_TYPE = "application/json", "application/x-protobuf"
LOST_AT_RESTART = ("the server computing this request stopped (restarted or crashed) before it "
                   "finished; its work was lost")
NOT_FINITE = ("the result holds NaN or infinity: training diverged (lower the learning rate, "
              "check the loss inputs) or the weights are no longer finite")


@dataclass(frozen=True, slots=True)
class FutureResult:
    """A finished future: a payload (JSON or protobuf bytes) or an error with its category."""

    state: str
    kind: str = ""
    content_type: str | None = None
    payload: bytes | None = None
    error: str | None = None
    category: str | None = None


class FutureTable:
    """Creates, completes, long-polls and expires futures."""

    def __init__(
        self,
        repo: TinkerRepo,
        instance: Instance,
        hold_s: float = 30.0,
        keep_delivered_s: float = 300.0,
        keep_undelivered_s: float = 3600.0,
        keep_tombstone_s: float = 86400.0,
        poll_s: float = 0.05,
        max_poll_s: float = 0.5,
    ) -> None:
        self.repo = repo
        self.instance = instance
        self.hold_s = hold_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.keep_delivered_s = max(keep_delivered_s, 300.0)
        self.keep_undelivered_s = keep_undelivered_s
        self.keep_tombstone_s = keep_tombstone_s
        self._events: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # called with (request_id, payload) when a future completes, payload None when it
        # fails (api/tinker/run_metrics.py); on the completing thread, before polls wake, and
        # must not raise
        self.observers: list[Callable[[str, bytes | None], None]] = []
        # a tenant's max_queued quota (None: unlimited); set by api/app.py from the catalog
        self.queue_limit: Callable[[str], int | None] = lambda tenant: None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the event loop so the engine thread can wake polls."""
        self._loop = loop

    def recover(self) -> int:
        """Fail the pending futures of every server instance that is no longer alive (this
        server's previous run among them); returns how many. Live servers' work is untouched."""
        return sum(self.repo.fail_pending_of(owner, LOST_AT_RESTART)
                   for owner in self.repo.pending_owners() if not self.instance.alive(owner))

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        tenant: str,
        kind: str,
        fingerprint: str,
        scope: str | None = None,
        seq_id: int | None = None,
        idem_key: str | None = None,
    ) -> tuple[str, bool]:
        """Create a pending future, or return the one this request duplicates.

        Returns:
            (request_id, created): `created` is False for a duplicate retry.
        Raises:
            Conflict: same (scope, seq_id) or idempotency key but different content.
        """
        limit = self.queue_limit(tenant)
        idem = idem_hash(idem_key)
        with self._lock:
            for _ in range(3):  # a concurrent duplicate (another thread or server) wins the insert
                dup = self.repo.duplicate_future(tenant, scope, seq_id, idem)
                if dup is not None:
                    return self._same(dup, kind, fingerprint, scope, seq_id), False
                if limit is not None:
                    queued = self.repo.pending_count(tenant)
                    if queued >= limit:
                        raise NoCapacity(f"quota max_queued={limit} of tenant {tenant!r} is reached: {queued} "
                                         "requests are queued; retry once some complete", retry_after_s=1.0)
                request_id = f"req-{uuid.uuid4().hex}"
                if self.repo.insert_future({
                    "request_id": request_id, "tenant": tenant, "kind": kind, "scope": scope,
                    "seq_id": seq_id, "idem_key": idem, "fingerprint": fingerprint,
                    "state": PENDING, "owner": self.instance.id, "created": now(),
                }):
                    return request_id, True
            where = f"seq_id {seq_id} of {scope}" if scope else "idempotency key"
            raise Conflict(f"{where} is taken by a request of another tenant")

    @staticmethod
    def _same(dup: dict[str, Any], kind: str, fingerprint: str, scope: str | None, seq_id: int | None) -> str:
        if dup["fingerprint"] != fingerprint or dup["kind"] != kind:
            where = f"seq_id {seq_id} of {scope}" if scope else "idempotency key"
            raise Conflict(
                f"a different request was already submitted with {where} "
                f"(request {dup['request_id']}); a retry must resend the same content"
            )
        return dup["request_id"]

    def forget(self, request_id: str) -> None:
        """Drop a future that was never handed to a client (its submit failed validation)."""
        self.repo.delete_future(request_id)

    # ------------------------------------------------------------------ complete (any thread)

    def complete(self, request_id: str, payload: bytes, content_type: str) -> None:
        self.repo.finish_future(request_id, state=DONE, payload=payload, content_type=content_type)
        for observe in self.observers:  # before the wake: a client that has the result sees it
            observe(request_id, payload)
        self._wake(request_id)

    def complete_json(self, request_id: str, result: Any) -> None:
        """Store a JSON result; a non-finite number in it fails the future (a user error)."""
        try:
            payload = json.dumps(result, allow_nan=False).encode()
        except ValueError:
            self.fail(request_id, InvalidRequest(NOT_FINITE))
            return
        self.complete(request_id, payload, JSON_TYPE)

    def fail(self, request_id: str, exc: BaseException, what: str = "") -> str:
        """Fail a future with `exc`; returns the message the client sees.

        A lorafleet error is the caller's ("user"), anything else the server's: logged under
        an error id (`what` names the work), its text never stored.
        """
        message = client_message(exc, what or request_id)
        category = "user" if isinstance(exc, LorafleetError) else "server"
        self.repo.finish_future(request_id, state=FAILED, error=message, category=category)
        for observe in self.observers:
            observe(request_id, None)
        self._wake(request_id)
        return message

    def _wake(self, request_id: str) -> None:
        if request_id in self._events and self._loop is not None:
            self._loop.call_soon_threadsafe(self._set, request_id)

    def _set(self, request_id: str) -> None:
        event = self._events.pop(request_id, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ retrieve (event loop)

    async def wait(self, request_id: str, tenant: str, hold_s: float | None = None) -> FutureResult | None:
        """Return the finished result, or None after holding the poll for `hold_s`.

        Raises:
            NotFound: no such future for this tenant.
            Expired: it existed, but its retention ran out.
        """
        hold = self.hold_s if hold_s is None else hold_s
        result, owner = self._read(request_id, tenant)
        if result is not None:
            return result
        if owner != self.instance.id:
            return await self._poll(request_id, tenant, owner, hold)
        event = self._events.setdefault(request_id, asyncio.Event())
        result, _ = self._read(request_id, tenant)  # completed between the read and the register
        if result is not None:
            return result
        try:
            await asyncio.wait_for(event.wait(), hold)
        except TimeoutError:
            return None
        return self._read(request_id, tenant)[0]

    async def _poll(self, request_id: str, tenant: str, owner: str | None, hold: float) -> FutureResult | None:
        """Another server computes it: read the database until it finishes or `hold` passes;
        an owner found dead fails it (its work is lost)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        delay = self.poll_s
        while True:
            if not self.instance.alive(owner):
                self.repo.fail_pending_of(owner, LOST_AT_RESTART)
            result, owner = self._read(request_id, tenant)
            if result is not None:
                return result
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.max_poll_s)

    def _read(self, request_id: str, tenant: str) -> tuple[FutureResult | None, str | None]:
        """(the finished result or None while pending, the owner)."""
        row = self.repo.future(request_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"future {request_id} not found")
        if row["state"] == EXPIRED:
            raise Expired(f"the result of {request_id} expired and was discarded")
        if row["state"] == PENDING:
            return None, row["owner"]
        if row["delivered"] is None:
            self.repo.mark_delivered(request_id)
        return FutureResult(
            state=row["state"], kind=row["kind"], content_type=row["content_type"],
            payload=None if row["payload"] is None else bytes(row["payload"]),
            error=row["error"], category=row["category"],
        ), row["owner"]

    def state_of(self, request_id: str) -> str | None:
        row = self.repo.future_state(request_id)
        return None if row is None else row[0]

    # ------------------------------------------------------------------ retention

    def expire(self, at: float | None = None) -> int:
        """Drop payloads past retention (tombstones answer 410); delete old tombstones."""
        t = now() if at is None else at
        return self.repo.expire_futures(t - self.keep_delivered_s, t - self.keep_undelivered_s,
                                        t - self.keep_tombstone_s)
