"""Uploads (`POST /api/chat/sessions/{id}/files`) and downloads (`/files/{id}[/thumb]`).

The upload route parses its multipart body itself, after authenticating the caller and
checking the session: FastAPI's form parameters would spool the whole body first, for
anyone. Downloads stream from the blob store with single-range support (RFC 9110 §14).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from chatservice.api.deps import Caller, Parts
from chatservice.api.errors import error_response
from chatservice.api.responses import JSONBody, Responses, errors
from chatservice.api.routing import CheckedRoute
from chatservice.api.sessions import SessionId
from chatservice.domain import isoformat
from chatservice.media.names import content_disposition
from chatservice.services.errors import InvalidInput, UnsupportedMediaType
from chatservice.services.files import MAX_CAPTION_CHARS, Download, Upload
from chatservice.values import UnacceptableValue, check_text

router = APIRouter(tags=["files"], route_class=CheckedRoute)

FileId = Annotated[str, Path(min_length=1, max_length=100)]
# Room for the multipart framing and the small fields beside the file itself.
MULTIPART_OVERHEAD = 64 * 1024
MAX_FIELD_BYTES = 16 * 1024
UPLOAD_PATH = re.compile(r"^/api/chat/sessions/[^/]+/files/?$")
_FALSE = {"false", "0", "no", "off"}
# Downloads render nothing of their own: no scripts, no plugins, even if a browser is
# talked into rendering one as a page.
_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=3600",
    "Accept-Ranges": "bytes",
}
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# The route reads its multipart body itself (see the module's doc), so FastAPI cannot
# describe it: this is that description.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "its type is judged from its bytes "
                            "(ALLOWED_FILE_TYPES), at most MAX_FILE_SIZE bytes",
                        },
                        "message": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
                        "client_msg_id": {"type": "string", "maxLength": 100},
                        "attach": {
                            "type": "string",
                            "description": "false, 0, no or off: only store the file "
                            "(for a later WebSocket `file` frame)",
                        },
                    },
                }
            }
        },
    }
}
# Whatever type the file has; thumbnails are JPEG or PNG.
_DOWNLOAD: Responses = {
    200: {"description": "the file", "content": {"*/*": {"schema": {}}}},
    206: {"description": "the requested `Range`", "content": {"*/*": {"schema": {}}}},
    304: {"description": "`If-None-Match` names the current ETag"},
    **errors(403, 404, 416),
}
_DOWNLOAD_HEADERS_IN = {
    "parameters": [
        {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
        for name in ("Range", "If-Range", "If-None-Match")
    ]
}


@router.post(
    "/api/chat/sessions/{session_id}/files",
    status_code=201,
    responses=errors(400, 403, 404, 409, 415, 429),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_file(
    session_id: SessionId, request: Request, caller: Caller, parts: Parts
) -> JSONBody:
    session = await parts.files.check_can_upload(caller, session_id)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "send the file as multipart/form-data with a `file` part", code="EXPECTED_MULTIPART"
        )
    async with request.form(max_files=1, max_fields=8, max_part_size=MAX_FIELD_BYTES) as form:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise InvalidInput("the form has no `file` part", code="FILE_REQUIRED")
        caption = _text_field(form.get("message"), "message")
        client_msg_id = _text_field(form.get("client_msg_id"), "client_msg_id") or None
        attach = (_text_field(form.get("attach"), "attach") or "true").lower() not in _FALSE
        record, message = await parts.files.upload(
            caller,
            session,
            Upload(
                name=part.filename,
                declared_type=part.content_type,
                source=part.file,
                size=part.size or 0,
            ),
            caption=caption,
            attach=attach,
            client_msg_id=client_msg_id,
        )
    return JSONBody(
        {
            "file_id": record.file_id,
            "file_url": record.url,
            "thumbnail_url": record.thumbnail_url,
            "message_id": message.message_id if message else None,
            "seq": message.seq if message else None,
            "file_info": {
                "name": record.file_name,
                "type": record.file_type,
                "size": record.file_size,
            },
            "uploaded_at": isoformat(record.uploaded_at),
        },
        status_code=201,
    )


@router.get(
    "/files/{file_id}",
    response_class=Response,
    responses=_DOWNLOAD,
    openapi_extra=_DOWNLOAD_HEADERS_IN,
)
async def download_file(
    file_id: FileId, request: Request, caller: Caller, parts: Parts
) -> Response:
    found = await parts.files.download(caller, file_id, thumbnail=False)
    return _serve(parts, request, found)


@router.get(
    "/files/{file_id}/thumb",
    response_class=Response,
    responses=_DOWNLOAD,
    openapi_extra=_DOWNLOAD_HEADERS_IN,
)
async def download_thumbnail(
    file_id: FileId, request: Request, caller: Caller, parts: Parts
) -> Response:
    found = await parts.files.download(caller, file_id, thumbnail=True)
    return _serve(parts, request, found)


def _text_field(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"`{name}` must be a text field", code="VALIDATION_ERROR")
    try:
        check_text(value, name)
    except UnacceptableValue as exc:
        raise InvalidInput(str(exc), code="VALIDATION_ERROR") from None
    return value


def _serve(parts: Parts, request: Request, found: Download) -> Response:
    media_type = found.content_type
    if media_type == "text/plain":
        media_type = "text/plain; charset=utf-8"  # uploads are judged text only as UTF-8
    disposition = "inline" if found.content_type in INLINE_TYPES else "attachment"
    headers = {
        **_DOWNLOAD_HEADERS,
        "ETag": found.etag,
        "Content-Disposition": content_disposition(disposition, found.file_name),
    }
    if {found.etag, "*"} & _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    span = _range(request, found)
    if isinstance(span, str):  # "unsatisfiable"
        return error_response(
            416,
            "RANGE_NOT_SATISFIABLE",
            f"the file has {found.size} bytes",
            headers={"Content-Range": f"bytes */{found.size}"},
        )
    if span is None:
        start, end, status = 0, found.size - 1, 200
    else:
        (start, end), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{found.size}"
    if found.size == 0:
        return Response(b"", status_code=200, media_type=media_type, headers=headers)
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        parts.files.stream(found, start, end),
        status_code=status,
        media_type=media_type,
        headers=headers,
    )


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _range(request: Request, found: Download) -> tuple[int, int] | str | None:
    """The one byte range to send, None for the whole file, or "unsatisfiable".

    Multiple ranges and malformed headers get the whole file, which RFC 9110 allows.
    """
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != found.etag:
        return None  # the client's copy is of something else: send it whole
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    size = found.size
    if not first:  # "bytes=-N": the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(size - length, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return "unsatisfiable" if start >= size else None
    return start, end
