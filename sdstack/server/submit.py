"""Turning a request into a job: images decoded and checked, sizes limited, LoRAs checked, seeds fixed.

Everything a job needs is validated here, before its row is written, so a bad request is a 4xx at once
and never a job that fails later.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random

from ..errors import UserError

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_PROMPT_CHARS = 100_000


def _b64_payload(text, field: str) -> bytes:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{field}: expected a base64-encoded image, got an empty value", field=field)
    t = text.strip()
    if t.startswith(("http://", "https://", "file:")):
        raise UserError(f"{field}: images are not fetched from URLs or paths; send the image as base64",
                        field=field)
    if t.startswith("data:"):
        header, sep, t = t.partition(",")
        if not sep or not header.endswith(";base64"):
            raise UserError(f"{field}: a data URI must look like data:image/png;base64,...", field=field)
    t = "".join(t.split())
    if len(t) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"{field}: image larger than {MAX_IMAGE_BYTES // 2**20} MiB", field=field)
    try:
        return base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64 (expected a base64-encoded PNG, JPEG or WEBP)",
                        field=field) from None


def open_b64_image(text, field: str, max_pixels: int):
    """A PIL image from base64 (optionally a data: URI); 422 naming `field` for anything else."""
    from PIL import Image

    raw = _b64_payload(text, field)
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > max_pixels * 4:
            raise UserError(f"{field}: image of {img.width}x{img.height} pixels is too large (limit "
                            f"{max_pixels * 4} pixels)", field=field)
        img.load()
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        raise UserError(f"{field}: not an image (expected a base64-encoded PNG, JPEG or WEBP)",
                        field=field) from None
    return img


def init_pngs(images, field: str, max_pixels: int) -> list[bytes]:
    """Decoded init images, re-encoded as RGB PNGs for the job row."""
    if not isinstance(images, list) or not images:
        raise UserError(f"{field}: img2img needs at least one image", field=field)
    out = []
    for i, text in enumerate(images):
        img = open_b64_image(text, f"{field}[{i}]", max_pixels)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def check_size(params, max_pixels: int) -> None:
    """Output size within --max-pixels (and prompts of a sane length)."""
    for field in ("prompt", "negative_prompt"):
        if len(getattr(params, field)) > MAX_PROMPT_CHARS:
            raise UserError(f"{field} is longer than {MAX_PROMPT_CHARS} characters", field=field)
    w, h = params.width, params.height
    if w and h and w * h > max_pixels:
        raise UserError(f"width x height = {w}x{h} = {w * h} pixels is over this server's limit of {max_pixels} "
                        "(--max-pixels)", field="width")
    if params.enable_hr and w and h:
        hw, hh = int(w * params.hr_scale), int(h * params.hr_scale)
        if hw * hh > max_pixels:
            raise UserError(f"hires fix to {hw}x{hh} pixels is over this server's limit of {max_pixels} "
                            "(--max-pixels)", field="hr_scale")


def check_networks(params, loras) -> None:
    """Every <lora:name> in the prompts must exist (rescanning the folder once before giving up)."""
    from ..prompts.extra_networks import LORA_KINDS, lora_weights, parse_extra_networks

    for field in ("prompt", "negative_prompt"):
        _, calls = parse_extra_networks(getattr(params, field))
        for call in calls:
            if call.kind not in LORA_KINDS:
                continue
            try:
                name, _, _ = lora_weights(call)
            except UserError as e:
                raise UserError(str(e), field=field) from None
            try:
                loras.find(name)
            except UserError:
                loras.refresh()
                try:
                    loras.find(name)
                except UserError as e:
                    raise UserError(f"{field}: {e}", field=field) from None


def fix_seeds(params):
    """Resolve -1 seeds now, so a job re-run after a crash makes the same images."""
    seed = params.seed if params.seed != -1 else random.randrange(4294967294)
    sub = params.subseed if params.subseed != -1 else random.randrange(4294967294)
    return dataclasses.replace(params, seed=seed, subseed=sub)


def validated_params(values: dict, sampler_status: int = 422):
    """make_params, with an unknown sampler answered by `sampler_status` (A1111 v1.10 uses 400)."""
    from ..params import make_params

    try:
        return make_params(**values)
    except UserError as e:
        if e.field == "sampler_name":
            raise UserError(str(e), field=e.field, status=sampler_status) from None
        raise
