"""File helpers of base-model loading: memoised sha256 of large files, atomic cache folders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_memo: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoised per process on (real path, size, mtime)."""
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with real.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
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
