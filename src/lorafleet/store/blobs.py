"""BlobStore: content-addressed bytes (keyed by sha256) in a local folder or an fsspec URL.

A blob lives at `<root>/blobs/<aa>/<sha256>`. Writes go to `<root>/tmp/<random>` first, are
flushed and fsynced, hashed from what was actually written, and only then renamed into place,
so a reader never sees a partial blob under its final name. Writing the same bytes twice
stores them once. Every read re-hashes: a truncated or altered blob raises `Corrupt` and is
never returned. This module knows nothing about revisions or the catalog.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from lorafleet.errors import Corrupt, InvalidRequest, NotFound
from lorafleet.store.manifest import SHA256_HEX, BlobRef


class BlobStore(Protocol):
    """What the catalog needs from a store. All methods are safe to call from many processes."""

    url: str

    def put(self, data: bytes) -> BlobRef:
        """Store `data` atomically (no-op if already present); return its ref."""
        ...

    def get(self, ref: BlobRef) -> bytes:
        """The verified bytes of `ref`; NotFound if absent, Corrupt if they don't match."""
        ...

    def verify(self, ref: BlobRef) -> None:
        """Raise NotFound/Corrupt unless the stored blob is complete and hash-matching."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        """(sha256, modified unix time) of every stored blob."""
        ...

    def sweep_tmp(self, older_than_s: float) -> int:
        """Delete temp files left by crashed writers; return how many."""
        ...


def _check_ref(ref: BlobRef) -> None:
    if not SHA256_HEX.match(ref.sha256):
        raise InvalidRequest(f"not a sha256 hex digest: {ref.sha256!r}")


def _verified(data: bytes, ref: BlobRef, where: str) -> bytes:
    if len(data) != ref.size_bytes:
        raise Corrupt(f"blob {ref.sha256} at {where}: {len(data)} bytes, expected {ref.size_bytes}")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise Corrupt(f"blob {ref.sha256} at {where}: content does not match its sha256")
    return data


class LocalBlobStore:
    """Blobs in a local folder; rename-into-place after fsync gives atomic publication."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def put(self, data: bytes) -> BlobRef:
        ref = BlobRef(hashlib.sha256(data).hexdigest(), len(data))
        final = self.path(ref.sha256)
        if final.exists() and final.stat().st_size == ref.size_bytes:
            # Same bytes already stored (a corrupt copy is caught on read/check). Touch it so a
            # concurrent gc, which spares young blobs, cannot delete it before our row commits.
            os.utime(final)
            return ref
        tmp = self.root / "tmp" / f"{ref.sha256[:16]}.{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _verified(tmp.read_bytes(), ref, str(tmp))  # hash what reached the disk
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return ref

    def get(self, ref: BlobRef) -> bytes:
        _check_ref(ref)
        try:
            data = self.path(ref.sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {ref.sha256} is missing from store {self.url}") from None
        return _verified(data, ref, self.url)

    def verify(self, ref: BlobRef) -> None:
        self.get(ref)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        for p in (self.root / "blobs").glob("*/*"):
            if SHA256_HEX.match(p.name):
                yield p.name, p.stat().st_mtime

    def sweep_tmp(self, older_than_s: float) -> int:
        n, now = 0, time.time()
        for p in (self.root / "tmp").iterdir():
            if now - p.stat().st_mtime >= older_than_s:
                p.unlink(missing_ok=True)
                n += 1
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecBlobStore:
    """Blobs under any fsspec URL (`s3://bucket/prefix`, `memory://x`, ...).

    Object stores make a PUT visible only once complete; the temp-then-move dance keeps the same
    guarantee on filesystems that don't (sftp, local via file://).
    """

    def __init__(self, url: str, **storage_options: object) -> None:
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    def _key(self, sha256: str) -> str:
        return f"{self.root}/blobs/{sha256[:2]}/{sha256}"

    def put(self, data: bytes) -> BlobRef:
        ref = BlobRef(hashlib.sha256(data).hexdigest(), len(data))
        final = self._key(ref.sha256)
        # Always (re)write: object stores can't refresh a blob's age without a write, and a
        # fresh age is what keeps a concurrent gc from deleting it before our row commits.
        # The key is the content hash, so the bytes are still stored once.
        tmp = f"{self.root}/tmp/{ref.sha256[:16]}.{secrets.token_hex(8)}"
        try:
            self.fs.pipe_file(tmp, data)
            _verified(self.fs.cat_file(tmp), ref, tmp)
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
        self.fs.invalidate_cache()
        return ref

    def get(self, ref: BlobRef) -> bytes:
        _check_ref(ref)
        try:
            data = self.fs.cat_file(self._key(ref.sha256))
        except FileNotFoundError:
            raise NotFound(f"blob {ref.sha256} is missing from store {self.url}") from None
        return _verified(data, ref, self.url)

    def verify(self, ref: BlobRef) -> None:
        self.get(ref)

    def exists(self, sha256: str) -> bool:
        return bool(self.fs.exists(self._key(sha256)))

    def delete(self, sha256: str) -> None:
        try:
            self.fs.rm_file(self._key(sha256))
        except FileNotFoundError:
            pass

    def _walk(self, sub: str) -> Iterator[tuple[str, float]]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(f"{self.root}/{sub}", detail=True)
        except FileNotFoundError:
            return
        for key, info in found.items():
            yield key, _mtime(info)

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        for key, mtime in self._walk("blobs"):
            name = key.rsplit("/", 1)[-1]
            if SHA256_HEX.match(name):
                yield name, mtime

    def sweep_tmp(self, older_than_s: float) -> int:
        n, now = 0, time.time()
        for key, mtime in list(self._walk("tmp")):
            if now - mtime >= older_than_s:
                self.fs.rm_file(key)
                n += 1
        return n


def _mtime(info: dict[str, object]) -> float:
    for k in ("mtime", "LastModified", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "timestamp"):
            return float(v.timestamp())  # type: ignore[union-attr]
    return 0.0  # unknown age: treat as old


def open_store(url: str, **storage_options: object) -> BlobStore:
    """A local folder for plain paths and `file://`; fsspec for every other URL scheme."""
    if url.startswith("file://"):
        return LocalBlobStore(url[len("file://"):])
    if "://" in url:
        return FsspecBlobStore(url, **storage_options)
    return LocalBlobStore(url)
