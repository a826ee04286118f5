"""Content-addressed blob storage for revision files: a local folder or any fsspec URL."""

from lorafleet.store.blobs import BlobStore, FsspecBlobStore, LocalBlobStore, open_store
from lorafleet.store.manifest import BlobRef, Manifest

__all__ = ["BlobRef", "BlobStore", "FsspecBlobStore", "LocalBlobStore", "Manifest", "open_store"]
