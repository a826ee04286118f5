"""Every exception lorafleet raises on purpose. Nothing here knows about HTTP.

Each category also inherits the builtin it stands for, so callers that only know Python
can still catch it (`except ValueError`). `lorafleet.api.errors` is the one place that maps
these categories to HTTP status codes. To add an error: subclass the closest category and
give it a docstring saying when it is raised.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Root of every error raised on purpose."""


class InvalidRequest(LorafleetError, ValueError):
    """The caller asked for something malformed or impossible (HTTP 400)."""


class NotFound(LorafleetError, LookupError):
    """A named thing does not exist, or the caller may not see it (HTTP 404)."""


class Conflict(LorafleetError, ValueError):
    """The request is well formed but contradicts the current state (HTTP 422).

    Never mapped to 409: the Tinker SDK retries 409 for minutes.
    """


class Unauthorized(LorafleetError, PermissionError):
    """No valid API key was presented (HTTP 401)."""


class Forbidden(Unauthorized):
    """`--auth none` refuses where a request comes from: a non-loopback `Host` (DNS
    rebinding) or a non-loopback `Origin` (a cross-site page) (HTTP 403)."""


class PathNotAllowed(Forbidden):
    """A server-side path a request names (vLLM's `lora_path`) lies outside the folders
    `serve --lora-root` allows, or loading from paths is off (no root given) (HTTP 403)."""


class QuotaExceeded(LorafleetError, PermissionError):
    """A hard per-tenant cap is reached (HTTP 403); the message names the limit, its value and
    the current usage. A full per-tenant queue is `NoCapacity` instead (429, retry later)."""


class TooLarge(InvalidRequest):
    """The request body is larger than the server's `--max-body-bytes` (HTTP 413)."""


class Expired(LorafleetError, LookupError):
    """The thing existed but its retention ran out (HTTP 410)."""


class Cancelled(InvalidRequest):
    """The client withdrew the request (it disconnected); its engine work was dropped."""


class NoCapacity(LorafleetError, RuntimeError):
    """Transient: no free slot, a full queue, or the loader is busy (HTTP 429 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(LorafleetError, RuntimeError):
    """Transient: the engine that held the work died (a Ray engine actor); it is being restarted
    and the next request goes to a live engine (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RunLost(Expired):
    """A training run's engine died and took the run's live state with it; the message names
    the run's last checkpoint, to resume from with load_state (HTTP 410)."""


class Corrupt(LorafleetError, OSError):
    """Stored bytes do not match their recorded digest; they are never served (HTTP 500)."""


class UnknownBaseModel(NotFound):
    """No base model is registered under the requested name."""


class IncompatibleAdapter(InvalidRequest):
    """An adapter's shapes, rank or target modules do not fit the base model."""


class BadTokens(InvalidRequest):
    """Token ids outside the vocabulary, or an empty prompt."""


class UnknownLoss(InvalidRequest):
    """A loss function name that does not exist."""


class MissingLossInput(InvalidRequest):
    """A datum lacks an input its loss function needs, or has the wrong shape."""
