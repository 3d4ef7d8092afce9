"""The blob store protocol: one small surface that the local and S3 stores both implement.

Keys are relative, `/`-separated paths (`files/sess_…/file_…`, `archive/chat_…_final.txt`);
each store maps them onto its own namespace. Bodies move in chunks so a download or an
upload never holds a whole file in memory.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import BinaryIO, Protocol

# A chunk of a streamed read; large enough to keep per-chunk overhead small.
READ_CHUNK = 64 * 1024

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class BlobNotFound(Exception):
    """No blob under that key."""


class InvalidKey(ValueError):
    """A key that could escape the store's namespace or that no store can hold."""


def check_key(key: str) -> str:
    """Keys are built by the service from ids, never from user input; this is the guard
    that keeps a bug from writing outside the store (`..`, absolute paths, empty parts)."""
    if len(key) > 512 or not _KEY.match(key) or ".." in key:
        raise InvalidKey(f"invalid blob key {key[:80]!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing/deletion prefix: a key, optionally ending in `/` or a partial last part."""
    if prefix == "":
        raise InvalidKey("an empty prefix would name the whole store")
    check_key(prefix.rstrip("/"))
    return prefix


def check_range(start: int, end: int | None) -> None:
    """Both stores refuse a backwards range: S3 would silently send the whole object."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range {start}-{end}")


class BlobStore(Protocol):
    async def start(self) -> None:
        """Make the store usable (create the directory / the bucket if missing)."""

    async def close(self) -> None: ...

    async def put_stream(self, key: str, source: BinaryIO, content_type: str) -> int:
        """Store what `source` (a readable file object, positioned at its start) holds.

        Reads it in bounded pieces; returns the number of bytes stored. The blob appears
        whole or not at all: a reader never sees a partial upload.
        """

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    async def size(self, key: str) -> int | None:
        """The blob's size in bytes, or None when there is no such blob."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes `start`..`end` (inclusive; None: to the end) in chunks of <= READ_CHUNK.

        Raises BlobNotFound (on first iteration) when there is no such blob.
        """

    async def get_bytes(self, key: str) -> bytes:
        """The whole blob; for small ones (transcripts). Raises BlobNotFound."""

    async def delete(self, key: str) -> None:
        """Remove the blob; removing a missing one is not an error."""

    async def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, sorted."""

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every blob whose key starts with `prefix`; returns how many."""
