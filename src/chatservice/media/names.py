"""File names that are safe to store, show and put in HTTP headers."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

MAX_NAME_BYTES = 255
# Longer "extensions" are just dots in a name and are cut like the rest of it.
_MAX_EXTENSION_BYTES = 32
_FORBIDDEN = frozenset('"<>:|?*\\/')
# Zero-width (non-)joiners are format characters, but emoji sequences and
# several scripts need them; bidi overrides and the like are still dropped.
_KEEP_FORMAT = frozenset("\u200c\u200d")
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
# RFC 5987 attr-char, beyond what quote() always leaves alone.
_ATTR_SAFE = "!#$&+^`|"
_NEEDS_EXTENDED = re.compile(r'[^\x20-\x7e]|["\\%]')


def _allowed(char: str) -> bool:
    if char in _FORBIDDEN:
        return False
    return char in _KEEP_FORMAT or not unicodedata.category(char).startswith("C")


def _cap(name: str) -> str:
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    if not stem or len(extension.encode()) > _MAX_EXTENSION_BYTES:
        stem, dot, extension = name, "", ""
    budget = MAX_NAME_BYTES - len(dot) - len(extension.encode())
    # Ignoring decode errors drops a character the byte cut went through.
    stem = stem.encode()[:budget].decode(errors="ignore")
    return (stem + dot + extension).rstrip(" .")


def sanitise_filename(raw: str | None, fallback: str = "file") -> str:
    """A single path component with nothing that file systems or headers choke on."""
    base = re.split(r"[/\\]", raw or "")[-1]
    # Normalise after dropping characters: dropping can bring a base letter and a
    # combining mark together, and the result must not change on a second pass.
    name = unicodedata.normalize("NFC", "".join(filter(_allowed, base)))
    name = " ".join(name.split()).strip(" .")
    if name.split(".", 1)[0].rstrip().upper() in _WINDOWS_RESERVED:
        name = "_" + name
    return _cap(name) or fallback


def content_disposition(disposition: str, filename: str) -> str:
    """An RFC 6266 Content-Disposition value, with an RFC 5987 filename* when needed."""
    if disposition not in ("inline", "attachment"):
        raise ValueError(f"disposition must be inline or attachment, not {disposition!r}")
    fallback = "".join(
        "_" if not " " <= char <= "~" or char in '"\\%' else char for char in filename
    )
    header = f'{disposition}; filename="{fallback}"'
    # Some user agents percent-decode filename=, so a "%" also needs the exact form.
    if _NEEDS_EXTENDED.search(filename):
        header += f"; filename*=UTF-8''{quote(filename, safe=_ATTR_SAFE)}"
    return header
