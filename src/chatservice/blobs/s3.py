"""Blobs as objects in one S3 (or S3-compatible) bucket, under their keys as they are."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, BinaryIO, cast

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from chatservice.blobs.base import READ_CHUNK, BlobNotFound, check_key, check_prefix, check_range

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.literals import BucketLocationConstraintType
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CreateBucketRequestTypeDef,
        GetObjectRequestTypeDef,
    )

# HEAD responses have no body, so a missing key or bucket shows only as a bare 404.
_NO_BUCKET = {"404", "NotFound", "NoSuchBucket"}
_NO_KEY = {"404", "NotFound", "NoSuchKey"}


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _read_part(source: BinaryIO, size: int, head: bytes = b"") -> tuple[io.BytesIO, int]:
    """Up to `size` bytes of `source` (after `head`), gathered in a buffer of their own.

    A BytesIO that owns its buffer goes out without a copy; a `bytes` body would be copied
    once more on its way to the socket, doubling the memory held per part.
    """
    part = io.BytesIO()
    part.write(head)
    while (have := part.tell()) < size:
        chunk = source.read(min(READ_CHUNK, size - have))
        if not chunk:
            break
        part.write(chunk)
    length = part.tell()
    part.seek(0)
    return part, length


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_size: int = 8 * 1024 * 1024,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 needs parts of at least 5 MiB")
        self._bucket = bucket
        self._endpoint_url = endpoint_url
        self._region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._part_size = part_size
        self._stack: AsyncExitStack | None = None
        self._s3: S3Client | None = None

    @property
    def _client(self) -> S3Client:
        if self._s3 is None:
            raise RuntimeError("S3BlobStore.start() has not been called")
        return self._s3

    async def start(self) -> None:
        if self._s3 is not None:
            return
        config = None
        if self._endpoint_url is not None:
            # S3-compatible servers (MinIO, Ceph, moto, …) reliably support path-style
            # addressing only, and many reject the checksums botocore now sends by default.
            config = AioConfig(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        async with AsyncExitStack() as stack:
            client: S3Client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self._endpoint_url,
                    region_name=self._region,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    config=config,
                )
            )
            await self._ensure_bucket(client)
            self._stack = stack.pop_all()
        self._s3 = client

    async def _ensure_bucket(self, client: S3Client) -> None:
        try:
            await client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NO_BUCKET:
                raise
        request: CreateBucketRequestTypeDef = {"Bucket": self._bucket}
        region = client.meta.region_name
        if region and region != "us-east-1":  # us-east-1 rejects an explicit constraint
            location = cast("BucketLocationConstraintType", region)
            request["CreateBucketConfiguration"] = {"LocationConstraint": location}
        try:
            await client.create_bucket(**request)
        except ClientError as exc:
            # Another instance starting at the same time created it first.
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    async def close(self) -> None:
        stack, self._stack, self._s3 = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def put_stream(self, key: str, source: BinaryIO, content_type: str) -> int:
        check_key(key)
        part, length = await asyncio.to_thread(_read_part, source, self._part_size)
        if length == self._part_size:
            # One byte more decides between a single PUT and a multipart upload, without
            # holding a second part in memory.
            lookahead = await asyncio.to_thread(source.read, 1)
            if lookahead:
                return await self._put_parts(key, source, content_type, part, lookahead)
        await self._client.put_object(
            Bucket=self._bucket, Key=key, Body=part, ContentType=content_type
        )
        return length

    async def _put_parts(
        self, key: str, source: BinaryIO, content_type: str, part: io.BytesIO, lookahead: bytes
    ) -> int:
        """A multipart upload of a full first `part` and the rest of `source` (which starts
        with `lookahead`). S3 shows the object only once the upload is completed."""
        client = self._client
        upload = await client.create_multipart_upload(
            Bucket=self._bucket, Key=key, ContentType=content_type
        )
        upload_id = upload["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            length = total = self._part_size
            while length:
                number = len(parts) + 1
                with part:  # closing frees its buffer before the next part is read
                    uploaded = await client.upload_part(
                        Bucket=self._bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=part,
                    )
                parts.append({"ETag": uploaded["ETag"], "PartNumber": number})
                part, length = await asyncio.to_thread(
                    _read_part, source, self._part_size, lookahead
                )
                lookahead = b""
                total += length
            await client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Uploaded parts are billed until aborted; the original error is the one to
            # report, so a failing abort (the bucket's lifecycle rule reaps it) is ignored.
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(
                    Bucket=self._bucket, Key=key, UploadId=upload_id
                )
            raise
        return total

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await self._client.put_object(
            Bucket=self._bucket, Key=check_key(key), Body=data, ContentType=content_type
        )

    async def size(self, key: str) -> int | None:
        try:
            head = await self._client.head_object(Bucket=self._bucket, Key=check_key(key))
        except ClientError as exc:
            if _error_code(exc) in _NO_KEY:
                return None
            raise
        return head["ContentLength"]

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_key(key)
        check_range(start, end)
        return self._read(key, start, end)

    async def _read(self, key: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        request: GetObjectRequestTypeDef = {"Bucket": self._bucket, "Key": key}
        # No Range for the whole blob: an empty object has no satisfiable range at all.
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            response = await self._client.get_object(**request)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NO_KEY:
                raise BlobNotFound(key) from None
            if code == "InvalidRange":
                return  # `start` lies past the end: there is nothing to send
            raise
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(READ_CHUNK):
                yield chunk

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def delete(self, key: str) -> None:
        await self._client.delete_object(Bucket=self._bucket, Key=check_key(key))

    async def list(self, prefix: str) -> list[str]:
        return sorted([key async for page in self._pages(check_prefix(prefix)) for key in page])

    async def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        # Pages hold at most 1000 keys, the most one delete_objects call accepts.
        async for keys in self._pages(check_prefix(prefix)):
            if not keys:
                continue
            result = await self._client.delete_objects(
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
            if errors := result.get("Errors"):
                first = errors[0]
                raise OSError(
                    f"could not delete {len(errors)} of {len(keys)} blobs, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(keys)
        return deleted

    async def _pages(self, prefix: str) -> AsyncIterator[Sequence[str]]:
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            yield [item["Key"] for item in page.get("Contents", [])]
