"""Fine-tuning datasets: folders + captions, kohya N_name folders, metadata.jsonl, TOML configs, errors, captions."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdstack.data.dataset import (DataConfig, DatasetConfig, SubsetConfig, build_index, collate_samples,
                                  data_config_from_dict, data_config_to_toml, folder_config, load_data_config,
                                  load_sample, parse_repeat_folder, process_caption)
from sdstack.errors import UserError

# resolution 64, sides 32..128, step 16: buckets (by hand, see test_buckets) include (80, 48), (64, 64), (48, 80)
BUCKETS = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def _image(path: Path, size=(96, 64), colour=(200, 30, 30), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def _one(root: Path, **opts) -> DataConfig:
    return DataConfig([DatasetConfig(subsets=[SubsetConfig(image_dir=str(root))], **{**BUCKETS, **opts})])


def test_folder_with_captions_logs_found_and_missing(tmp_path, caplog):
    _image(tmp_path / "a.png", caption="cat, red, sitting")
    _image(tmp_path / "b.jpg", size=(64, 64), caption="dog")
    _image(tmp_path / "c.png", size=(64, 96))
    (tmp_path / "notes.md").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="sdstack.data.dataset"):
        index = build_index(_one(tmp_path))
    assert [it.path.name for it in index.items] == ["a.png", "b.jpg", "c.png"]
    assert [it.caption for it in index.items] == ["cat, red, sitting", "dog", ""]
    assert [it.bucket for it in index.items] == [(80, 48), (64, 64), (48, 80)]
    assert index.items[0].assignment.resized == (80, 53)  # 96 * 80/96, 64 * 80/96 = 53.3
    assert "3 images, 2 with captions" in caplog.text
    assert "1 images have no caption (no .txt): c.png" in caplog.text
    assert index.num_train_images == 3 and len(index) == 3


def test_kohya_repeat_folders(tmp_path, caplog):
    _image(tmp_path / "10_sks dog" / "a.png", caption="sks dog, grass")
    _image(tmp_path / "10_sks dog" / "b.png")  # no caption: the class tokens from the folder name
    _image(tmp_path / "3_dog" / "c.png", caption="a dog")
    _image(tmp_path / "misc" / "d.png", caption="ignored")
    assert parse_repeat_folder("10_sks dog") == (10, "sks dog") and parse_repeat_folder("misc") is None
    assert parse_repeat_folder("5_a_b") == (5, "a_b") and parse_repeat_folder("x_y") is None
    with caplog.at_level(logging.INFO):
        index = build_index(folder_config(tmp_path, **BUCKETS))
    assert "ignoring folder" in caplog.text and "misc" in caplog.text
    assert {it.path.name: (it.repeats, it.caption, it.caption_source) for it in index.items} == {
        "a.png": (10, "sks dog, grass", "file"), "b.png": (10, "sks dog", "class_tokens"),
        "c.png": (3, "a dog", "file")}
    assert "using class tokens 'sks dog'" in caplog.text
    assert index.num_train_images == 23 and len(index.repeated()) == 23
    meta = index.kohya_metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                                   "3_dog": {"n_repeats": 3, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"])["10_sks dog"] == {"sks dog": 2, "grass": 1}
    assert meta["ss_num_train_images"] == "23"


def test_plain_folder_is_one_subset(tmp_path):
    _image(tmp_path / "a.png", caption="x")
    cfg = folder_config(tmp_path, caption_extension=".txt", resolution=64)
    assert len(cfg.datasets[0].subsets) == 1 and cfg.datasets[0].subsets[0].num_repeats == 1
    assert build_index(cfg).items[0].bucket == (64, 64)  # buckets off (kohya default): one square bucket
    assert build_index(folder_config(tmp_path, caption_extension="txt")).items[0].caption == "x"


def test_metadata_jsonl(tmp_path, caplog):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", caption="the sidecar loses to metadata")
    lines = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "second"},
             {"file_name": "gone.png", "text": "missing file"}]
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with caplog.at_level(logging.INFO):
        index = build_index(_one(tmp_path / "imgs"))
    assert [(it.path.name, it.caption, it.caption_source) for it in index.items] == [
        ("a.png", "first", "metadata"), ("b.png", "second", "metadata")]
    assert "1 images listed in metadata do not exist" in caplog.text and "gone.png" in caplog.text
    (tmp_path / "imgs" / "metadata.jsonl").write_text('{"file_name": "a.png"}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        build_index(_one(tmp_path / "imgs"))


def test_kohya_finetune_json(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.jpg", caption="from the sidecar")
    meta = {"a": {"caption": "a photo", "tags": "red, square"}, "b.jpg": {"tags": ""}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = data_config_from_dict({"datasets": [{"subsets": [{"image_dir": "imgs", "metadata_file": "meta.json"}]}]},
                                base_dir=tmp_path)
    index = build_index(cfg)
    assert [(it.path.name, it.caption) for it in index.items] == [("a.png", "a photo, red, square"),
                                                                 ("b.jpg", "from the sidecar")]


def test_kohya_options_without_an_implementation(tmp_path, caplog):
    raw = {"general": {"color_aug": False, "caption_dropout_every_n_epochs": 0},
           "datasets": [{"subsets": [{"image_dir": "x", "token_warmup_step": 0}]}]}
    with caplog.at_level(logging.INFO):
        assert data_config_from_dict(raw).datasets[0].subsets[0].image_dir == "x"
    assert "ignoring color_aug" in caplog.text
    raw["general"]["color_aug"] = True
    with pytest.raises(UserError, match="kohya option color_aug = True in \\[general\\] is not supported"):
        data_config_from_dict(raw)


def test_toml_config_general_values_ascend(tmp_path):
    _image(tmp_path / "one" / "a.png", caption="a")
    _image(tmp_path / "two" / "b.png", caption="b")
    _image(tmp_path / "three" / "c.png", caption="c")
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "one"
  num_repeats = 4
  class_tokens = "sks"
  [[datasets.subsets]]
  image_dir = "two"
  keep_tokens = 3
  caption_dropout_rate = 0.1

[[datasets]]
resolution = [96, 64]
  [[datasets.subsets]]
  image_dir = "three"
  is_reg = true
""")
    cfg = load_data_config(toml)
    d0, d1 = cfg.datasets
    assert (d0.batch_size, d0.resolution, d0.enable_bucket, d0.min_bucket_reso) == (2, 64, True, 32)
    assert d1.resolution == [96, 64] and d1.batch_size == 1
    s0, s1 = d0.subsets
    assert s0.image_dir == str(tmp_path / "one") and s0.num_repeats == 4 and s0.class_tokens == "sks"
    assert s0.shuffle_caption and s0.keep_tokens == 1 and s1.keep_tokens == 3 and s1.caption_dropout_rate == 0.1
    assert d1.subsets[0].is_reg and d1.subsets[0].shuffle_caption
    saved = tmp_path / "saved" / "resolved.toml"  # saved with a run; absolute paths, so it loads from anywhere
    saved.parent.mkdir()
    saved.write_text(data_config_to_toml(cfg))
    assert load_data_config(saved) == cfg
    assert "min_bucket_reso = 32" in saved.read_text() and "caption_column" not in saved.read_text()
    index = build_index(cfg)
    assert [it.dataset for it in index.items] == [0, 0, 1]
    assert index.num_train_images == 5 and index.num_reg_images == 0  # reg images balance to 0 training images
    batches = index.batches(0, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == [0, 0, 0, 0, 1] and all(len(b) <= 2 for b in batches)


def _reg_index(tmp_path, reg_repeats: int):
    for i in range(2):
        _image(tmp_path / "train" / f"t{i}.png", caption="sks dog")
    for i in range(3):
        _image(tmp_path / "reg" / f"r{i}.png", caption="dog")
    return build_index(data_config_from_dict({"datasets": [{"subsets": [
        {"image_dir": "train", "num_repeats": 10}, {"image_dir": "reg", "num_repeats": reg_repeats, "is_reg": True}]}]},
        base_dir=tmp_path))


def test_regularisation_images_balance_to_the_training_count(tmp_path):
    # kohya: 20 training draws; 3 reg images x 1 = 3, then +1 round-robin until 20: 7, 7, 6
    index = _reg_index(tmp_path, reg_repeats=1)
    assert index.epoch_repeats == [10, 10, 7, 7, 6]
    assert (index.num_train_images, index.num_reg_images) == (20, 20) and len(index.repeated()) == 40
    # reg repeats 10: the first two already reach 20 and the third is not used (kohya's loop stops)
    assert _reg_index(tmp_path / "b", reg_repeats=10).epoch_repeats == [10, 10, 10, 10, 0]


def test_batch_at_is_a_pure_function_of_seed_and_k(tmp_path):
    for i, size in enumerate([(96, 64), (96, 64), (64, 64), (64, 96), (96, 64)]):
        _image(tmp_path / f"{i}.png", size=size, caption=f"c{i}")
    cfg = _one(tmp_path, batch_size=2)
    index = build_index(cfg)
    per_epoch = index.batches(0, seed=5, epoch=0)
    assert len(per_epoch) == 2 + 1 + 1  # buckets of 3, 1 and 1 images
    assert [index.batch_at(0, 5, k) for k in range(4)] == [(0, b) for b in per_epoch]
    assert index.batch_at(0, 5, 6) == (1, index.batches(0, seed=5, epoch=1)[2])
    assert build_index(cfg).batch_at(0, 5, 9) == index.batch_at(0, 5, 9)  # a fresh index (a resumed run) agrees
    epoch, batch = index.batch_at(0, 5, 0)
    out = collate_samples([load_sample(index, i, seed=5, epoch=epoch, position=p) for p, i in enumerate(batch)])
    assert out["pixels"].shape[0] == len(batch) and out["time_ids"].shape == (len(batch), 6)


@pytest.mark.parametrize("raw, match", [
    ({"datasets": [{"subsets": [{"image_dir": "x", "num_repeat": 2}]}]}, "unknown key 'num_repeat'"),
    ({"general": {"colour": 1}, "datasets": [{"subsets": [{"image_dir": "x"}]}]}, "unknown key 'colour'"),
    ({"datasets": [{"subsets": [{"image_dir": "x", "num_repeats": "2"}]}]}, "num_repeats must be an integer"),
    ({"datasets": [{"resolution": [1, 2, 3], "subsets": [{"image_dir": "x"}]}]}, "resolution must be"),
    ({"datasets": [{"subsets": [{"image_dir": "x", "shuffle_caption": 1}]}]}, "shuffle_caption must be true"),
    ({"datasets": [{"subsets": [{}]}]}, "needs image_dir"),
    ({"datasets": []}, "no \\[\\[datasets\\]\\]"),
])
def test_config_mistakes_are_one_line_user_errors(raw, match):
    with pytest.raises(UserError, match=match) as e:
        data_config_from_dict(raw)
    assert "\n" not in str(e.value)


def test_bad_toml_and_missing_folders(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_data_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_data_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="image folder not found"):
        build_index(_one(tmp_path / "nope"))


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, caplog):
    _image(tmp_path / "good.png", caption="ok")
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    whole = tmp_path / "whole.png"
    _image(whole, size=(64, 64), caption="x")
    (tmp_path / "truncated.png").write_bytes(whole.read_bytes()[:60])
    _image(tmp_path / "tiny.png", size=(8, 8), caption="too small")
    with caplog.at_level(logging.WARNING):
        index = build_index(_one(tmp_path, bucket_no_upscale=True))
    assert sorted(it.path.name for it in index.items) == ["good.png", "whole.png"]
    report = index.reports[0]
    assert sorted(p.name for p in report.unreadable) == ["junk.png", "truncated.png"]
    assert [p.name for p in report.too_small] == ["tiny.png"]
    line = next(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert "2 images are unreadable and skipped" in line and "junk.png" in line


def test_no_images_and_required_captions_stop_early(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no usable images"):
        build_index(_one(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="no usable images"):
        build_index(_one(tmp_path / "bad"))
    for i in range(7):
        _image(tmp_path / "caps" / f"img{i}.png", caption="c" if i < 2 else None)
    with pytest.raises(UserError, match=r"5 images have no caption \(\.txt\) and require_captions is on: img2.png"):
        build_index(_one(tmp_path / "caps", require_captions=True))
    assert len(build_index(_one(tmp_path / "caps"))) == 7  # not required: used with an empty caption


def _sub(**kw) -> SubsetConfig:
    return SubsetConfig(image_dir="x", **kw)


def test_caption_shuffle_keeps_first_tokens_and_is_deterministic():
    cap = "sks, red, blue, green, yellow, black"
    sub = _sub(shuffle_caption=True, keep_tokens=1)
    outs = {process_caption(cap, sub, random.Random(s)) for s in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(cap.split(", ")[1:])
    assert process_caption(cap, sub, random.Random(4)) == process_caption(cap, sub, random.Random(4))
    assert process_caption(cap, _sub(), random.Random(0)) == cap  # no options: untouched
    two = _sub(shuffle_caption=True, keep_tokens=2)
    assert all(process_caption(cap, two, random.Random(s)).startswith("sks, red, ") for s in range(10))


def test_caption_dropout_rates():
    sub = _sub(caption_dropout_rate=0.5)
    dropped = sum(process_caption("a, b", sub, random.Random(s)) == "" for s in range(400))
    assert 150 < dropped < 250
    assert process_caption("a, b", _sub(caption_dropout_rate=1.0), random.Random(0)) == ""
    tags = _sub(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("keep, x, y", tags, random.Random(0)) == "keep"
    pre = _sub(caption_prefix="photo of sks,", caption_suffix=", 4k")
    assert process_caption("dog", pre, random.Random(0)) == "photo of sks, dog , 4k"


def test_keep_tokens_separator():
    sub = _sub(shuffle_caption=True, keep_tokens_separator="|||")
    for s in range(10):
        out = process_caption("sks, dog ||| a, b, c ||| best quality", sub, random.Random(s)).split(", ")
        assert out[:2] == ["sks", "dog"] and out[-1] == "best quality" and sorted(out[2:5]) == ["a", "b", "c"]


def test_load_sample_pixels_caption_crop(tmp_path):
    _image(tmp_path / "a.png", size=(96, 64), colour=(255, 0, 0), caption="sks, red, square, small")
    (tmp_path / "a.png").unlink()
    im = Image.new("RGB", (96, 64), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 48, 64))  # left half blue
    im.save(tmp_path / "a.png")
    cfg = _one(tmp_path)
    cfg.datasets[0].subsets[0].shuffle_caption = True
    cfg.datasets[0].subsets[0].keep_tokens = 1
    index = build_index(cfg)
    s = load_sample(index, 0, seed=3, epoch=0)
    assert tuple(s.pixels.shape) == (3, 48, 80) and s.pixels.min() >= -1 and s.pixels.max() <= 1
    assert s.pixels[2, 24, 2] > 0.9 and s.pixels[0, 24, 77] > 0.9  # blue left, red right
    assert s.crop.original_size == (64, 96) and s.crop.target_size == (48, 80)
    assert s.crop.crop_top_left == (2, 0)  # resized 80x53: (53 - 48) // 2 = 2
    assert s.caption.startswith("sks, ")
    again = load_sample(index, 0, seed=3, epoch=0)
    assert again.caption == s.caption and bool((again.pixels == s.pixels).all())
    assert len({load_sample(index, 0, seed=3, epoch=e).caption for e in range(12)}) > 1
    index.subsets[0].flip_aug = True
    flips = [load_sample(index, 0, seed=1, epoch=e) for e in range(12)]
    assert {f.crop.flipped for f in flips} == {True, False}
    f = next(f for f in flips if f.crop.flipped)
    assert f.pixels[0, 24, 2] > 0.9 and f.pixels[2, 24, 77] > 0.9  # mirrored


def test_index_module_does_not_import_torch():
    code = ("import sys; import sdstack.data.dataset, sdstack.data.buckets; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
