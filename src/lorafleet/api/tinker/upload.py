"""The checkpoint archive of `POST /api/v1/checkpoints/upload`, read safely into memory.

Accepted: a gzip'd (or plain) tar holding the files of one checkpoint, at its top level or in
one folder: `adapter_config.json`, `adapter_model.safetensors`, optionally
`optimizer_state.safetensors` (what `.../archive` downloads, plus its `checkpoint_complete`
marker) and `tinker_meta.json` (the provenance file older lorafleet archives held: its
`base_model`, `base_digest` and `step` are read, the file is not stored). Nothing is extracted to disk: members are read into memory, so
no name can lead anywhere. Refused (InvalidRequest, 400), before anything is stored: a name that
is absolute or has `..`, a link or any member that is not a regular file or folder, an unknown
file, a duplicate, more than `MAX_MEMBERS` members, declared sizes over `MAX_UNPACKED_BYTES` in
all (a decompression bomb stops at the first header over the budget), and a corrupt stream.

The multipart form the MinT quickstart sends (`file` field) and a raw body are both accepted
(`archive_bytes`).
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import tarfile
import zlib
from pathlib import PurePosixPath

from lorafleet.api.tinker.checkpoints import OPTIMIZER_NAME
from lorafleet.errors import InvalidRequest
from lorafleet.lora.io import CONFIG_NAME, WEIGHTS_NAME

META_NAME = "tinker_meta.json"
ALLOWED = frozenset({CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, META_NAME})
IGNORED = frozenset({"checkpoint_complete"})
MAX_MEMBERS = 16
MAX_UNPACKED_BYTES = 2 << 30


def archive_bytes(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """(archive, other form fields) of a multipart/form-data body (its `file` part), or the raw
    body itself for any other content type."""
    if not content_type.startswith("multipart/form-data"):
        return body, {}
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise InvalidRequest("malformed multipart/form-data body (no boundary or parts)")
    archive, fields = None, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "file":
            archive = payload
        elif isinstance(name, str):
            fields[name] = payload.decode("utf-8", "replace")
    if archive is None:
        raise InvalidRequest("the multipart body has no `file` part holding the .tar.gz archive")
    return archive, fields


def read_archive(data: bytes, max_unpacked: int = MAX_UNPACKED_BYTES) -> dict[str, bytes]:
    """The checkpoint files of a tar(.gz) archive, checked as the module says."""
    if not data:
        raise InvalidRequest("the checkpoint archive is empty")
    files: dict[str, bytes] = {}
    total, members, folder = 0, 0, None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise InvalidRequest(f"the archive has more than {MAX_MEMBERS} members; a "
                                         "checkpoint has at most 4 files")
                parts = _parts(m.name)
                if m.isdir():
                    continue
                if not m.isfile():
                    raise InvalidRequest(f"archive member {m.name!r} is a link or a special file; "
                                         "only regular files are accepted")
                if not parts or len(parts) > 2:
                    raise InvalidRequest(f"archive member {m.name!r} is nested too deep: put the "
                                         "checkpoint files at the top or in one folder")
                if len(parts) == 2:
                    if folder not in (None, parts[0]):
                        raise InvalidRequest("the archive holds more than one folder: one checkpoint per archive")
                    folder = parts[0]
                name = parts[-1]
                if name in IGNORED:
                    continue
                if name not in ALLOWED:
                    raise InvalidRequest(f"unexpected file {m.name!r} in the archive; a checkpoint holds "
                                         f"{sorted(ALLOWED)}")
                if name in files:
                    raise InvalidRequest(f"the archive holds {name} twice")
                total += m.size
                if total > max_unpacked:
                    raise InvalidRequest(f"the archive unpacks to more than {max_unpacked} bytes")
                f = tar.extractfile(m)
                content = f.read() if f is not None else b""
                if len(content) != m.size:
                    raise InvalidRequest(f"archive member {m.name!r} is truncated")
                files[name] = content
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise InvalidRequest(f"not a readable .tar.gz checkpoint archive: {e}") from e
    missing = sorted({CONFIG_NAME, WEIGHTS_NAME} - set(files))
    if missing:
        raise InvalidRequest(f"the archive lacks {missing}: it must hold a PEFT adapter")
    return files


def _parts(name: str) -> tuple[str, ...]:
    if "\\" in name or "\x00" in name:
        raise InvalidRequest(f"archive member name {name!r} has a backslash or NUL")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise InvalidRequest(f"archive member {name!r} leads outside the archive (absolute or '..')")
    return tuple(x for x in p.parts if x not in (".", ""))
