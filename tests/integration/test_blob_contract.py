"""The `BlobStore` contract (`blobs/base.py`), run unchanged against the local and S3 stores.

The local store works in the test's tmp_path; the S3 store talks over HTTP to a moto server
in its own process, each test with a fresh bucket that the store's start() has to create.
A few S3-only tests at the end check what the contract cannot see (parts, regions, memory).
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from chatservice.blobs.base import READ_CHUNK, BlobNotFound, BlobStore, InvalidKey
from chatservice.blobs.local import LocalBlobStore
from chatservice.blobs.s3 import S3BlobStore
from tests.s3_server import (
    S3_ACCESS_KEY_ID,
    S3_REGION,
    S3_SECRET_ACCESS_KEY,
    new_bucket_name,
    s3_client,
    s3_endpoint,  # noqa: F401
)

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 accepts, so that a few MiB make a multipart upload
BIG = 11 * MiB  # three parts: 5 + 5 + 1
STORES = ["local", "s3"]
TEXT = "text/plain"


@dataclass
class Backend:
    """Makes stores of one kind, and looks at what they stored from the outside.

    A namespace is a bucket (S3) or a directory under `tmp_path` (local)."""

    kind: str
    tmp_path: Path
    endpoint: str | None = None
    namespace: str = field(default_factory=new_bucket_name)

    def store(self, namespace: str | None = None) -> BlobStore:
        namespace = namespace or self.namespace
        if self.kind == "local":
            return LocalBlobStore(self.tmp_path / namespace)
        return S3BlobStore(
            namespace,
            endpoint_url=self.endpoint,
            region=S3_REGION,
            access_key_id=S3_ACCESS_KEY_ID,
            secret_access_key=S3_SECRET_ACCESS_KEY,
            part_size=PART,
        )

    async def exists(self, namespace: str) -> bool:
        if self.kind == "local":
            return (self.tmp_path / namespace).is_dir()
        async with s3_client(self.endpoint) as s3:
            try:
                await s3.head_bucket(Bucket=namespace)
            except ClientError:
                return False
            return True

    async def stored(self, namespace: str | None = None) -> list[str]:
        """Everything the store left behind, blob or not: temporary files and unfinished
        uploads too, and (local) files outside its root, as `../…` paths."""
        namespace = namespace or self.namespace
        if self.kind == "local":
            return await asyncio.to_thread(_files_under, self.tmp_path, self.tmp_path / namespace)
        found: list[str] = []
        async with s3_client(self.endpoint) as s3:
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=namespace):
                found += [item["Key"] for item in page.get("Contents", [])]
            uploads = await s3.list_multipart_uploads(Bucket=namespace)
            found += [f"(unfinished upload) {u['Key']}" for u in uploads.get("Uploads", [])]
        return sorted(found)


def _files_under(top: Path, root: Path) -> list[str]:
    """Every file below `top`, as a path relative to `root` (`../x` when outside it)."""
    return sorted(
        os.path.relpath(Path(directory, name), root)
        for directory, _, files in os.walk(top)
        for name in files
    )


@pytest.fixture(params=STORES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    return Backend(request.param, tmp_path, endpoint)


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend("s3", tmp_path, request.getfixturevalue("s3_endpoint"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[BlobStore]:
    made = backend.store()
    await made.start()
    yield made
    await made.close()


@pytest.fixture
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where upload sources live: outside the tmp_path the local store must keep to."""
    return tmp_path_factory.mktemp("sources")


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def source_file(directory: Path, data: bytes) -> Path:
    path = directory / uuid.uuid4().hex
    path.write_bytes(data)
    return path


async def put_file(store: BlobStore, key: str, path: Path) -> int:
    with path.open("rb") as source:
        return await store.put_stream(key, source, "application/octet-stream")


async def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    chunks = [chunk async for chunk in store.read(key, start, end)]
    assert all(0 < len(chunk) <= READ_CHUNK for chunk in chunks)
    return b"".join(chunks)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"still not true after {timeout}s"
        await asyncio.sleep(0.05)


# -- storing and reading ----------------------------------------------------------------------


async def test_put_bytes_then_get_bytes_round_trips(backend: Backend, store: BlobStore) -> None:
    await store.put_bytes("archive/chat_1_final.txt", b"hello\nworld\n", TEXT)

    assert await store.get_bytes("archive/chat_1_final.txt") == b"hello\nworld\n"
    assert await store.size("archive/chat_1_final.txt") == 12
    assert await read_all(store, "archive/chat_1_final.txt") == b"hello\nworld\n"
    assert await backend.stored() == ["archive/chat_1_final.txt"]


@pytest.mark.parametrize(
    "size",
    [0, 1, PART - 1, PART, PART + 1, BIG],
    ids=["empty", "one-byte", "part-less-one", "exactly-part", "part-plus-one", "three-parts"],
)
async def test_put_stream_stores_the_whole_file(
    backend: Backend, store: BlobStore, sources: Path, size: int
) -> None:
    data = payload(size)

    assert await put_file(store, "files/sess_1/file_1", source_file(sources, data)) == size

    assert await store.size("files/sess_1/file_1") == size
    assert await read_all(store, "files/sess_1/file_1") == data
    assert await backend.stored() == ["files/sess_1/file_1"]


async def test_put_stream_copes_with_short_reads(store: BlobStore) -> None:
    # Any readable object will do, not only buffered files: here one that trickles.
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self._data.read(min(len(buffer), 1000))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    data = payload(PART + 5000)
    trickle: Any = Trickle(data)

    assert await store.put_stream("trickled", trickle, TEXT) == len(data)
    assert await store.get_bytes("trickled") == data


async def test_overwriting_a_key_replaces_the_blob(store: BlobStore, sources: Path) -> None:
    await put_file(store, "k", source_file(sources, payload(BIG)))
    await store.put_bytes("k", b"short", TEXT)

    assert await store.get_bytes("k") == b"short"
    assert await store.size("k") == 5

    await put_file(store, "k", source_file(sources, b""))
    assert await store.get_bytes("k") == b""


RANGES = [
    pytest.param(0, None, slice(None), id="whole"),
    pytest.param(70_000, None, slice(70_000, None), id="start-only"),
    pytest.param(10, 20, slice(10, 21), id="start-and-end"),
    pytest.param(60_000, 140_000, slice(60_000, 140_001), id="across-chunks"),
    pytest.param(199_999, None, slice(199_999, None), id="last-byte"),
    pytest.param(199_999, 199_999, slice(199_999, None), id="last-byte-exactly"),
    pytest.param(0, 0, slice(0, 1), id="first-byte"),
    pytest.param(100, 10**9, slice(100, None), id="end-beyond-size-is-clipped"),
    pytest.param(200_000, None, slice(0, 0), id="start-at-size"),
    pytest.param(300_000, 400_000, slice(0, 0), id="start-beyond-size"),
]


@pytest.mark.parametrize(("start", "end", "expected"), RANGES)
async def test_read_returns_the_inclusive_range(
    store: BlobStore, start: int, end: int | None, expected: slice
) -> None:
    data = payload(200_000)
    await store.put_bytes("ranged", data, TEXT)

    assert await read_all(store, "ranged", start, end) == data[expected]


@pytest.mark.parametrize(("start", "end"), [(0, None), (0, 10), (5, None)])
async def test_read_of_an_empty_blob_is_empty(
    store: BlobStore, start: int, end: int | None
) -> None:
    await store.put_bytes("empty", b"", TEXT)

    assert await read_all(store, "empty", start, end) == b""


@pytest.mark.parametrize(("start", "end"), [(-1, None), (10, 9)])
async def test_read_rejects_a_backwards_range(
    store: BlobStore, start: int, end: int | None
) -> None:
    await store.put_bytes("ranged", b"0123456789abcdef", TEXT)

    with pytest.raises(ValueError):
        await read_all(store, "ranged", start, end)


# -- missing blobs and deletion ---------------------------------------------------------------


async def test_a_missing_blob_has_no_size_and_cannot_be_read(store: BlobStore) -> None:
    assert await store.size("files/sess_1/never") is None
    with pytest.raises(BlobNotFound):
        await store.get_bytes("files/sess_1/never")
    with pytest.raises(BlobNotFound):
        await read_all(store, "files/sess_1/never")
    with pytest.raises(BlobNotFound):
        await read_all(store, "files/sess_1/never", 10, 20)


async def test_a_directory_like_key_is_not_a_blob(store: BlobStore) -> None:
    await store.put_bytes("files/sess_1/file_1", b"x", TEXT)

    assert await store.size("files/sess_1") is None
    with pytest.raises(BlobNotFound):
        await store.get_bytes("files/sess_1")
    await store.delete("files/sess_1")
    assert await store.get_bytes("files/sess_1/file_1") == b"x"


async def test_delete_is_idempotent(backend: Backend, store: BlobStore) -> None:
    await store.put_bytes("files/sess_1/file_1", b"x", TEXT)

    await store.delete("files/sess_1/file_1")
    await store.delete("files/sess_1/file_1")
    await store.delete("files/sess_2/never_was")

    assert await store.size("files/sess_1/file_1") is None
    assert await backend.stored() == []
    await store.put_bytes("files/sess_1/file_2", b"y", TEXT)  # the place is still usable
    assert await store.get_bytes("files/sess_1/file_2") == b"y"


LAYOUT = [
    "archive/chat_sess_x_final.txt",
    "files/sess_a/file_1",
    "files/sess_a/file_2",
    "files/sess_a/thumbs/file_1",
    "files/sess_ab/file_3",
    "files/sess_b/file_4",
    "temp/chat_sess_x_final",
    "temp/chat_sess_x_snapshot_1",
    "temp/chat_sess_x_snapshot_2",
    "temp/chat_sess_x_snapshot_old/part_1",
    "temp/chat_sess_xy_snapshot_1",
]

PREFIXES = [
    pytest.param(
        "files/sess_a/",
        ["files/sess_a/file_1", "files/sess_a/file_2", "files/sess_a/thumbs/file_1"],
        id="directory",
    ),
    pytest.param(
        "files/sess_a",
        [
            "files/sess_a/file_1",
            "files/sess_a/file_2",
            "files/sess_a/thumbs/file_1",
            "files/sess_ab/file_3",
        ],
        id="directory-name-without-slash",
    ),
    pytest.param(
        "temp/chat_sess_x_snapshot_",
        [
            "temp/chat_sess_x_snapshot_1",
            "temp/chat_sess_x_snapshot_2",
            "temp/chat_sess_x_snapshot_old/part_1",
        ],
        id="partial-name",
    ),
    pytest.param("files/sess_a/file_1", ["files/sess_a/file_1"], id="whole-key"),
    pytest.param("files/sess_c/", [], id="no-such-directory"),
    pytest.param("nothing_here", [], id="no-such-name"),
]


@pytest.mark.parametrize(("prefix", "expected"), PREFIXES)
async def test_list_and_delete_prefix_take_the_keys_under_the_prefix_only(
    store: BlobStore, prefix: str, expected: list[str]
) -> None:
    for key in random.Random(1).sample(LAYOUT, len(LAYOUT)):
        await store.put_bytes(key, key.encode(), TEXT)

    assert await store.list(prefix) == expected
    assert await store.delete_prefix(prefix) == len(expected)

    assert await store.list(prefix) == []
    assert await store.delete_prefix(prefix) == 0
    for key in LAYOUT:
        if key in expected:
            assert await store.size(key) is None
        else:
            assert await store.get_bytes(key) == key.encode()
    remaining = [key for top in ("archive/", "files/", "temp/") for key in await store.list(top)]
    assert remaining == sorted(set(LAYOUT) - set(expected))


async def test_a_place_emptied_by_delete_prefix_takes_new_blobs(store: BlobStore) -> None:
    await store.put_bytes("files/sess_a/thumbs/file_1", b"1", TEXT)
    assert await store.delete_prefix("files/") == 1

    await store.put_bytes("files/sess_a/thumbs/file_2", b"2", TEXT)
    assert await store.list("files/") == ["files/sess_a/thumbs/file_2"]


async def test_delete_prefix_removes_more_than_one_batch(store: BlobStore) -> None:
    keys = [f"temp/many/blob_{n:04d}" for n in range(1100)]  # S3 deletes 1000 at a time
    await asyncio.gather(*(store.put_bytes(key, b"", TEXT) for key in keys))
    await store.put_bytes("temp/other", b"", TEXT)

    assert await store.list("temp/many/") == keys
    assert await store.delete_prefix("temp/many/") == 1100
    assert await store.list("temp/") == ["temp/other"]


# -- keys that could escape -------------------------------------------------------------------

BAD_KEYS = [
    "",
    "..",
    "../escape",
    "a/../../escape",
    "a/..",
    "a/b/../../../escape",
    "{tmp}/escape",  # absolute, pointing into the test's own directory
    "/escape",
    "a//b",
    "a/",
    "./a",
    "a/./b",
    ".hidden",
    "a\\b",
    "..\\escape",
    "a/b\\..\\..\\..\\escape",
    "a b",
    "a\x00b",
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_keys_that_could_escape_are_rejected(
    backend: Backend, store: BlobStore, tmp_path: Path, key: str
) -> None:
    key = key.format(tmp=tmp_path)
    with pytest.raises(InvalidKey):
        await store.put_bytes(key, b"x", TEXT)
    with pytest.raises(InvalidKey):
        await store.put_stream(key, io.BytesIO(b"x"), TEXT)
    with pytest.raises(InvalidKey):
        await store.get_bytes(key)
    with pytest.raises(InvalidKey):
        await read_all(store, key)
    with pytest.raises(InvalidKey):
        await store.size(key)
    with pytest.raises(InvalidKey):
        await store.delete(key)

    assert await backend.stored() == []


@pytest.mark.parametrize("prefix", ["", "/", "..", "../", "a/../", "/abs/", "./", "a\\", ".x"])
async def test_prefixes_that_could_escape_are_rejected(
    backend: Backend, store: BlobStore, prefix: str
) -> None:
    await store.put_bytes("a/b", b"x", TEXT)

    with pytest.raises(InvalidKey):
        await store.list(prefix)
    with pytest.raises(InvalidKey):
        await store.delete_prefix(prefix)

    assert await backend.stored() == ["a/b"]


# -- whole or nothing -------------------------------------------------------------------------


async def test_concurrent_writes_of_one_key_leave_one_whole_version(
    store: BlobStore, sources: Path
) -> None:
    versions = [payload(BIG, seed) for seed in range(3)]
    await store.put_bytes("race/blob", versions[0], TEXT)
    writes = asyncio.gather(
        *(put_file(store, "race/blob", source_file(sources, data)) for data in versions[1:])
    )

    reads = 0
    while not writes.done():  # a reader meanwhile sees some whole version, never a mix
        assert await read_all(store, "race/blob") in versions
        assert await store.list("race/") == ["race/blob"]
        reads += 1
    await writes

    assert reads > 0
    assert await store.get_bytes("race/blob") in versions[1:]
    assert await store.size("race/blob") == BIG


class BrokenSource(io.BytesIO):
    """A source whose reads fail once `fail_at` bytes have been read."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self._fail_at = fail_at

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self._fail_at:
            raise OSError("the source broke")
        return super().read(size)


async def test_a_failed_upload_leaves_the_old_blob_and_no_debris(
    backend: Backend, store: BlobStore
) -> None:
    await store.put_bytes("files/f", b"old", TEXT)

    # Past the first part, so that S3 has a multipart upload to abort.
    with pytest.raises(OSError, match="the source broke"):
        await store.put_stream("files/f", BrokenSource(payload(BIG), PART + 1), TEXT)
    with pytest.raises(OSError, match="the source broke"):
        await store.put_stream("files/g", BrokenSource(payload(BIG), 1000), TEXT)

    assert await store.get_bytes("files/f") == b"old"
    assert await store.size("files/g") is None
    assert await backend.stored() == ["files/f"]


class GatedSource(io.BytesIO):
    """A source that stalls at `stall_at` bytes until released, like a slow client."""

    def __init__(self, data: bytes, stall_at: int) -> None:
        super().__init__(data)
        self._stall_at = stall_at
        self.stalled = threading.Event()
        self.release = threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self._stall_at:
            self.stalled.set()
            self.release.wait(10)
        return super().read(size)


async def test_an_upload_in_progress_is_invisible(store: BlobStore) -> None:
    await store.put_bytes("files/f", b"old", TEXT)
    new = payload(2 * PART)
    source = GatedSource(new, PART + READ_CHUNK)
    upload = asyncio.ensure_future(store.put_stream("files/f", source, TEXT))
    try:
        assert await asyncio.to_thread(source.stalled.wait, 10)

        assert await store.list("files/") == ["files/f"]
        assert await store.size("files/f") == 3
        assert await read_all(store, "files/f") == b"old"
    finally:
        source.release.set()
    assert await upload == len(new)
    assert await store.get_bytes("files/f") == new


async def test_a_cancelled_upload_leaves_nothing(backend: Backend, store: BlobStore) -> None:
    source = GatedSource(payload(2 * PART), PART + READ_CHUNK)
    upload = asyncio.ensure_future(store.put_stream("files/cancelled", source, TEXT))
    assert await asyncio.to_thread(source.stalled.wait, 10)

    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    source.release.set()  # the stalled read finishes after its caller has gone

    async def nothing_left() -> bool:
        return await backend.stored() == []

    await eventually(nothing_left)
    await asyncio.sleep(0.2)
    assert await store.size("files/cancelled") is None
    assert await backend.stored() == []


# -- starting -------------------------------------------------------------------------------


async def test_start_creates_the_namespace_and_may_be_called_twice(backend: Backend) -> None:
    namespace = new_bucket_name()
    assert not await backend.exists(namespace)
    store = backend.store(namespace)

    await store.start()
    await store.start()
    try:
        assert await backend.exists(namespace)
        await store.put_bytes("k", b"v", TEXT)
        again = backend.store(namespace)
        await again.start()  # the namespace exists now: nothing to create
        assert await again.get_bytes("k") == b"v"
        await again.close()
    finally:
        await store.close()
    await store.close()


async def test_stores_starting_together_share_a_new_namespace(backend: Backend) -> None:
    namespace = new_bucket_name()
    stores = [backend.store(namespace) for _ in range(4)]

    try:
        await asyncio.gather(*(store.start() for store in stores))
        await stores[0].put_bytes("k", b"v", TEXT)
        assert [await store.get_bytes("k") for store in stores] == [b"v"] * 4
    finally:
        for store in stores:
            await store.close()


async def test_put_stream_memory_is_bounded_by_the_part_size(
    store: BlobStore, sources: Path
) -> None:
    path = source_file(sources, payload(12 * MiB))

    tracemalloc.start()
    try:
        assert await put_file(store, "big", path) == 12 * MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The whole file held at once would be 12 MiB (and more with the copies on the way).
    assert peak < 2 * PART, f"peak {peak / MiB:.1f} MiB"
    assert await store.size("big") == 12 * MiB


# -- S3 only --------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "parts"), [(PART - 1, 0), (PART, 0), (PART + 1, 2), (BIG, 3)])
async def test_s3_uploads_in_parts_only_above_the_part_size(
    s3: Backend, sources: Path, size: int, parts: int
) -> None:
    store = s3.store()
    await store.start()
    try:
        await put_file(store, "f", source_file(sources, payload(size)))
        await store.put_bytes("small", b"{}", "application/json")
    finally:
        await store.close()

    async with s3_client(s3.endpoint) as client:
        head = await client.head_object(Bucket=s3.namespace, Key="f")
        small = await client.head_object(Bucket=s3.namespace, Key="small")
    # A multipart object's ETag ends in "-<number of parts>".
    assert head["ETag"].strip('"').partition("-")[2] == (str(parts) if parts else "")
    assert head["ContentType"] == "application/octet-stream"
    assert small["ContentType"] == "application/json"


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
async def test_s3_start_creates_the_bucket_in_the_stores_region(s3: Backend, region: str) -> None:
    bucket = new_bucket_name()
    stores = [
        S3BlobStore(
            bucket,
            endpoint_url=s3.endpoint,
            region=region,
            access_key_id=S3_ACCESS_KEY_ID,
            secret_access_key=S3_SECRET_ACCESS_KEY,
        )
        for _ in range(3)
    ]
    try:
        await asyncio.gather(*(store.start() for store in stores))
    finally:
        for store in stores:
            await store.close()

    async with s3_client(s3.endpoint, region) as client:
        location = await client.get_bucket_location(Bucket=bucket)
    assert (location.get("LocationConstraint") or "us-east-1") == region


async def test_s3_credentials_come_from_the_standard_chain(
    s3: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing anywhere: no environment, no files, no instance metadata.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = new_bucket_name()

    with pytest.raises(NoCredentialsError):
        await S3BlobStore(bucket, endpoint_url=s3.endpoint, region=S3_REGION).start()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
    store = S3BlobStore(bucket, endpoint_url=s3.endpoint, region=S3_REGION)
    await store.start()
    try:
        await store.put_bytes("k", b"v", TEXT)
        assert await store.get_bytes("k") == b"v"
    finally:
        await store.close()


def test_s3_refuses_parts_smaller_than_s3_accepts() -> None:
    with pytest.raises(ValueError):
        S3BlobStore("bucket", part_size=PART - 1)
