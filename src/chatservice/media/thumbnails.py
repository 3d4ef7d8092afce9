"""Metadata-free thumbnails of uploaded images.

Synchronous and CPU-bound: callers run these in a worker thread.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO

from PIL import ExifTags, Image

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
_FORMATS = ["JPEG", "PNG", "WEBP", "GIF"]
# What ImageOps.exif_transpose does, minus its re-encoding of the EXIF block,
# which raises on malformed tags and is wasted work since metadata is dropped.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_JPEG_QUALITY = 80


class ImageRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Thumbnail:
    data: bytes
    content_type: str
    width: int
    height: int
    source_width: int
    source_height: int


def _check_size(width: int, height: int, max_pixels: int) -> None:
    # Pillow's own bomb check only warns between MAX_IMAGE_PIXELS and twice that;
    # count that band as refused too. Read, never set: the limit is process-global.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if width * height > max_pixels or (pillow_limit and width * height > pillow_limit):
        raise ImageRefused("IMAGE_TOO_LARGE", f"The image is too large ({width}x{height} pixels).")


def _orientation(im: Image.Image) -> int:
    # EXIF is optional metadata that is dropped anyway; when it cannot be parsed
    # the picture is shown as stored, as browsers do.
    try:
        value = im.getexif().get(ExifTags.Base.Orientation)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


def _to_8bit(im: Image.Image) -> Image.Image:
    # Converting 16/32-bit greyscale straight to L clips instead of scaling,
    # which turns most such pictures white.
    if im.mode.startswith("I"):
        return im.convert("I").point(lambda value: value / 256).convert("L")
    return im


def _encode(im: Image.Image) -> tuple[bytes, str]:
    # A fresh image carries no info dict, so no EXIF, ICC, XMP, comment or text
    # chunk can reach the encoder.
    clean = Image.new(im.mode, im.size)
    clean.paste(im)
    buffer = io.BytesIO()
    # An alpha channel that is opaque everywhere (common in screenshots) needs no PNG.
    if clean.mode == "RGBA" and clean.getchannel("A").histogram()[255] < clean.width * clean.height:
        clean.save(buffer, "PNG", optimize=True)
        return buffer.getvalue(), "image/png"
    clean.convert("RGB").save(buffer, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    return buffer.getvalue(), "image/jpeg"


def make_thumbnail(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    max_side: int = 320,
    max_pixels: int = 40_000_000,
) -> Thumbnail:
    """A JPEG (or PNG when transparent) thumbnail fitting max_side x max_side.

    Only JPEG, PNG, WebP and GIF are opened; animations give their first frame.
    Raises ImageRefused with code IMAGE_TOO_LARGE or INVALID_IMAGE.
    """
    if max_side < 1:
        raise ValueError("max_side must be positive")
    try:
        with Image.open(source, formats=_FORMATS) as im:
            width, height = im.size
            _check_size(width, height, max_pixels)
            # JPEGs can decode at 1/2..1/8 scale, which saves most of the work.
            im.draft(None, (max_side, max_side))
            # Decode everything now so corrupt or truncated data fails here.
            im.load()
            frame = _to_8bit(im)
            frame = frame.convert("RGBA" if frame.has_transparency_data else "RGB")
            frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            # Turning the small result is cheaper than turning the source.
            orientation = _orientation(im)
            if orientation in _ORIENTATIONS:
                frame = frame.transpose(_ORIENTATIONS[orientation])
            if orientation in _QUARTER_TURNS:
                width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused("IMAGE_TOO_LARGE", "The image is too large.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # UnidentifiedImageError is an OSError.
        raise ImageRefused("INVALID_IMAGE", "The image is corrupt or not supported.") from exc
    data, content_type = _encode(frame)
    return Thumbnail(data, content_type, frame.width, frame.height, width, height)
