"""Images with their infotext: atomic saving and reading, in the places A1111 uses (`modules/images.py`).

- PNG: a text chunk ``parameters`` (Pillow writes tEXt, or iTXt when the text is not latin-1).
- JPEG / WEBP: EXIF ``UserComment`` (tag 0x9286, type UNDEFINED) holding ``b"UNICODE\\0"`` + UTF-16-BE text,
  as piexif's ``UserComment.dump(..., encoding="unicode")`` writes it for A1111; Pillow embeds the block and
  reads it back (``Image.getexif``), no piexif needed.
- GIF: the ``comment`` extension.

Files are written to a temporary name in the target folder, flushed to disk, then renamed over the target, so a
reader never sees a half-written image and a failed save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdstack.errors import UserError
from ..fsio import atomic_path

__all__ = ["save_image_atomic", "read_infotext", "read_other_info", "encode_user_comment", "decode_user_comment"]

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
PNG_KEY = "parameters"
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_JIS_PREFIX = b"JIS\0\0\0\0\0"
_UNDEFINED_PREFIX = b"\0" * 8
_LONG, _UNDEFINED = 4, 7  # TIFF field types

IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})  # fmt: skip
"""``Image.info`` keys that PNG Info leaves out (A1111's ``IGNORED_INFO_KEYS``)."""


# ---------------------------------------------------------------------------------------------- EXIF comment


def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment bytes for ``text``: the 8-byte ``UNICODE`` prefix, then UTF-16 big-endian."""
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def decode_user_comment(data: bytes | str) -> str:
    """Text of an EXIF UserComment; reads the UNICODE (UTF-16, BE unless a BOM says LE), ASCII and JIS forms."""
    if isinstance(data, str):
        return data
    prefix, body = data[:8], data[8:]
    if len(data) >= 8 and prefix == _UNICODE_PREFIX:
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        if body[:2] == b"\xfe\xff":
            body = body[2:]
        return body.decode("utf-16-be", errors="replace")
    if len(data) >= 8 and prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    if len(data) >= 8 and prefix == _JIS_PREFIX:
        return body.decode("shift_jis", errors="replace")
    if len(data) >= 8 and prefix == _UNDEFINED_PREFIX:
        return body.decode("utf-8", errors="ignore").rstrip("\0")
    return data.decode("utf-8", errors="ignore")  # no known prefix: A1111 reads the bytes as UTF-8


def _exif_bytes(infotext: str) -> bytes:
    """A big-endian EXIF block holding only IFD0 -> Exif IFD -> UserComment, as piexif.dump lays it out.

    Packed by hand because Pillow's ``Image.Exif`` writes an unknown tag given ``bytes`` as type BYTE, and
    piexif (A1111's reader) returns a BYTE UserComment as a tuple of ints that A1111 then fails to decode;
    UserComment must be type UNDEFINED (7).
    """
    comment = encode_user_comment(infotext)  # always > 4 bytes, so stored after the IFD, at an offset
    exif_ifd_at = 8 + 2 + 12 + 4  # after the TIFF header and IFD0 (entry count, one entry, next-IFD offset)
    comment_at = exif_ifd_at + 2 + 12 + 4
    return b"".join([
        b"Exif\0\0MM\0\x2a", struct.pack(">I", 8),
        struct.pack(">HHHIII", 1, EXIF_IFD, _LONG, 1, exif_ifd_at, 0),
        struct.pack(">HHHIII", 1, USER_COMMENT, _UNDEFINED, len(comment), comment_at, 0),
        comment,
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------- saving


def _format_for(path: Path, fmt: str | None) -> str:
    if fmt:
        name = fmt.upper()
        name = {"JPG": "JPEG"}.get(name, name)
        if name not in Image.SAVE:
            Image.init()
        if name not in Image.SAVE:
            raise UserError(f"unknown image format {fmt!r}; valid: PNG, JPEG, WEBP, GIF", field="format")
        return name
    ext = path.suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats or formats[ext] not in Image.SAVE:
        raise UserError(f"cannot tell the image format of {str(path)!r} from {ext or 'no extension'!r}; "
                        "use .png, .jpg, .jpeg, .webp or .gif", field="format")  # fmt: skip
    return formats[ext]


def _prepare(image: Image.Image, fmt: str) -> Image.Image:
    """Convert modes the encoder cannot store (A1111 converts RGBA to RGB and 16-bit grey to 8-bit)."""
    if fmt == "JPEG":
        if image.mode == "I;16":
            return image.point(lambda p: p * 0.0038910505836576).convert("L")
        return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")
    if fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        if image.mode == "I;16":
            return image.point(lambda p: p * 0.0038910505836576).convert("RGB")
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    return image


def _save_options(fmt: str, infotext: str | None, quality: int, lossless: bool,
                  extra_pnginfo: Mapping[str, object] | None) -> dict:  # fmt: skip
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if infotext is not None:
            info.add_text(PNG_KEY, infotext)
        for key, value in (extra_pnginfo or {}).items():
            if key != PNG_KEY and value is not None:
                info.add_text(key, str(value))
        return {"pnginfo": info}
    if fmt in ("JPEG", "WEBP"):
        options: dict = {"quality": quality}
        if fmt == "WEBP":
            options["lossless"] = lossless
        if infotext is not None:
            options["exif"] = _exif_bytes(infotext)
        return options
    if fmt == "GIF" and infotext is not None:
        return {"comment": infotext.encode("utf-8")}
    return {}


def save_image_atomic(
    image: Image.Image,
    path: str | os.PathLike,
    infotext: str | None = None,
    fmt: str | None = None,
    *,
    quality: int = 80,
    lossless: bool = False,
    extra_pnginfo: Mapping[str, object] | None = None,
) -> Path:
    """Write ``image`` to ``path`` with ``infotext`` embedded; atomic: the file appears complete or not at all.

    ``fmt`` defaults to the one the extension names. ``quality`` (A1111's default 80) applies to JPEG and WEBP,
    ``lossless`` to WEBP; ``extra_pnginfo`` adds more PNG text chunks. Returns the path written.
    """
    path = Path(path)
    fmt = _format_for(path, fmt)
    options = _save_options(fmt, infotext, quality, lossless, extra_pnginfo)
    prepared = _prepare(image, fmt)
    folder = path.parent if str(path.parent) else Path(".")
    with atomic_path(folder / path.name, make_parents=False) as tmp, open(tmp, "wb") as f:
        prepared.save(f, format=fmt, **options)
    return path


# ---------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _opened(image_or_path: Image.Image | str | os.PathLike):
    if isinstance(image_or_path, Image.Image):
        yield image_or_path
        return
    try:
        image = Image.open(image_or_path)
    except (OSError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {str(image_or_path)!r}: {e}", field="image") from None
    with image:
        yield image


def _exif_comment(image: Image.Image) -> str | None:
    if "exif" not in image.info:
        return None
    try:
        raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # a corrupt EXIF block must not stop PNG Info
        return None
    return decode_user_comment(raw) if raw else None


def _text_info(image: Image.Image) -> dict:
    info = dict(image.info or {})
    if image.format == "PNG" and PNG_KEY not in info:
        with contextlib.suppress(Exception):  # text chunks after the image data are read on load
            info.update(getattr(image, "text", {}) or {})
    return info


def _as_text(value: object) -> str:
    return value.decode("utf-8", errors="ignore") if isinstance(value, bytes) else str(value)


def _read(image: Image.Image) -> tuple[str | None, dict]:
    items = _text_info(image)
    geninfo = items.pop(PNG_KEY, None)
    comment = _exif_comment(image)
    if comment:
        items["exif comment"] = comment
        geninfo = comment
    elif "exif" not in items and "comment" in items and image.format == "GIF":
        geninfo = _as_text(items["comment"])
    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)
    return (None if geninfo is None else _as_text(geninfo)), items


def read_infotext(image_or_path: Image.Image | str | os.PathLike) -> str | None:
    """The infotext stored in an image (PNG ``parameters``, JPEG/WEBP EXIF UserComment, GIF comment), or None."""
    with _opened(image_or_path) as image:
        return _read(image)[0]


def read_other_info(image_or_path: Image.Image | str | os.PathLike) -> dict[str, str]:
    """Every other info item of an image as text (for PNG Info), without the technical keys A1111 hides."""
    with _opened(image_or_path) as image:
        items = _read(image)[1]
    return {str(key): _as_text(value) for key, value in items.items()}
