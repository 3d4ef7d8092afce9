from __future__ import annotations

import email.message
import email.utils
import unicodedata
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from chatservice.media.names import content_disposition, sanitise_filename


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\evil.exe", "evil.exe"),
        ("dir/sub\\mixed/name.txt", "name.txt"),
        ("a\x00b\x1fc\x7f.txt", "abc.txt"),
        # A right-to-left override would make "gpj.exe" display as "exe.jpg".
        ("photo\u202egpj.exe", "photogpj.exe"),
        ('q"u<o>t:e|s?*.txt', "quotes.txt"),
        ("  many \t  spaces\u3000here .txt . ", "many spaces here .txt"),
        ("..", "file"),
        (".", "file"),
        ("...hidden", "hidden"),
        (".hidden", "hidden"),
        ("", "file"),
        (None, "file"),
        ("dir/", "file"),
        ("\x00\x01", "file"),
        ("CON.txt", "_CON.txt"),
        ("con", "_con"),
        ("Lpt1.tar.gz", "_Lpt1.tar.gz"),
        ("NUL .txt", "_NUL .txt"),
        ("CONSOLE.txt", "CONSOLE.txt"),
        ("보고서.pdf", "보고서.pdf"),
        ("보고서 최종.pdf", "보고서 최종.pdf"),
        ("🎉 party 🥳.png", "🎉 party 🥳.png"),
        # Zero-width joiners hold multi-person emoji together.
        ("👨\u200d👩\u200d👧.jpg", "👨\u200d👩\u200d👧.jpg"),
    ],
)
def test_sanitise_filename(raw: str | None, expected: str) -> None:
    assert sanitise_filename(raw) == expected


def test_fallback_is_configurable() -> None:
    assert sanitise_filename("../", fallback="upload") == "upload"


def test_names_are_nfc_normalised() -> None:
    decomposed = unicodedata.normalize("NFD", "보고서.pdf")
    assert decomposed != "보고서.pdf"
    assert sanitise_filename(decomposed) == "보고서.pdf"


@pytest.mark.parametrize("stem", ["a", "가", "🎉", "é"])
def test_long_names_are_cut_to_255_bytes_keeping_the_extension(stem: str) -> None:
    name = sanitise_filename(stem * 1000 + ".pdf")
    assert name.endswith(".pdf")
    assert len(name.encode()) <= 255
    assert len(name.encode()) > 255 - len(stem.encode())
    assert set(name.removesuffix(".pdf")) == {stem}


def test_an_overlong_extension_is_cut_like_the_rest_of_the_name() -> None:
    name = sanitise_filename("x." + "b" * 1000)
    assert name == ("x." + "b" * 1000)[:255]


def test_cutting_never_leaves_a_trailing_dot_or_space() -> None:
    assert sanitise_filename("a" * 254 + " .b" + "c" * 100) == "a" * 254


def test_content_disposition_for_an_ascii_name() -> None:
    assert content_disposition("attachment", "report.pdf") == 'attachment; filename="report.pdf"'


def test_content_disposition_for_a_korean_name() -> None:
    header = content_disposition("inline", "보고서.pdf")
    assert header == (
        "inline; filename=\"___.pdf\"; filename*=UTF-8''%EB%B3%B4%EA%B3%A0%EC%84%9C.pdf"
    )
    assert unquote(header.split("UTF-8''", 1)[1]) == "보고서.pdf"
    assert filename_star(header) == "보고서.pdf"


def test_content_disposition_escapes_quotes_backslashes_and_percent() -> None:
    header = content_disposition("attachment", 'say "hi" \\ 100%.txt')
    assert header.startswith('attachment; filename="say _hi_ _ 100_.txt"; ')
    assert filename_star(header) == 'say "hi" \\ 100%.txt'


def test_content_disposition_rejects_other_dispositions() -> None:
    with pytest.raises(ValueError):
        content_disposition("form-data", "a.txt")


def filename_star(header: str) -> str:
    message = email.message.Message()
    message["Content-Disposition"] = header
    params = message.get_params(header="content-disposition") or []
    # email folds filename* into a second "filename" whose value is a charset triple.
    [encoded] = [value for key, value in params if key == "filename" and isinstance(value, tuple)]
    return email.utils.collapse_rfc2231_value(encoded)


names = st.text(st.characters(codec="utf-8"), max_size=300) | st.text(max_size=40).map(
    lambda s: s * 20
)


@given(names)
@example("e\u200b\u0301")
@example("a" * 254 + " .b" + "c" * 100)
@example("CON" + " " * 300 + ".txt")
def test_sanitised_names_are_safe_and_stable(raw: str) -> None:
    name = sanitise_filename(raw)
    assert name
    assert len(name.encode()) <= 255
    assert "/" not in name
    assert "\\" not in name
    assert not any(unicodedata.category(char) in {"Cc", "Cs"} for char in name)
    assert name == name.strip(" .")
    assert unicodedata.is_normalized("NFC", name)
    assert sanitise_filename(name) == name


@given(st.sampled_from(["inline", "attachment"]), names.map(sanitise_filename))
def test_content_disposition_is_ascii_and_round_trips(disposition: str, name: str) -> None:
    header = content_disposition(disposition, name)
    assert header.isascii()
    assert "\r" not in header
    assert "\n" not in header
    if "filename*=" in header:
        assert filename_star(header) == name
    else:
        assert header == f'{disposition}; filename="{name}"'
