from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageCms, PngImagePlugin

from chatservice.media.thumbnails import IMAGE_TYPES, ImageRefused, Thumbnail, make_thumbnail

METADATA_KEYS = {"exif", "icc_profile", "comment", "xmp", "XML:com.adobe.xmp"}
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def split_image(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue, to tell rotations apart."""
    im = Image.new(mode, size, "blue")
    im.paste("red", (0, 0, size[0] // 2, size[1]))
    return im


def noisy_jpeg(size: tuple[int, int] = (256, 256)) -> bytes:
    im = Image.frombytes("RGB", size, random.Random(3).randbytes(size[0] * size[1] * 3))
    return encode(im, "JPEG", quality=95)


def png(width: int, height: int, idat: bytes, *, bit_depth: int = 1) -> bytes:
    """A greyscale PNG built by hand, so the header can claim any size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    # Decoding this fails at once, so a size refusal proves nothing was decoded.
    return png(width, height, zlib.compress(b"\x00" * 16))


def blank_bilevel_png(side: int) -> bytes:
    compressor = zlib.compressobj(9)
    rows = (b"\x00" + b"\x00" * ((side + 7) // 8)) * 100
    idat = b"".join(compressor.compress(rows) for _ in range(side // 100)) + compressor.flush()
    return png(side, side, idat)


def reopen(thumbnail: Thumbnail) -> Image.Image:
    im = Image.open(io.BytesIO(thumbnail.data))
    im.load()
    return im


def assert_no_metadata(thumbnail: Thumbnail) -> None:
    im = reopen(thumbnail)
    assert not im.getexif()
    assert not METADATA_KEYS & im.info.keys()
    assert not getattr(im, "text", {})


def refusal(data: bytes, **limits: int) -> str:
    with pytest.raises(ImageRefused) as caught:
        make_thumbnail(io.BytesIO(data), **limits)
    assert caught.value.message
    return caught.value.code


def test_image_types() -> None:
    assert IMAGE_TYPES == {"image/jpeg", "image/png", "image/webp", "image/gif"}


def test_jpeg_is_rotated_upright_and_stripped_of_all_metadata() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "SecretCam"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update(
        {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (37.0, 33.0, 59.0)}
    )
    data = encode(
        split_image((400, 200)),
        "JPEG",
        exif=exif,
        comment=b"secret comment",
        icc_profile=SRGB,
        xmp=b"<x:xmpmeta>secret xmp</x:xmpmeta>",
    )
    with Image.open(io.BytesIO(data)) as original:
        assert {"exif", "icc_profile", "comment", "xmp"} <= original.info.keys()
        assert original.getexif().get_ifd(ExifTags.IFD.GPSInfo)

    thumbnail = make_thumbnail(io.BytesIO(data))

    assert thumbnail.content_type == "image/jpeg"
    assert (thumbnail.width, thumbnail.height) == (160, 320)
    assert (thumbnail.source_width, thumbnail.source_height) == (200, 400)
    assert_no_metadata(thumbnail)
    assert b"Secret" not in thumbnail.data
    assert b"secret" not in thumbnail.data
    im = reopen(thumbnail)
    assert im.format == "JPEG"
    assert im.size == (160, 320)
    # Orientation 6 means "turn clockwise to view": the left half ends on top.
    red, _, blue = im.getpixel((80, 40))  # type: ignore[misc]
    assert red > 200 and blue < 60
    red, _, blue = im.getpixel((80, 280))  # type: ignore[misc]
    assert red < 60 and blue > 200


def test_png_text_chunks_and_profiles_are_stripped() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "secret author")
    info.add_text("Comment", "secret", zip=True)
    info.add_itxt("Description", "secret itxt", lang="en")
    data = encode(split_image((640, 480)), "PNG", pnginfo=info, icc_profile=SRGB)
    with Image.open(io.BytesIO(data)) as original:
        assert len(original.text) == 3  # type: ignore[attr-defined]

    thumbnail = make_thumbnail(io.BytesIO(data))

    assert thumbnail.content_type == "image/jpeg"
    assert (thumbnail.width, thumbnail.height) == (320, 240)
    assert (thumbnail.source_width, thumbnail.source_height) == (640, 480)
    assert_no_metadata(thumbnail)
    assert b"secret" not in thumbnail.data


def test_png_with_alpha_gives_a_png_thumbnail() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "secret author")
    im = Image.new("RGBA", (500, 1000), (255, 0, 0, 0))
    im.paste((0, 255, 0, 255), (0, 500, 500, 1000))
    thumbnail = make_thumbnail(io.BytesIO(encode(im, "PNG", pnginfo=info)))

    assert thumbnail.content_type == "image/png"
    assert (thumbnail.width, thumbnail.height) == (160, 320)
    assert_no_metadata(thumbnail)
    out = reopen(thumbnail)
    assert out.mode == "RGBA"
    assert out.getpixel((80, 10))[3] == 0  # type: ignore[index]
    assert out.getpixel((80, 310)) == (0, 255, 0, 255)


def test_opaque_alpha_gives_a_jpeg_thumbnail() -> None:
    thumbnail = make_thumbnail(io.BytesIO(encode(split_image((64, 64), "RGBA"), "PNG")))
    assert thumbnail.content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("mode", "expected_type"),
    [("RGB", "image/jpeg"), ("RGBA", "image/png")],
)
def test_webp(mode: str, expected_type: str) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "SecretCam"
    im = split_image((1000, 10), mode)
    im.putpixel((0, 0), (0, 0, 0, 0) if mode == "RGBA" else (0, 0, 0))
    data = encode(im, "WEBP", exif=exif, lossless=True)
    with Image.open(io.BytesIO(data)) as original:
        assert original.getexif()[ExifTags.Base.Make] == "SecretCam"
    thumbnail = make_thumbnail(io.BytesIO(data))
    assert thumbnail.content_type == expected_type
    assert (thumbnail.width, thumbnail.height) == (320, 3)
    assert_no_metadata(thumbnail)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_malformed_exif_is_ignored_not_fatal(fmt: str) -> None:
    data = encode(split_image((40, 20)), fmt, exif=b"Exif\x00\x00II*\x00")
    thumbnail = make_thumbnail(io.BytesIO(data))
    assert (thumbnail.width, thumbnail.height) == (40, 20)
    assert_no_metadata(thumbnail)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (90, 60), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(io.BytesIO(data)) as original:
        assert original.n_frames == 3  # type: ignore[attr-defined]

    thumbnail = make_thumbnail(io.BytesIO(data))

    assert thumbnail.content_type == "image/jpeg"
    assert (thumbnail.width, thumbnail.height) == (90, 60)
    red, green, blue = reopen(thumbnail).getpixel((45, 30))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60


def test_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "lime")]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    red, green, _ = reopen(make_thumbnail(io.BytesIO(data))).getpixel((20, 20))  # type: ignore[misc]
    assert red > 200 and green < 60


def test_gif_with_transparency_gives_a_png_thumbnail() -> None:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([255, 255, 255, 255, 0, 0])
    im.paste(1, (10, 0, 20, 20))
    thumbnail = make_thumbnail(io.BytesIO(encode(im, "GIF", transparency=0)))
    assert thumbnail.content_type == "image/png"
    out = reopen(thumbnail)
    assert out.getpixel((5, 5))[3] == 0  # type: ignore[index]
    assert out.getpixel((15, 5)) == (255, 0, 0, 255)


def test_small_images_are_never_upscaled() -> None:
    thumbnail = make_thumbnail(io.BytesIO(encode(Image.new("RGB", (50, 30)), "PNG")))
    assert (thumbnail.width, thumbnail.height) == (50, 30)


def test_max_side_is_respected() -> None:
    thumbnail = make_thumbnail(io.BytesIO(noisy_jpeg((300, 200))), max_side=64)
    assert (thumbnail.width, thumbnail.height) == (64, 43)
    assert (thumbnail.source_width, thumbnail.source_height) == (300, 200)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (64, 64), 32768), "PNG")
    value, _, _ = reopen(make_thumbnail(io.BytesIO(data))).getpixel((32, 32))  # type: ignore[misc]
    assert 120 <= value <= 136


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")
    thumbnail = make_thumbnail(io.BytesIO(data))
    assert reopen(thumbnail).mode == "RGB"


def test_accepts_a_path_and_leaves_a_callers_file_open(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(noisy_jpeg())
    assert make_thumbnail(path).width == 256
    assert make_thumbnail(str(path)).width == 256
    with path.open("rb") as file:
        make_thumbnail(file)
        assert not file.closed


def test_too_many_pixels_is_refused_from_the_header_alone() -> None:
    assert refusal(header_only_png(7000, 6000)) == "IMAGE_TOO_LARGE"
    assert refusal(header_only_png(2000, 1000), max_pixels=1_000_000) == "IMAGE_TOO_LARGE"
    assert refusal(header_only_png(1000, 1000), max_pixels=1_000_000) == "INVALID_IMAGE"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_warning_band_is_refused_even_with_a_higher_limit() -> None:
    # 100M pixels: above Image.MAX_IMAGE_PIXELS, below twice that (where it raises).
    assert refusal(header_only_png(10_000, 10_000), max_pixels=10**9) == "IMAGE_TOO_LARGE"


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_a_bomb_warning_turned_into_an_error_is_a_refusal() -> None:
    assert refusal(header_only_png(10_000, 10_000), max_pixels=10**9) == "IMAGE_TOO_LARGE"


def test_decompression_bomb_is_refused() -> None:
    bomb = blank_bilevel_png(30_000)
    # 900M pixels that would take 900 MB decoded, in about 100 kB.
    assert len(bomb) < 200_000
    assert refusal(bomb) == "IMAGE_TOO_LARGE"
    assert refusal(bomb, max_pixels=10**12) == "IMAGE_TOO_LARGE"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(noisy_jpeg()[:3000], id="truncated jpeg"),
        pytest.param(noisy_jpeg((2000, 1000))[:500_000], id="truncated large jpeg"),
        pytest.param(encode(split_image((300, 300)), "PNG")[:-40], id="truncated png"),
        pytest.param(random.Random(5).randbytes(5000), id="random bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x7fELF" + b"\x00" * 200, id="png signature then elf"),
        pytest.param(encode(split_image((30, 30)), "BMP"), id="bmp is not attempted"),
        pytest.param(encode(split_image((30, 30)), "TIFF"), id="tiff is not attempted"),
    ],
)
def test_invalid_images_are_refused(data: bytes) -> None:
    assert refusal(data) == "INVALID_IMAGE"


def test_max_side_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_thumbnail(io.BytesIO(noisy_jpeg()), max_side=0)
