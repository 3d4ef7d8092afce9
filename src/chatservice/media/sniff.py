"""Judge an upload's type from its content, not from what the client claims."""

from __future__ import annotations

import codecs
import re
from collections.abc import Collection

import filetype  # type: ignore[import-untyped]

HEAD_BYTES = 8192
OCTET_STREAM = "application/octet-stream"
EMPTY = "application/x-empty"
TEXT = "text/plain"

_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "application/x-pdf": "application/pdf",
    # Windows browsers declare zips this way.
    "application/x-zip-compressed": "application/zip",
}
# RFC 7230 token characters, for both halves of type/subtype.
_MIME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
# These formats may legitimately be plain ASCII in their first bytes, so the
# text check must not override them.
_TEXTUAL_FORMATS = frozenset({"application/pdf", "application/postscript", "application/rtf"})
# C0 controls other than \t \n \v \f \r and ESC, plus DEL and C1 controls.
_CONTROL = re.compile(r"[\x01-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


class FileTypeRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _canonical(mime: str) -> str:
    base = mime.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def normalise_mime(declared: str | None) -> str | None:
    """The declared type in canonical form, or None when it says nothing useful."""
    if not declared:
        return None
    mime = _canonical(declared)
    if mime == OCTET_STREAM or not _MIME.fullmatch(mime):
        return None
    return mime


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        # Not final: the head may end in the middle of a multi-byte character.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return bool(text) and len(_CONTROL.findall(text)) * 100 <= len(text)


def sniff(head: bytes) -> str:
    """The MIME type judged from the first bytes (ideally HEAD_BYTES) of the content."""
    if not head:
        return EMPTY
    guess: str | None = filetype.guess_mime(head[:HEAD_BYTES])
    if guess in _TEXTUAL_FORMATS:
        return guess
    # Some filetype signatures are two or three ASCII letters ("BM" is BMP, "BZh"
    # bzip2, "ID3" MP3), so real binaries are told apart by being non-text.
    if _looks_like_text(head[:HEAD_BYTES]):
        return TEXT
    return guess or OCTET_STREAM


def judge_type(head: bytes, declared: str | None, allowed: Collection[str]) -> str:
    """The content's type if it is allowed and consistent with the declared one.

    Raises FileTypeRefused with code EMPTY_FILE, UNSUPPORTED_FILE_TYPE or
    FILE_TYPE_MISMATCH.
    """
    if not head:
        raise FileTypeRefused("EMPTY_FILE", "The file is empty.")
    detected = sniff(head)
    if detected not in {_canonical(mime) for mime in allowed}:
        raise FileTypeRefused(
            "UNSUPPORTED_FILE_TYPE", f"Files of type {detected} are not accepted."
        )
    claimed = normalise_mime(declared)
    if claimed is None or claimed == detected:
        return detected
    # Text has no magic bytes, so csv, markdown, JSON, SVG, scripts... all sniff as
    # text/plain and are kept (and served) as that. Only a claim of a binary format the
    # text could pass for in a browser (an image, a PDF) is a mismatch worth refusing.
    binary_claim = claimed.startswith(("image/", "application/pdf")) and not claimed.endswith(
        "+xml"
    )
    if detected == TEXT and not binary_claim:
        return TEXT
    raise FileTypeRefused(
        "FILE_TYPE_MISMATCH",
        f"The file was declared as {claimed} but its content is {detected}.",
    )
