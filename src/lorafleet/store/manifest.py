"""Manifest: the named files of one revision and the digest that identifies them.

Pure: bytes in, hashes out. A revision's `sha256` is the sha256 of the canonical JSON form
`{"<filename>": {"sha256": "<hex>", "size": <bytes>}, ...}` (keys sorted, no spaces), so two
revisions with the same files have the same digest whatever order they were written in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet.errors import InvalidRequest

# Flat names only: a manifest never names a folder, so a filename can't escape the store.
_FILENAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass(frozen=True, slots=True)
class BlobRef:
    """One stored blob: its content digest and length."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """filename -> blob of one revision. Immutable; `digest` is the revision's sha256."""

    files: tuple[tuple[str, BlobRef], ...]  # sorted by filename

    @classmethod
    def of(cls, files: Mapping[str, BlobRef]) -> Manifest:
        for name in files:
            check_filename(name)
        if not files:
            raise InvalidRequest("a revision needs at least one file")
        return cls(tuple(sorted(files.items())))

    @classmethod
    def for_bytes(cls, files: Mapping[str, bytes]) -> Manifest:
        return cls.of({n: BlobRef(hashlib.sha256(b).hexdigest(), len(b)) for n, b in files.items()})

    def canonical_json(self) -> bytes:
        body = {n: {"sha256": r.sha256, "size": r.size_bytes} for n, r in self.files}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    @property
    def size_bytes(self) -> int:
        return sum(r.size_bytes for _, r in self.files)

    def as_dict(self) -> dict[str, BlobRef]:
        return dict(self.files)


def check_filename(name: str) -> str:
    if not _FILENAME.match(name):
        raise InvalidRequest(f"invalid revision file name {name!r}: use [A-Za-z0-9._-], no folders")
    return name
