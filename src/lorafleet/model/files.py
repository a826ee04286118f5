"""File helpers of base-model loading: memoised sha256 of large files, atomic cache folders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_memo: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file, memoised on (real path, size, mtime, inode): per process, and across
    processes as one small file per key under `memo_dir` when given (hashing a 16 GB
    checkpoint takes tens of seconds; every `serve` start and catalog import asks again)."""
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _memo:
        return _memo[key]
    record = memo_dir / hashlib.sha256(repr(key).encode()).hexdigest() if memo_dir is not None else None
    if record is not None and record.is_file():
        text = record.read_text().strip()
        if len(text) == 64:
            _memo[key] = text
            return text
    h = hashlib.sha256()
    with real.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    _memo[key] = h.hexdigest()
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(_memo[key] + "\n")
        os.replace(tmp, record)
    return _memo[key]


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written folder into place; a concurrent writer may have won."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "done").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
