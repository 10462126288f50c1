"""Saving images with their infotext atomically and reading it back, in A1111's places (PNG ``parameters`` chunk,
EXIF UserComment ``UNICODE\\0`` + UTF-16-BE for JPEG/WEBP, GIF comment)."""

import os
import struct

import pytest
from PIL import Image, PngImagePlugin

from sdstack.errors import UserError
from sdstack.metadata.images import (
    decode_user_comment,
    encode_user_comment,
    read_infotext,
    read_other_info,
    save_image_atomic,
)

INFOTEXT = (
    "猫と桜, ünïcode — 😀, (masterpiece:1.2)\n"
    "Negative prompt: ぼやけ\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Lora hashes: "a: 0123456789ab"'
)


def picture(mode="RGB"):
    return Image.new(mode, (32, 24), (10, 120, 200) if mode == "RGB" else None)


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "out.jpeg", "out.webp", "out.gif"])
def test_round_trip_non_latin1(tmp_path, name):
    path = save_image_atomic(picture(), tmp_path / name, INFOTEXT)
    assert read_infotext(path) == INFOTEXT
    with Image.open(path) as im:
        assert im.size == (32, 24)
        assert read_infotext(im) == INFOTEXT
    assert os.listdir(tmp_path) == [name]  # no temp file left behind


def test_png_chunk_type_follows_latin1(tmp_path):
    save_image_atomic(picture(), tmp_path / "a.png", "plain ascii, Steps: 1")
    save_image_atomic(picture(), tmp_path / "b.png", INFOTEXT)
    assert b"tEXtparameters\0plain ascii" in (tmp_path / "a.png").read_bytes()
    assert b"iTXtparameters" in (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.info["parameters"] == "plain ascii, Steps: 1"


def test_jpeg_exif_user_comment_layout(tmp_path):
    path = save_image_atomic(picture(), tmp_path / "a.jpg", "hi")
    with Image.open(path) as im:
        raw = im.getexif().get_ifd(0x8769)[0x9286]
        exif = im.info["exif"]
    assert raw == b"UNICODE\0" + "hi".encode("utf-16-be") == b"UNICODE\0\0h\0i"
    # big-endian TIFF; IFD0 at 8 points (tag 0x8769, LONG) to the Exif IFD at 26, whose one entry is
    # UserComment (0x9286) of type UNDEFINED (7), 12 bytes, stored at offset 44
    assert exif[:10] == b"Exif\0\0MM\0\x2a"
    assert struct.unpack_from(">HHHII", exif, 6 + 8) == (1, 0x8769, 4, 1, 26)
    assert struct.unpack_from(">HHHII", exif, 6 + 26) == (1, 0x9286, 7, 12, 44)
    assert exif[6 + 44 :] == b"UNICODE\0\0h\0i"


def test_jpeg_drops_alpha_and_webp_keeps_it(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    with Image.open(save_image_atomic(rgba, tmp_path / "a.jpg", "x")) as im:
        assert im.mode == "RGB"
    with Image.open(save_image_atomic(rgba, tmp_path / "a.webp", "x", lossless=True)) as im:
        assert im.mode == "RGBA"
        assert im.getpixel((0, 0)) == (255, 0, 0, 128)


def test_format_argument_overrides_extension(tmp_path):
    path = save_image_atomic(picture(), tmp_path / "image.bin", INFOTEXT, fmt="png")
    with Image.open(path) as im:
        assert im.format == "PNG"
    assert read_infotext(path) == INFOTEXT


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="image format"):
        save_image_atomic(picture(), tmp_path / "image.xyz", "x")
    with pytest.raises(UserError, match="unknown image format"):
        save_image_atomic(picture(), tmp_path / "image.png", "x", fmt="nope")
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_file(tmp_path):
    target = tmp_path / "a.png"
    save_image_atomic(picture(), target, "first")
    save_image_atomic(picture(), target, "second")
    assert read_infotext(target) == "second"
    assert os.listdir(tmp_path) == ["a.png"]


class _FailingImage:
    """Stands in for a PIL image whose encoder dies half way through writing."""

    mode = "RGB"

    def __init__(self, exc):
        self.exc = exc

    def save(self, fp, format=None, **options):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise self.exc


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_file(tmp_path, exc):
    with pytest.raises(type(exc)):
        save_image_atomic(_FailingImage(exc), tmp_path / "a.png", "x")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "a.png"
    save_image_atomic(picture(), target, "old")
    before = target.read_bytes()
    with pytest.raises(OSError):
        save_image_atomic(_FailingImage(OSError("boom")), target, "new")
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.png"]


def test_unencodable_image_leaves_no_file(tmp_path):
    with pytest.raises((OSError, ValueError, SystemError)):
        save_image_atomic(Image.new("RGB", (0, 0)), tmp_path / "empty.png", "x")
    assert os.listdir(tmp_path) == []


def test_missing_folder_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_image_atomic(picture(), tmp_path / "nope" / "a.png", "x")
    assert os.listdir(tmp_path) == []


def test_no_infotext_reads_none(tmp_path):
    for name in ("a.png", "a.jpg", "a.webp"):
        assert read_infotext(save_image_atomic(picture(), tmp_path / name)) is None


def test_read_other_info_hides_technical_keys(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "p\nSteps: 1, Sampler: Euler, Seed: 2")
    info.add_text("Software", "some tool")
    path = tmp_path / "a.png"
    picture().save(path, pnginfo=info, dpi=(72, 72))
    assert read_infotext(path) == "p\nSteps: 1, Sampler: Euler, Seed: 2"
    assert read_other_info(path) == {"Software": "some tool"}


def test_extra_pnginfo(tmp_path):
    path = save_image_atomic(picture(), tmp_path / "a.png", "x", extra_pnginfo={"Software": "sdstack", "n": 3})
    assert read_other_info(path) == {"Software": "sdstack", "n": "3"}


def test_jpeg_other_info_has_exif_comment(tmp_path):
    path = save_image_atomic(picture(), tmp_path / "a.jpg", "hello")
    assert read_other_info(path) == {"exif comment": "hello"}


def test_corrupt_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        read_infotext(bad)


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"UNICODE\0" + "日本".encode("utf-16-be"), "日本"),
        (b"UNICODE\0" + "\ufeff日本".encode("utf-16-le"), "日本"),  # a little-endian writer with a BOM
        (b"ASCII\0\0\0hello", "hello"),
        (b"\0" * 8 + b"undefined\0\0", "undefined"),
        (b"no prefix", "no prefix"),
        ("already text", "already text"),
    ],
)
def test_decode_user_comment(raw, text):
    assert decode_user_comment(raw) == text


def test_encode_user_comment():
    assert encode_user_comment("Aé") == b"UNICODE\0\0A\0\xe9"
