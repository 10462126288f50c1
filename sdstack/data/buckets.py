"""Aspect-ratio buckets with kohya-ss sd-scripts semantics (`make_bucket_resolutions`, `BucketManager`).

Bucket list (`make_buckets`): with max_area = width * height of the training resolution, the square
(floor(sqrt(max_area) / step) * step)^2, plus, for every width w = min_size, min_size + step, ... <= max_size,
h = min(max_size, floor((max_area // w) / step) * step), giving (w, h) and (h, w) when h >= min_size.

Assignment (`select_bucket`): an image whose exact size is a bucket keeps it; otherwise the bucket with the
nearest aspect ratio (first in sorted (w, h) order on a tie). The image is scaled so it covers the bucket
(wider than the bucket: match heights; otherwise match widths; sizes rounded half up), then cropped to the
bucket: centred, or at a random offset with `random_crop`.

`bucket_no_upscale` (`select_bucket_no_upscale`): one bucket per image: an image larger than max_area shrinks
to max_area keeping its aspect (rounding whichever side gives the smaller aspect error to the step); the bucket
is that size floored to the step, so images are never enlarged.

Crop info follows SDXL's micro-conditioning: original size (h, w) before resizing, crop offset (top, left) in
resized pixels, target size (h, w) = the bucket. (kohya records a letterbox-style offset from
`get_crop_ltrb` instead; we record the crop actually applied, as SAI and diffusers' SDXL scripts do.)

Sizes are (width, height) unless a name says otherwise. Torch-free.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Sequence

from PIL import Image

from ..errors import UserError

Size = tuple[int, int]  # (width, height)


def parse_resolution(resolution: int | Sequence[int]) -> Size:
    """512 -> (512, 512); [768, 512] -> (768, 512); UserError for anything else or a side < 1."""
    try:
        w, h = (resolution, resolution) if isinstance(resolution, int) else (int(v) for v in resolution)
    except (TypeError, ValueError):
        w = h = 0
    if isinstance(w, bool) or w < 1 or h < 1:
        raise UserError(f"resolution must be a positive number or [width, height], got {resolution!r}",
                        field="resolution")
    return (w, h)


def check_bucket_settings(resolution: int | Sequence[int], min_size: int, max_size: int, step: int) -> Size:
    """The resolution as (w, h); UserError for settings kohya would reject or that give no bucket."""
    w, h = parse_resolution(resolution)
    if step < 1:
        raise UserError(f"bucket_reso_steps must be >= 1, got {step}", field="bucket_reso_steps")
    if w < step or h < step:
        raise UserError(f"resolution {w}x{h} is smaller than one bucket step ({step})", field="resolution")
    if min_size < step or max_size < min_size:
        raise UserError(f"bucket sizes need bucket_reso_steps ({step}) <= min_bucket_reso ({min_size}) <= "
                        f"max_bucket_reso ({max_size})", field="min_bucket_reso")
    if max(w, h) > max_size:
        raise UserError(f"max_bucket_reso ({max_size}) must be at least the resolution {w}x{h}",
                        field="max_bucket_reso")
    return (w, h)


def make_buckets(resolution: int | Sequence[int] = 512, min_size: int = 256, max_size: int = 1024,
                 step: int = 64) -> list[Size]:
    """kohya's bucket resolutions for a max area of resolution w*h: sorted list of (width, height)."""
    w, h = check_bucket_settings(resolution, min_size, max_size, step)
    max_area = w * h
    side = int(math.sqrt(max_area) // step) * step
    buckets = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: the bucket (w, h) and the size (w, h) it is resized to before cropping."""

    bucket: Size
    resized: Size
    original: Size

    @property
    def aspect_error(self) -> float:
        """bucket aspect - image aspect (kohya's `ar_error`)."""
        return self.bucket[0] / self.bucket[1] - self.original[0] / self.original[1]


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def select_bucket(width: int, height: int, buckets: Sequence[Size]) -> BucketAssignment:
    """kohya's predefined-bucket choice: exact size first, else nearest aspect; scale to cover the bucket."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    aspect = width / height
    if (width, height) in buckets:
        bucket = (width, height)
    else:
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))  # min keeps the first on a tie
    if aspect > bucket[0] / bucket[1]:  # image wider than the bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (_round_half_up(width * scale), _round_half_up(height * scale))
    return BucketAssignment(bucket=bucket, resized=resized, original=(width, height))


def select_bucket_no_upscale(width: int, height: int, max_area: int, step: int = 64) -> BucketAssignment:
    """kohya's `bucket_no_upscale`: shrink to max_area if larger, bucket = size floored to `step`.

    ValueError for an image smaller than one step on a side (it has no bucket)."""
    aspect = width / height
    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw

        def to_step(x: float) -> int:
            x = _round_half_up(x)
            return x - x % step

        bw = to_step(rw)
        bh_for_w = to_step(bw / aspect)
        bh = to_step(rh)
        bw_for_h = to_step(bh * aspect)
        err_w = abs(bw / bh_for_w - aspect) if bh_for_w else math.inf
        err_h = abs(bw_for_h / bh - aspect) if bh else math.inf
        if err_w < err_h:
            resized = (bw, _round_half_up(bw / aspect))
        else:
            resized = (_round_half_up(bh * aspect), bh)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] < step or bucket[1] < step:
        raise ValueError(f"image {width}x{height} is smaller than one bucket step ({step})")
    return BucketAssignment(bucket=bucket, resized=resized, original=(width, height))


@dataclass(frozen=True)
class CropInfo:
    """What SDXL conditions on (all (h, w) / (top, left), diffusers' `add_time_ids` order) and whether the
    crop was mirrored (a horizontal flip: `crop_top_left` is then measured from the flipped image's left)."""

    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) offset of the crop inside the resized image
    target_size: tuple[int, int]  # (height, width) of the crop = the bucket
    resized_size: tuple[int, int]  # (height, width) after resizing, before cropping
    flipped: bool = False

    def time_ids(self) -> list[int]:
        """SDXL's six micro-conditioning numbers: original (h, w), crop (top, left), target (h, w)."""
        return [*self.original_size, *self.crop_top_left, *self.target_size]

    def as_dict(self) -> dict:
        return {"original_size": list(self.original_size), "crop_top_left": list(self.crop_top_left),
                "target_size": list(self.target_size), "resized_size": list(self.resized_size),
                "flipped": self.flipped}


def crop_offsets(resized: Size, bucket: Size, rng: random.Random | None = None) -> tuple[int, int]:
    """(top, left) of the bucket-sized crop in a resized image: centred ((excess) // 2), or uniform over
    0..excess per axis when `rng` is given (kohya `random_crop`)."""
    ex_w, ex_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if ex_w < 0 or ex_h < 0:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    if rng is None:
        return (ex_h // 2, ex_w // 2)
    return (rng.randint(0, ex_h), rng.randint(0, ex_w))


def resize_and_crop(image: Image.Image, assignment: BucketAssignment, *, random_crop: bool = False,
                    flip: bool = False, rng: random.Random | None = None) -> tuple[Image.Image, CropInfo]:
    """Resize (Lanczos) to `assignment.resized`, crop to the bucket, optionally mirror; RGB out.

    `rng` draws the random crop offset (needed with `random_crop`)."""
    if random_crop and rng is None:
        raise ValueError("random_crop needs an rng")
    image = image.convert("RGB")
    if image.size != assignment.original:
        raise ValueError(f"image is {image.size}, the assignment was made for {assignment.original}")
    if image.size != assignment.resized:
        image = image.resize(assignment.resized, Image.Resampling.LANCZOS)
    top, left = crop_offsets(assignment.resized, assignment.bucket, rng if random_crop else None)
    bw, bh = assignment.bucket
    image = image.crop((left, top, left + bw, top + bh))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, crop_info(assignment, (top, left), flip)


def crop_info(assignment: BucketAssignment, top_left: tuple[int, int] | None = None,
              flipped: bool = False) -> CropInfo:
    """The CropInfo of a crop at `top_left` (default: centred) of the resized image, without touching pixels.
    A flipped crop's left offset is measured in the mirrored image."""
    top, left = crop_offsets(assignment.resized, assignment.bucket) if top_left is None else top_left
    bw, bh = assignment.bucket
    if flipped:
        left = assignment.resized[0] - bw - left
    w, h = assignment.original
    return CropInfo(original_size=(h, w), crop_top_left=(top, left), target_size=(bh, bw),
                    resized_size=(assignment.resized[1], assignment.resized[0]), flipped=flipped)


def bucket_batches(buckets: Sequence[Hashable], batch_size: int, seed: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[int]]:
    """Batches of positions whose items share a bucket, deterministic in (seed, epoch) (kohya's scheme).

    Positions are grouped by bucket, shuffled within each bucket, cut into `batch_size` chunks (the last
    chunk of a bucket may be short unless `drop_last`), and the chunks are shuffled together."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = random.Random(f"{seed}:buckets:{epoch}")
    groups: dict[Hashable, list[int]] = {}
    for pos, b in enumerate(buckets):
        groups.setdefault(b, []).append(pos)
    batches = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        rng.shuffle(members)
        for i in range(0, len(members), batch_size):
            chunk = members[i:i + batch_size]
            if len(chunk) == batch_size or not drop_last:
                batches.append(chunk)
    rng.shuffle(batches)
    return batches
