"""Blobs as files under one directory: key `files/sess_1/file_2` is `root/files/sess_1/file_2`.

Every file operation runs in a worker thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from chatservice.blobs.base import (
    READ_CHUNK,
    BlobNotFound,
    InvalidKey,
    check_key,
    check_prefix,
    check_range,
)


class _Abandoned(Exception):
    """The caller of a write went away; the half-written file must not become a blob."""


def _is_key(name: str) -> bool:
    """Whether a file's relative path is a blob; temporary files (`.name.xyz.tmp`) are not."""
    try:
        check_key(name)
    except InvalidKey:
        return False
    return True


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self._root = root

    async def start(self) -> None:
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        pass  # no file stays open between calls

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    async def put_stream(self, key: str, source: BinaryIO, content_type: str) -> int:
        path = self._path(key)
        abandoned = threading.Event()
        try:
            return await asyncio.to_thread(self._write, path, source, abandoned)
        except asyncio.CancelledError:
            # The thread cannot be interrupted; it sees the flag at its next chunk and
            # drops its temporary file instead of publishing a blob nobody will record.
            abandoned.set()
            raise

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await self.put_stream(key, io.BytesIO(data), content_type)

    def _write(self, path: Path, source: BinaryIO, abandoned: threading.Event) -> int:
        fd, temp = self._temp_file(path)
        try:
            written = 0
            with open(fd, "wb") as out:
                while chunk := source.read(READ_CHUNK):
                    if abandoned.is_set():
                        raise _Abandoned
                    out.write(chunk)
                    written += len(chunk)
                # Durable before it is visible: the database will point at this blob, so
                # after a crash the name must not lead to an empty or truncated file.
                out.flush()
                os.fsync(out.fileno())
            if abandoned.is_set():
                raise _Abandoned
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return written

    def _temp_file(self, path: Path) -> tuple[int, str]:
        """A new file beside `path` (same file system, so `os.replace` is atomic)."""
        for _ in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            except FileNotFoundError:
                continue  # a concurrent delete pruned the directory between the two calls
        raise OSError(f"could not create a file in {path.parent}")

    async def size(self, key: str) -> int | None:
        return await asyncio.to_thread(_file_size, self._path(key))

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        check_range(start, end)
        return self._read(key, path, start, end)

    async def _read(
        self, key: str, path: Path, start: int, end: int | None
    ) -> AsyncIterator[bytes]:
        try:
            file = await asyncio.to_thread(_open_at, path, start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(key) from None
        # The open file is a snapshot: a concurrent overwrite replaces the name, not the
        # bytes this reader is streaming.
        with file:
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await asyncio.to_thread(file.read, want)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(key) from None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, self._path(key))

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(_list_keys, self._root, check_prefix(prefix))

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)

        def delete_all() -> int:
            return sum(self._delete(self._root / key) for key in _list_keys(self._root, prefix))

        return await asyncio.to_thread(delete_all)

    def _delete(self, path: Path) -> bool:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        self._prune(path.parent)
        return True

    def _prune(self, directory: Path) -> None:
        """Remove directories emptied by a delete, so per-session folders don't pile up."""
        while directory != self._root and directory.is_relative_to(self._root):
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone): whatever is above is in use too
            directory = directory.parent


def _list_keys(root: Path, prefix: str) -> list[str]:
    # A prefix is a string prefix, as in S3: `temp/chat_1_` matches the files and
    # directories in `temp` whose names start with `chat_1_`, and all below them.
    parent, _, partial = prefix.rpartition("/")
    keys: list[str] = []
    first = True
    for directory, subdirs, files in os.walk(root / parent):
        if first:
            subdirs[:] = [name for name in subdirs if name.startswith(partial)]
            first = False
        for name in files:
            key = Path(directory, name).relative_to(root).as_posix()
            if key.startswith(prefix) and _is_key(key):
                keys.append(key)
    return sorted(keys)


def _file_size(path: Path) -> int | None:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _open_at(path: Path, start: int) -> BinaryIO:
    file = path.open("rb")
    file.seek(start)
    return file
