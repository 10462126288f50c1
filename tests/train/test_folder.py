import warnings

import pytest
from PIL import Image

from sdstack.data.folder import ImageFolder, scan_folder, square_crop
from sdstack.errors import UserError
from sdstack.train.config import DataConfig
from sdstack.train.data import BatchPlan, TrainingImages


def _folder(tmp_path, n=3, captions=True):
    for i in range(n):
        Image.new("RGB", (40 + i, 30), (10 * i, 0, 0)).save(tmp_path / f"img{i}.png")
        if captions:
            (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    return tmp_path


def test_images_pair_with_same_name_txt_captions(tmp_path):
    ds = ImageFolder(_folder(tmp_path), resolution=16)
    assert len(ds) == 3
    image, caption = ds[1]
    assert caption == "caption 1" and image.size == (16, 16) and image.mode == "RGB"


def test_corrupt_images_are_skipped_with_a_warning_and_counted(tmp_path):
    _folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("x")
    good = tmp_path / "img0.png"
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "trunc.txt").write_text("y")
    with pytest.warns(UserWarning, match="corrupt"):
        ds = ImageFolder(tmp_path, 16)
    assert ds.summary == {"images": 3, "captioned": 3, "uncaptioned": 0, "corrupt": 2}


def test_folder_without_captions_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="caption"):
        scan_folder(_folder(tmp_path, captions=False))


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        scan_folder(tmp_path / "nope")


def test_uncaptioned_images_are_counted(tmp_path):
    _folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = ImageFolder(tmp_path, 8)
    assert ds.summary["uncaptioned"] == 1 and len(ds) == 3


def test_square_crop_keeps_the_centre():
    im = Image.new("RGB", (30, 10), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    out = square_crop(im, 10)
    assert out.size == (10, 10)
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_batch_plan_covers_each_item_once_per_epoch():
    plan = BatchPlan(size=10, batch_size=2, grad_accum=1, world=1, rank=0, seed=3)
    first = [i for s in range(5) for i in plan.indices(s, 0)]
    assert sorted(first) == list(range(10))
    second = [i for s in range(5, 10) for i in plan.indices(s, 0)]
    assert sorted(second) == list(range(10)) and second != first
    assert plan.epoch(4) == 0 and plan.epoch(5) == 1


def test_batch_plan_splits_items_between_processes():
    a = BatchPlan(None, 2, 2, world=2, rank=0, seed=0)
    b = BatchPlan(None, 2, 2, world=2, rank=1, seed=0)
    seen = [i for s in range(3) for m in range(2) for p in (a, b) for i in p.indices(s, m)]
    assert sorted(seen) == list(range(24))


def test_training_images_are_minus_one_to_one_tensors(tmp_path):
    ds = TrainingImages(DataConfig(source="folder", path=str(_folder(tmp_path)), resolution=16))
    x, caption = ds[0]
    assert x.shape == (3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert ds.size == 3
