from __future__ import annotations

import io
import random
import re
import struct
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from chatservice.media.sniff import (
    HEAD_BYTES,
    FileTypeRefused,
    judge_type,
    normalise_mime,
    sniff,
)

ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + struct.pack("<HHI", 2, 0x3E, 1) + b"\x00" * 40
# DOS header with e_lfanew pointing at a PE signature, as real executables have.
PE = b"MZ\x90\x00\x03" + b"\x00" * 55 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 100
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
ALLOWED = {"image/jpeg", "image/png", "image/webp", "image/gif", "application/pdf", "text/plain"}


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), "green").save(buffer, fmt)
    return buffer.getvalue()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("image/PNG", "image/png"),
        ("text/plain; charset=utf-8", "text/plain"),
        ("image/jpg", "image/jpeg"),
        ("image/pjpeg", "image/jpeg"),
        ("image/x-png", "image/png"),
        ("application/x-pdf", "application/pdf"),
        ("application/x-zip-compressed", "application/zip"),
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (None, None),
        ("", None),
        ("application/octet-stream", None),
        ("Application/Octet-Stream; x=y", None),
        ("image", None),
        ("image/", None),
        ("image/png/extra", None),
        ("<script>/x", None),
        ("image /png", None),
    ],
)
def test_normalise_mime(declared: str | None, expected: str | None) -> None:
    assert normalise_mime(declared) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (image_bytes("JPEG"), "image/jpeg"),
        (image_bytes("PNG"), "image/png"),
        (image_bytes("WEBP"), "image/webp"),
        (image_bytes("GIF"), "image/gif"),
        (PDF, "application/pdf"),
        (b"%PDF-1.4\n1 0 obj << >> endobj\n", "application/pdf"),
        (zip_bytes(), "application/zip"),
        (ELF, "application/x-executable"),
        (PE, "application/x-msdownload"),
        (b"#!/bin/sh\nrm -rf /tmp/x\n", "text/plain"),
        ("보고서 초안입니다.\n둘째 줄\n".encode(), "text/plain"),
        (b"\xef\xbb\xbfwith a BOM\r\n", "text/plain"),
        (b"\x1b[31mred log line\x1b[0m\n", "text/plain"),
        # Plain text that starts with filetype's two- or three-letter signatures.
        (b"BMW service notes\n", "text/plain"),
        (b"BZh, said the bee\n", "text/plain"),
        (b"ID3 tag spec notes\n", "text/plain"),
        (b"text\x00with a NUL", "application/octet-stream"),
        (b"caf\xe9 in latin-1", "application/octet-stream"),
        (b"\x01\x02\x03\x04mostly controls\x05\x06", "application/octet-stream"),
        (random.Random(7).randbytes(4096), "application/octet-stream"),
        (b"", "application/x-empty"),
    ],
)
def test_sniff(content: bytes, expected: str) -> None:
    assert sniff(content) == expected


@pytest.mark.parametrize("content", [ELF, PE, b"#!/bin/sh\necho hi\n", b"MZ" + b"\x00" * 200])
def test_executables_and_scripts_are_never_images(content: bytes) -> None:
    assert not sniff(content).startswith("image/")


def test_png_signature_wins_even_with_junk_after_it() -> None:
    # Sniffing only looks at magic bytes; decoding (thumbnails) is what catches this.
    assert sniff(b"\x89PNG\r\n\x1a\n" + ELF) == "image/png"


def test_multibyte_character_cut_at_the_end_of_the_head_is_still_text() -> None:
    head = ("가" * HEAD_BYTES).encode()[:HEAD_BYTES]
    assert len(head) % 3 != 0
    assert sniff(head) == "text/plain"


def test_only_a_cut_character_is_not_text() -> None:
    assert sniff("가".encode()[:2]) == "application/octet-stream"


def test_only_the_head_is_inspected() -> None:
    assert sniff(b"a" * HEAD_BYTES + b"\x00") == "text/plain"


def test_judge_type_returns_the_detected_type() -> None:
    assert judge_type(image_bytes("PNG"), "image/png", ALLOWED) == "image/png"
    assert judge_type(image_bytes("JPEG"), "image/jpg", ALLOWED) == "image/jpeg"


@pytest.mark.parametrize("declared", [None, "", "application/octet-stream", "garbage"])
def test_judge_type_ignores_uninformative_declarations(declared: str | None) -> None:
    assert judge_type(PDF, declared, ALLOWED) == "application/pdf"


def test_judge_type_normalises_the_allowed_list() -> None:
    assert judge_type(image_bytes("JPEG"), None, ["IMAGE/JPG; q=1"]) == "image/jpeg"


@pytest.mark.parametrize("declared", ["text/csv", "text/markdown", "text/x-python", "text/plain"])
def test_declared_text_subtypes_are_accepted_as_plain_text(declared: str) -> None:
    assert judge_type(b"a,b\n1,2\n", declared, ALLOWED) == "text/plain"


def test_declared_text_needs_plain_text_to_be_allowed() -> None:
    with pytest.raises(FileTypeRefused) as caught:
        judge_type(b"a,b\n1,2\n", "text/csv", {"text/csv"})
    assert caught.value.code == "UNSUPPORTED_FILE_TYPE"


def test_declared_png_with_pdf_content_is_a_mismatch() -> None:
    with pytest.raises(FileTypeRefused) as caught:
        judge_type(PDF, "image/png", ALLOWED)
    assert caught.value.code == "FILE_TYPE_MISMATCH"
    assert "image/png" in caught.value.message
    assert "application/pdf" in caught.value.message


def test_declared_image_with_text_content_is_a_mismatch() -> None:
    with pytest.raises(FileTypeRefused) as caught:
        judge_type(b"<svg onload=alert(1)>", "image/png", ALLOWED)
    assert caught.value.code == "FILE_TYPE_MISMATCH"


@pytest.mark.parametrize("content", [ELF, PE, zip_bytes(), b"\x00\x01\x02binary"])
def test_declared_png_with_disallowed_content_is_unsupported(content: bytes) -> None:
    with pytest.raises(FileTypeRefused) as caught:
        judge_type(content, "image/png", ALLOWED)
    assert caught.value.code == "UNSUPPORTED_FILE_TYPE"
    assert sniff(content) in caught.value.message


def test_empty_content_is_refused() -> None:
    with pytest.raises(FileTypeRefused) as caught:
        judge_type(b"", "text/plain", ALLOWED)
    assert caught.value.code == "EMPTY_FILE"


@given(st.binary(max_size=HEAD_BYTES + 16))
def test_sniff_never_raises_and_returns_a_mime_type(head: bytes) -> None:
    assert re.fullmatch(r"[a-z]+/[a-z0-9.+-]+", sniff(head))


@given(
    st.binary(max_size=512) | st.text(max_size=200).map(str.encode),
    st.none() | st.text(max_size=40),
)
def test_judge_type_only_raises_file_type_refused(head: bytes, declared: str | None) -> None:
    try:
        assert judge_type(head, declared, ALLOWED) in ALLOWED
    except FileTypeRefused as refused:
        assert refused.code in {"EMPTY_FILE", "UNSUPPORTED_FILE_TYPE", "FILE_TYPE_MISMATCH"}
