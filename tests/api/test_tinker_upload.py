"""The checkpoint archive reader of /api/v1/checkpoints/upload (api/tinker/upload.py)."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from lorafleet.api.tinker.upload import archive_bytes, read_archive
from lorafleet.errors import InvalidRequest

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 10}


def tar(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for m in members:
            t.addfile(m, io.BytesIO((data or {}).get(m.name, b"")) if m.isfile() else None)
    return buf.getvalue()


def files(names: dict[str, bytes], folder: str = "") -> bytes:
    members = []
    for name, content in names.items():
        m = tarfile.TarInfo(folder + name)
        m.size = len(content)
        members.append(m)
    return tar(members, {folder + k: v for k, v in names.items()})


def test_reads_top_level_or_one_folder_and_plain_tar():
    assert read_archive(files(FILES)) == FILES
    assert read_archive(files({**FILES, "checkpoint_complete": b""}, folder="ck/")) == FILES
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as t:
        for k, v in FILES.items():
            m = tarfile.TarInfo(k)
            m.size = len(v)
            t.addfile(m, io.BytesIO(v))
    assert read_archive(plain.getvalue()) == FILES


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_special_files_are_refused(kind):
    m = tarfile.TarInfo("adapter_model.safetensors")
    m.type, m.linkname = kind, "/etc/passwd"
    c = tarfile.TarInfo("adapter_config.json")
    c.size = 2
    with pytest.raises(InvalidRequest, match="link or a special file"):
        read_archive(tar([c, m], {"adapter_config.json": b"{}"}))


@pytest.mark.parametrize("name", ["../adapter_config.json", "/adapter_config.json", "a/../../adapter_config.json",
                                  "a\\..\\adapter_config.json"])
def test_names_that_lead_outside_are_refused(name):
    with pytest.raises(InvalidRequest, match="outside|backslash"):
        read_archive(files({name: b"{}"}))


def test_bombs_and_oversize_stop_before_reading():
    zeros = b"\0" * (8 << 20)  # compresses ~1000:1
    data = files({"adapter_config.json": b"{}", "adapter_model.safetensors": zeros})
    assert len(data) < 64 << 10
    with pytest.raises(InvalidRequest, match="unpacks to more than"):
        read_archive(data, max_unpacked=1 << 20)
    many = tar([_dir(f"x{i}") for i in range(30)])
    with pytest.raises(InvalidRequest, match="more than 16 members"):
        read_archive(many)


def _dir(name: str) -> tarfile.TarInfo:
    d = tarfile.TarInfo(name)
    d.type = tarfile.DIRTYPE
    return d


def test_other_shapes_are_refused():
    cases = {
        "unexpected file": files({**FILES, "evil.py": b""}),
        "twice": files(FILES) and _twice(),
        "lacks": files({"adapter_config.json": b"{}"}),
        "more than one folder": files({"adapter_config.json": b"{}"}, "a/") and _two_folders(),
        "nested too deep": files(FILES, folder="a/b/"),
        "not a readable": gzip.compress(b"not a tar at all" * 100),
        "empty": b"",
    }
    for needle, data in cases.items():
        with pytest.raises(InvalidRequest, match=needle):
            read_archive(data)


def _twice() -> bytes:
    m1, m2 = tarfile.TarInfo("adapter_config.json"), tarfile.TarInfo("x/adapter_config.json")
    m1.size = m2.size = 2
    return tar([m1, m2], {"adapter_config.json": b"{}", "x/adapter_config.json": b"{}"})


def _two_folders() -> bytes:
    m1, m2 = tarfile.TarInfo("a/adapter_config.json"), tarfile.TarInfo("b/adapter_model.safetensors")
    m1.size = m2.size = 2
    return tar([m1, m2], {"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"{}"})


def test_multipart_file_part():
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nmine\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.tar.gz\"\r\n"
            b"Content-Type: application/gzip\r\n\r\n" + b"\x00\r\n\xff-binary" + b"\r\n--XX--\r\n")
    data, fields = archive_bytes(body, "multipart/form-data; boundary=XX")
    assert data == b"\x00\r\n\xff-binary" and fields == {"name": "mine"}
    assert archive_bytes(b"raw", "application/gzip") == (b"raw", {})
    with pytest.raises(InvalidRequest, match="`file` part"):
        archive_bytes(body.replace(b'name="file"', b'name="other"'), "multipart/form-data; boundary=XX")
