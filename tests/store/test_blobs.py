"""Blob store on a local folder and on an S3-compatible server started by the test (moto)."""

from __future__ import annotations

import hashlib
import socket
import uuid

import pytest

from lorafleet.catalog import ADMIN, Catalog
from lorafleet.errors import Corrupt, InvalidRequest, NotFound
from lorafleet.store import BlobRef, FsspecBlobStore, LocalBlobStore, Manifest, open_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on loopback; offline, no AWS account."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # moto accepts anything; botocore wants some
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"lf-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}/prefix", {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "store")
    url, opts = request.getfixturevalue("s3_url")
    return FsspecBlobStore(url, **opts)


def _corrupt(store, sha: str, data: bytes) -> None:
    if isinstance(store, LocalBlobStore):
        store.path(sha).write_bytes(data)
    else:
        store.fs.pipe_file(store._key(sha), data)


def test_put_get_dedupe(store):
    data = b"lora bytes" * 1000
    ref = store.put(data)
    assert ref == BlobRef(hashlib.sha256(data).hexdigest(), len(data))
    assert store.put(data) == ref
    assert store.get(ref) == data and store.exists(ref.sha256)
    assert [sha for sha, _ in store.list_blobs()] == [ref.sha256]
    assert store.sweep_tmp(0) == 0  # no temp file survives a put


def test_truncated_or_altered_blob_is_refused(store):
    ref = store.put(b"a" * 100)
    _corrupt(store, ref.sha256, b"a" * 50)
    with pytest.raises(Corrupt, match="50 bytes"):
        store.get(ref)
    _corrupt(store, ref.sha256, b"b" * 100)
    with pytest.raises(Corrupt, match="does not match"):
        store.get(ref)
    store.delete(ref.sha256)
    with pytest.raises(NotFound):
        store.get(ref)
    with pytest.raises(InvalidRequest):
        store.get(BlobRef("../../etc/passwd", 1))


def test_manifest_digest_is_order_independent():
    a = Manifest.for_bytes({"x.json": b"1", "y.bin": b"2"})
    b = Manifest.for_bytes({"y.bin": b"2", "x.json": b"1"})
    assert a.digest == b.digest and a.size_bytes == 2
    assert Manifest.for_bytes({"x.json": b"1", "y.bin": b"3"}).digest != a.digest
    with pytest.raises(InvalidRequest):
        Manifest.for_bytes({"dir/x": b""})


def test_catalog_over_s3(s3_url, tmp_path):
    """The whole publish/resolve/read/gc path with blobs in S3."""
    import json

    from lorafleet.lora.spec import LoraSpec

    url, opts = s3_url
    spec = LoraSpec(4)
    cat = Catalog(Catalog.open(f"sqlite:///{tmp_path}/c.db", str(tmp_path / "unused")).db, open_store(url, **opts))
    cat.create_policy(ADMIN, "s3/p", "lorafleet/tiny-llama", spec)
    files = {"adapter_config.json": json.dumps(spec.to_peft_config("lorafleet/tiny-llama")).encode(),
             "adapter_model.safetensors": b"w" * 4096}
    rev = cat.publish(ADMIN, "s3/p", files, aliases=["prod"])
    assert cat.read_files(ADMIN, "s3/p:prod") == files
    cat.store.put(b"orphan")
    assert cat.gc(grace_s=0).blobs_deleted == 1
    assert cat.check().ok and rev.store_url == url
    cat.close()


def test_republishing_an_old_blob_protects_it_from_gc(tmp_path):
    """A publish that deduplicates onto an old unreferenced blob refreshes its age, so a gc
    running before the publish commits (grace period) cannot delete it."""
    import os
    import time

    store = LocalBlobStore(tmp_path / "store")
    ref = store.put(b"weights")
    old = time.time() - 7200
    os.utime(store.path(ref.sha256), (old, old))
    store.put(b"weights")
    [(sha, mtime)] = list(store.list_blobs())
    assert sha == ref.sha256 and mtime > time.time() - 60
