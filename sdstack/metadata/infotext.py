"""Infotext: the ``parameters`` text A1111 writes into every image, and its parser (A1111 v1.10.1 format).

Layout (``create_infotext`` in A1111 `modules/processing.py`)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>     (omitted when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

A value containing ``,``, ``:`` or a newline is written as a JSON string (:func:`quote`). The parser
(:func:`parse_infotext`, A1111's ``parse_generation_parameters``) returns raw strings, as A1111's PNG Info does,
plus the defaults A1111 inserts for keys an older infotext lacks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from sdstack.prompts.parser import parse_prompt_attention

__all__ = [
    "KEY_ORDER",
    "quote",
    "unquote",
    "order_params",
    "build_infotext",
    "parse_infotext",
    "parse_version",
]

CORE_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)  # fmt: skip
"""The fixed keys of ``create_infotext``, in its order."""

EXTRA_KEYS = (
    "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires checkpoint", "Hires sampler",
    "Hires schedule type", "Hires prompt", "Hires negative prompt", "Hires CFG Scale", "Lora hashes", "TI hashes",
    "Emphasis", "Mask blur", "Refiner", "Refiner switch at",
)  # fmt: skip
"""Well-known ``extra_generation_params`` keys, in the order A1111's hires fix, LoRA and TI code add them."""

TAIL_KEYS = ("Version", "User")
KEY_ORDER = CORE_KEYS + EXTRA_KEYS + TAIL_KEYS
"""Canonical key order: core keys, known extras, (unknown keys in insertion order), then Version and User."""

_RANK = {key: i for i, key in enumerate(KEY_ORDER)}
_UNKNOWN_RANK = len(CORE_KEYS) + len(EXTRA_KEYS) - 0.5  # after the known extras, before Version

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
"""One ``Key: value`` pair of the parameter line (A1111's ``re_param``)."""
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"


def quote(value):
    """A1111's ``quote``: ``json.dumps`` the value when its ``str()`` holds ``,``, ``\\n`` or ``:``; else unchanged."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's ``unquote``: JSON-decode a ``"..."`` value; anything else (or invalid JSON) is returned as is."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def order_params(params: Mapping[str, object]) -> dict[str, object]:
    """``params`` sorted by :data:`KEY_ORDER`; unknown keys keep their insertion order, after the known extras
    and before ``Version`` / ``User``."""
    keys = sorted(enumerate(params), key=lambda item: (_RANK.get(item[1], _UNKNOWN_RANK), item[0]))
    return {key: params[key] for _, key in keys}


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object], *, ordered: bool = True) -> str:
    """The infotext for one image; ``None`` values are skipped and a value equal to its key is written bare.

    With ``ordered`` (the default) the keys are put in :data:`KEY_ORDER` first; numbers are written with ``str()``.
    """
    items = order_params(params) if ordered else dict(params)
    pairs = (key if key == value else f"{key}: {quote(value)}" for key, value in items.items() if value is not None)
    line = ", ".join(pairs)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


# ---------------------------------------------------------------------------------------------- parsing


def _split_text(text: str) -> tuple[str, str, str]:
    """``(prompt, negative prompt, parameter line)``; the last line is parameters only with 3+ ``Key: value``."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), last


def _parse_param_line(line: str) -> dict[str, object]:
    res: dict[str, object] = {}
    for key, value in RE_PARAM.findall(line):
        if not value:  # A1111 fails on an empty value and drops the key
            continue
        value = unquote(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"] = m.group(1)
            res[f"{key}-2"] = m.group(2)
        else:
            res[key] = value
    return res


def parse_infotext(text: str, *, defaults: bool = True, backcompat: bool = True) -> dict[str, object]:
    """A1111's ``parse_generation_parameters``: ``Prompt``, ``Negative prompt`` and every ``Key: value``.

    Values are strings as written (``WxH`` values become ``Key-1`` / ``Key-2``). With ``defaults`` the keys A1111
    assumes for older infotexts are added (``Clip skip: "1"``, ``RNG: "GPU"``, ...); with ``backcompat`` the
    compatibility flags that the ``Version`` key implies are set as A1111 does. Styles are not extracted.
    """
    prompt, negative, line = _split_text(text)
    res = _parse_param_line(line)
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    if defaults:
        _add_defaults(res)
    if backcompat:
        _backcompat(res)
    return res


_DEFAULTS_HIRES = {
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
}
_DEFAULTS_MODEL = {
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def _add_defaults(res: dict[str, object]) -> None:
    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] = f"{res['Prompt']}<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, value in _DEFAULTS_HIRES.items():
        res.setdefault(key, value)
    _restore_old_hires_fix(res)
    res.setdefault("RNG", "GPU")
    for key, value in _DEFAULTS_MODEL.items():
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and _uses_emphasis(str(res["Prompt"]), str(res["Negative prompt"])):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)


def _uses_emphasis(prompt: str, negative: str) -> bool:
    runs = parse_prompt_attention(prompt) + parse_prompt_attention(negative)
    return any(weight != 1.0 and text != "BREAK" for text, weight in runs)


def old_hires_fix_first_pass_dimensions(width: int, height: int) -> tuple[int, int]:
    """Pre-1.0 hires fix: a first pass of about 512x512 pixels, each side rounded up to a multiple of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix(res: dict[str, object]) -> None:
    """An old ``First pass size`` infotext becomes ``Size`` (first pass) plus ``Hires resize`` (final size)."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    first_w, first_h = int(first_w), int(first_h)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if first_w == 0 or first_h == 0:
        first_w, first_h = old_hires_fix_first_pass_dimensions(width, height)
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


# ---------------------------------------------------------------------------------------------- versions

_RE_VERSION = re.compile(
    r"v?(\d+(?:\.\d+)*)(?:[-_.]?(dev|a|alpha|b|beta|rc|c|pre|preview)[-_.]?(\d*))?(?:-(\d+))?", re.I
)
_PHASE = {"dev": -4, "a": -3, "alpha": -3, "b": -2, "beta": -2, "rc": -1, "c": -1, "pre": -1, "preview": -1}


def parse_version(text: str | None) -> tuple | None:
    """A comparable key for an infotext ``Version`` such as ``v1.10.1`` or ``v1.7.0-225-g1a2b3c4``; None if odd.

    As A1111: only the first two ``-`` parts count; ``-N`` is a post-release (``v1.7.0-225`` > ``v1.7.0``) and
    ``-RC`` a pre-release.
    """
    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    m = _RE_VERSION.fullmatch(text.strip())
    if m is None:
        return None
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = (_PHASE[m.group(2).lower()], int(m.group(3) or 0)) if m.group(2) else (0, 0)
    post = int(m.group(4)) if m.group(4) is not None else -1
    return tuple(release), pre, post


_V160 = parse_version("1.6.0")
_V170_TSNR = parse_version("v1.7.0-225")
_V180 = parse_version("1.8.0")


def _backcompat(res: dict[str, object]) -> None:
    """The flags A1111 (``infotext_versions.backcompat``) sets for infotexts written by older versions."""
    version = parse_version(res.get("Version"))  # type: ignore[arg-type]
    if version is None:
        return
    if version < _V160 and "[" in str(res.get("Prompt", "")):
        res["Old prompt editing timelines"] = True
    if version < _V160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if version < _V170_TSNR:
        res["Downcast alphas_cumprod"] = True
    if version < _V180 and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True
