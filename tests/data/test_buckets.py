"""Aspect buckets: kohya's bucket list, nearest-aspect choice, resize-then-crop and the recorded crop info.
Expected values are computed by hand from kohya's documented algorithm (see sdstack.data.buckets)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from sdstack.data.buckets import (CropInfo, bucket_batches, crop_info, crop_offsets, make_buckets, resize_and_crop,
                                  select_bucket, select_bucket_no_upscale)
from sdstack.errors import UserError


def test_make_buckets_small_case_by_hand():
    # max_area 64*64 = 4096, step 16, sides 32..128. Square: floor(64/16)*16 = 64.
    # w=32: 4096//32=128 -> 128; w=48: 85 -> 80; w=64: 64; w=80: 51 -> 48; w=96: 42 -> 32; w=112: 36 -> 32;
    # w=128: 32. Each (w, h) and (h, w) added.
    want = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert make_buckets(64, min_size=32, max_size=128, step=16) == want


def test_make_buckets_kohya_sd1_defaults():
    b = make_buckets(512)  # kohya defaults: 256..1024, step 64
    assert len(b) == 17 and b == sorted(b)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (704, 320), (768, 320), (1024, 256)} <= set(b)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert (1024, 1024) in make_buckets(1024, 512, 2048)  # SDXL-style
    assert make_buckets((768, 512), 256, 1024)[0] == (256, 1024)  # non-square resolution: area 393216


@pytest.mark.parametrize("kwargs", [dict(step=0), dict(min_size=8, step=16), dict(min_size=512, max_size=256),
                                    dict(max_size=256)])
def test_bad_bucket_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        make_buckets(512, **{"min_size": 256, "max_size": 1024, "step": 64, **kwargs})


def test_select_bucket_nearest_aspect_and_cover():
    b = make_buckets(512)
    a = select_bucket(1000, 500, b)  # aspect 2.0: 704x320 (2.2) beats 640x384 (1.67) and 768x320 (2.4)
    assert a.bucket == (704, 320)
    assert a.resized == (704, 352)  # narrower than the bucket's aspect: match widths, 500 * 0.704 = 352
    assert a.aspect_error == pytest.approx(0.2)
    tall = select_bucket(500, 1000, b)
    assert tall.bucket == (320, 704) and tall.resized == (352, 704)
    assert select_bucket(448, 576, b).resized == (448, 576)  # exact size: kept


def test_select_bucket_tie_takes_first_and_wider_images_match_heights():
    # 64x32 (aspect 2) is equally far from 1 and 3: the first bucket in sorted order wins, like numpy argmin.
    a = select_bucket(64, 32, [(32, 32), (96, 32)])
    assert a.bucket == (32, 32) and a.resized == (64, 32)  # wider than 1:1 -> scale = 32 / 32
    assert select_bucket(5, 2, [(2, 1)]).resized == (3, 1)  # 2.5 rounds half up (kohya int(x + .5))


def test_no_upscale_buckets_by_hand():
    # 2000x1000 over 512^2: w = sqrt(262144 * 2) = 724.08 -> 704, h for it 352 -> 320 (aspect 2.2);
    # h = 362.04 -> 320, w for it 640 (aspect 2.0, exact): the height rounding wins.
    a = select_bucket_no_upscale(2000, 1000, 512 * 512, 64)
    assert (a.bucket, a.resized) == ((640, 320), (640, 320))
    small = select_bucket_no_upscale(300, 200, 512 * 512, 64)  # never enlarged: floor to the step
    assert (small.bucket, small.resized) == ((256, 192), (300, 200))
    with pytest.raises(ValueError):
        select_bucket_no_upscale(50, 50, 512 * 512, 64)


def _thirds(width=120, height=40) -> Image.Image:
    """Left third red, middle green, right blue."""
    im = Image.new("RGB", (width, height))
    third = width // 3
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        im.paste(colour, (i * third, 0, (i + 1) * third, height))
    return im


def test_resize_and_centre_crop_records_sdxl_crop_info():
    a = select_bucket(120, 40, [(64, 32)])  # aspect 3 > 2: match heights, scale 0.8 -> 96x32, crop 16 left
    assert a.resized == (96, 32)
    out, info = resize_and_crop(_thirds(), a)
    assert out.size == (64, 32)
    # resized columns 0-31 red, 32-63 green, 64-95 blue; crop 16..80 -> 16 red, 32 green, 16 blue
    assert out.getpixel((4, 16))[0] > 200 and out.getpixel((32, 16))[1] > 200 and out.getpixel((60, 16))[2] > 200
    assert info == CropInfo(original_size=(40, 120), crop_top_left=(0, 16), target_size=(32, 64),
                            resized_size=(32, 96))
    assert info.time_ids() == [40, 120, 0, 16, 32, 64]
    assert crop_info(a) == info
    assert crop_offsets((81, 55), (80, 48)) == (3, 0)  # kohya: excess // 2 on each axis (7 // 2, 1 // 2)


def test_random_crop_and_flip():
    a = select_bucket(120, 40, [(64, 32)])
    lefts = set()
    for seed in range(20):
        out, info = resize_and_crop(_thirds(), a, random_crop=True, rng=random.Random(seed))
        assert 0 <= info.crop_top_left[1] <= 32 and info.crop_top_left[0] == 0 and out.size == (64, 32)
        lefts.add(info.crop_top_left[1])
    assert len(lefts) > 3
    again = resize_and_crop(_thirds(), a, random_crop=True, rng=random.Random(7))[1]
    assert again == resize_and_crop(_thirds(), a, random_crop=True, rng=random.Random(7))[1]
    flipped, finfo = resize_and_crop(_thirds(), a, flip=True, random_crop=True, rng=random.Random(3))
    _, plain = resize_and_crop(_thirds(), a, random_crop=True, rng=random.Random(3))
    assert finfo.flipped and finfo.crop_top_left[1] == 96 - 64 - plain.crop_top_left[1]
    assert flipped.getpixel((60, 16))[0] > 200  # red (left of the source) is now on the right
    with pytest.raises(ValueError):
        resize_and_crop(_thirds(), a, random_crop=True)  # a random crop needs an rng


def test_bucket_batches_group_and_are_deterministic():
    buckets = [(64, 32)] * 5 + [(32, 64)] * 3 + [(48, 48)]
    batches = bucket_batches(buckets, 2, seed=1, epoch=0)
    assert sorted(p for b in batches for p in b) == list(range(9))
    assert all(len({buckets[p] for p in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    assert len(batches) == 3 + 2 + 1
    assert batches == bucket_batches(buckets, 2, seed=1, epoch=0)
    assert batches != bucket_batches(buckets, 2, seed=1, epoch=1)
    full = bucket_batches(buckets, 2, seed=1, drop_last=True)
    assert all(len(b) == 2 for b in full) and len(full) == 2 + 1
