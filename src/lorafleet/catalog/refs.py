"""References and names: parse `owner/name[:alias|@rev]`, `tinker://...`, alias gates, ids.

Pure string handling; every malformed input raises InvalidRequest naming what is wrong.

Reference forms (`parse_ref`):
    owner/name                 the latest revision (or the explicit `latest` alias if set)
    owner/name:alias           what the alias points at
    owner/name@rev_01J...      a revision id (or a unique prefix of one)
    owner/name@3f2a9c          a unique prefix (>= 6 hex) of a revision's sha256; `@sha256:<hex>`
    rev_01J...                 a revision id on its own
    tinker://<run>/{weights|sampler_weights}/<name>   a path the Tinker API published
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from lorafleet.errors import InvalidRequest

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# Every pattern is anchored with \A...\Z: `$` would also match before a final newline.
OWNER_RE = re.compile(rf"\A{_PART}\Z")
ALIAS_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")
_POLICY_RE = re.compile(rf"\A({_PART})/({_PART})\Z")
_REF_RE = re.compile(rf"\A({_PART})/({_PART})(?:(:)([^@:/]*)|(@)([^@/]*))?\Z")
_REV_ID_RE = re.compile(r"\Arev_[0-9a-hjkmnp-tv-z]{26}\Z")
_REV_PREFIX_RE = re.compile(r"\Arev_[0-9a-hjkmnp-tv-z]{1,26}\Z")
_HEX_PREFIX_RE = re.compile(r"\A[0-9a-f]{6,64}\Z")
_GATE_RE = re.compile(r"\A\s*([A-Za-z0-9_.:/-]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+|inf|-inf)\s*\Z")
# Tinker paths become folders on disk (api/tinker/checkpoints.py): no segment may be empty,
# `.`, `..`, or hold a slash, NUL or whitespace. A run id starts with a letter or digit.
RUN_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
CHECKPOINT_NAME_RE = re.compile(r"\A(?!\.\.?\Z)[A-Za-z0-9._-]{1,128}\Z")
TINKER_SCHEMES = ("tinker://", "mint://")
KIND_SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
SEGMENT_KIND = {v: k for k, v in KIND_SEGMENT.items()}
LATEST = "latest"
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_last = (0, 0)  # (ms, random part) of the previous id from this process
_id_lock = threading.Lock()


class RefKind(StrEnum):
    LATEST = "latest"
    ALIAS = "alias"
    REVISION = "revision"  # by id or id prefix
    HASH = "hash"  # by sha256 prefix
    TINKER = "tinker"


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference. `owner`/`name` are empty for bare revision ids and tinker paths."""

    kind: RefKind
    owner: str
    name: str
    value: str  # alias name, revision id (prefix), hash prefix or normalized tinker path
    text: str

    @property
    def policy(self) -> str:
        return f"{self.owner}/{self.name}"


def parse_policy_name(text: str) -> tuple[str, str]:
    """`owner/name` -> (owner, name)."""
    m = _POLICY_RE.match(text or "")
    if not m:
        raise InvalidRequest(
            f"invalid policy name {text!r}: expected owner/name, each 1-64 of [A-Za-z0-9._-] "
            "starting with a letter or digit"
        )
    return m.group(1), m.group(2)


def check_alias(name: str) -> str:
    if not ALIAS_RE.match(name or ""):
        raise InvalidRequest(
            f"invalid alias {name!r}: 1-64 of [a-z0-9._-], starting with a letter or digit"
        )
    return name


def parse_ref(text: str) -> Ref:
    """Strict like every parser here: surrounding whitespace makes a reference malformed."""
    text = text or ""
    if text.startswith(TINKER_SCHEMES):
        return Ref(RefKind.TINKER, "", "", normalize_tinker_path(text), text)
    if _REV_ID_RE.match(text):
        return Ref(RefKind.REVISION, "", "", text, text)
    m = _REF_RE.match(text)
    if not m:
        raise InvalidRequest(
            f"invalid reference {text!r}: expected owner/name, owner/name:alias, "
            "owner/name@<revision id or sha256 prefix>, rev_<id> or tinker://<run>/weights/<name>"
        )
    owner, name = m.group(1), m.group(2)
    if m.group(3):
        alias = check_alias(m.group(4))
        kind = RefKind.LATEST if alias == LATEST else RefKind.ALIAS
        return Ref(kind, owner, name, alias, text)
    if m.group(5):
        return _parse_at(owner, name, m.group(6), text)
    return Ref(RefKind.LATEST, owner, name, LATEST, text)


def _parse_at(owner: str, name: str, at: str, text: str) -> Ref:
    if at.startswith("sha256:"):
        at = at[len("sha256:"):]
    if _REV_PREFIX_RE.match(at):
        return Ref(RefKind.REVISION, owner, name, at, text)
    if _HEX_PREFIX_RE.match(at.lower()):
        return Ref(RefKind.HASH, owner, name, at.lower(), text)
    raise InvalidRequest(
        f"invalid revision selector {at!r} in {text!r}: expected a revision id (rev_...) "
        "or at least 6 hex digits of its sha256"
    )


@dataclass(frozen=True, slots=True)
class TinkerPath:
    """A checked `tinker://<run>/<weights|sampler_weights|external_weights>/<name>`.

    Constructing one validates every segment, so a `TinkerPath` is always safe to join onto a
    folder: this is the one parser of tinker paths, for the catalog and the Tinker API alike.
    """

    model_id: str  # the training run
    kind: str  # training | sampler | external
    name: str

    def __post_init__(self) -> None:
        check_run_id(self.model_id)
        if self.kind not in KIND_SEGMENT:
            raise InvalidRequest(f"invalid checkpoint kind {self.kind!r}: {sorted(KIND_SEGMENT)}")
        check_checkpoint_name(self.name)

    @property
    def checkpoint_id(self) -> str:
        return f"{KIND_SEGMENT[self.kind]}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.checkpoint_id}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise InvalidRequest(
            f"invalid training run id {run_id!r}: 1-128 of [A-Za-z0-9._:-], starting with a "
            "letter or digit"
        )
    return run_id


def check_checkpoint_name(name: str) -> str:
    if not isinstance(name, str) or not CHECKPOINT_NAME_RE.match(name):
        raise InvalidRequest(
            f"checkpoint name {name!r} must be 1-128 of [A-Za-z0-9._-], and not '.' or '..'"
        )
    return name


def parse_tinker_path(text: str) -> TinkerPath:
    """`tinker://` or `mint://` + `<run>/<segment>/<name>`; anything else is InvalidRequest."""
    scheme = next((s for s in TINKER_SCHEMES if isinstance(text, str) and text.startswith(s)), None)
    parts = text[len(scheme):].split("/") if scheme else []
    if len(parts) != 3 or parts[1] not in SEGMENT_KIND:
        raise InvalidRequest(
            f"invalid tinker path {text!r}: expected tinker://<run>/<weights|sampler_weights|"
            "external_weights>/<name>"
        )
    try:
        return TinkerPath(parts[0], SEGMENT_KIND[parts[1]], parts[2])
    except InvalidRequest as e:
        raise InvalidRequest(f"invalid tinker path {text!r}: {e}") from None


def normalize_tinker_path(text: str) -> str:
    """A path the catalog can hold (weights/ or sampler_weights/), in its `tinker://` form."""
    path = parse_tinker_path(text)
    if path.kind == "external":
        raise InvalidRequest(
            f"invalid tinker path {text!r}: the catalog holds weights/ and sampler_weights/ "
            "checkpoints, not external exports"
        )
    return str(path)


@dataclass(frozen=True, slots=True)
class Gate:
    """`metric OP value`: an alias may move only to a revision whose evaluation passes."""

    metric: str
    op: str
    value: float

    def passes(self, observed: float) -> bool:
        return {
            ">=": observed >= self.value, ">": observed > self.value,
            "<=": observed <= self.value, "<": observed < self.value,
            "==": observed == self.value,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_gate(text: str) -> Gate:
    m = _GATE_RE.match(text or "")
    if not m:
        raise InvalidRequest(f"invalid gate {text!r}: expected METRIC>=VALUE (also > <= < ==)")
    try:
        value = float(m.group(3))
    except ValueError:
        raise InvalidRequest(f"invalid gate {text!r}: {m.group(3)!r} is not a number") from None
    return Gate(m.group(1), m.group(2), value)


def new_id(prefix: str) -> str:
    """`<prefix>_` + 26 Crockford base32 chars: 48-bit ms time then 80 random bits (ULID).

    Lexicographic order is creation order (to the millisecond), which keeps index inserts
    append-mostly and makes ids usable as pagination cursors.
    """
    global _last
    ms, rand = int(time.time() * 1000), int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        if ms <= _last[0]:  # same millisecond: keep ids from this process strictly increasing
            ms, rand = _last[0], (_last[1] + 1) % (1 << 80)
        _last = (ms, rand)
    n = (ms << 80) | rand
    chars = []
    for _ in range(26):
        n, r = divmod(n, 32)
        chars.append(_CROCKFORD[r])
    return f"{prefix}_{''.join(reversed(chars))}"
