"""Latent / text-encoder output cache: keys, atomic files, reuse across runs, invalidation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdstack.data.cache import (FeatureCache, cache_key, cache_latents, cache_text, latent_cache_conflicts,
                                module_fingerprint, text_cache_conflicts)
from sdstack.data.dataset import DataConfig, DatasetConfig, SubsetConfig, build_index


def test_cache_key_is_canonical_and_sensitive():
    a = cache_key(kind="latents", content="ab", geometry={"x": 1, "y": 2}, vae="v")
    assert a == cache_key(vae="v", geometry={"y": 2, "x": 1}, content="ab", kind="latents")
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != cache_key(kind="latents", content="ac", geometry={"x": 1, "y": 2}, vae="v")
    assert a != cache_key(kind="latents", content="ab", geometry={"x": 1, "y": 3}, vae="v")
    assert a != cache_key(kind="latents", content="ab", geometry={"x": 1, "y": 2}, vae="w")


def test_save_load_atomic_and_corrupt_entries(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    key = cache_key(x=1)
    t = {"latents": torch.arange(12.0).reshape(3, 4), "pooled": torch.ones(2, dtype=torch.float16)}
    p = cache.save(key, t)
    assert p.parent.name == key[:2] and p.name == f"{key}.safetensors"
    assert not [f for f in p.parent.iterdir() if f.suffix == ".tmp"]
    got = cache.load(key)
    assert torch.equal(got["latents"], t["latents"]) and got["pooled"].dtype == torch.float16
    assert key in cache and cache_key(x=2) not in cache and cache.load(cache_key(x=2)) is None
    other = cache_key(x=3)  # a file holding another key's value (renamed by hand) is not trusted
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(other).write_bytes(cache.path(key).read_bytes())
    assert cache.load(other) is None and other not in cache
    cache.path(key).write_bytes(cache.path(key).read_bytes()[:40])  # truncated by a crash of some other tool
    assert cache.load(key) is None and key not in cache
    calls = []
    value = cache.get_or_compute(key, lambda: calls.append(1) or {"latents": torch.zeros(2)})
    assert calls == [1] and torch.equal(value["latents"], torch.zeros(2)) and cache.misses == 1
    cache.get_or_compute(key, lambda: calls.append(1) or {"latents": torch.zeros(2)})
    assert calls == [1] and cache.hits == 1
    assert cache.prune([key]) >= 1 and key in cache and other not in cache


def _dataset(root, resolution=32) -> DataConfig:
    return DataConfig([DatasetConfig(subsets=[SubsetConfig(image_dir=str(root))], resolution=resolution)])


class _CountingEncoder:
    """A stand-in VAE: 8x average pooling to 3 channels; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)


def test_latents_are_reused_across_runs_and_invalidated_on_change(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]
    for i, c in enumerate(colours):
        Image.new("RGB", (48 if i % 2 else 32, 32), c).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    index = build_index(_dataset(data))
    enc = _CountingEncoder()
    keys = cache_latents(index, FeatureCache(tmp_path / "cache"), enc, vae_id="vae-A", batch_size=3)
    assert enc.images == 4 and len(set(keys)) == 4
    first = FeatureCache(tmp_path / "cache").load(keys[0])["latents"]
    assert first.shape == (3, 4, 4)  # red: R = 1, G = B = -1 in [-1, 1]
    assert torch.allclose(first[0], torch.ones(4, 4)) and torch.allclose(first[1], -torch.ones(4, 4))

    second_run = FeatureCache(tmp_path / "cache")  # a new run: same folder, fresh object
    assert cache_latents(index, second_run, enc, vae_id="vae-A") == keys
    assert enc.images == 4 and second_run.hits == 4 and second_run.misses == 0

    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "2.png")  # the image content changes
    os.utime(data / "2.png", ns=(1, 1))  # and its mtime, so the file-hash memo cannot be stale
    index = build_index(_dataset(data))
    keys3 = cache_latents(index, FeatureCache(tmp_path / "cache"), enc, vae_id="vae-A")
    assert enc.images == 5 and [a == b for a, b in zip(keys, keys3)] == [True, True, False, True]
    assert FeatureCache(tmp_path / "cache").load(keys3[2])["latents"].max() < -0.99  # black

    cache_latents(index, FeatureCache(tmp_path / "cache"), enc, vae_id="vae-B")  # another VAE: all new
    assert enc.images == 9
    cache_latents(build_index(_dataset(data, resolution=16)), FeatureCache(tmp_path / "cache"), enc,
                  vae_id="vae-A")  # another bucket/crop geometry: all new
    assert enc.images == 13
    cache_latents(index, FeatureCache(tmp_path / "cache"), enc, vae_id="vae-A", dtype="float16")  # settings
    assert enc.images == 17
    mirrored = cache_latents(index, FeatureCache(tmp_path / "cache"), enc, vae_id="vae-A", flipped=True)
    assert enc.images == 21 and not set(mirrored) & set(keys3)
    lat = FeatureCache(tmp_path / "cache").load(mirrored[1])["latents"]  # 48x32 green -> 32x32 crop
    torch.testing.assert_close(lat, FeatureCache(tmp_path / "cache").load(keys3[1])["latents"])  # uniform colour


def test_text_outputs_cached_once_per_distinct_caption(tmp_path):
    seen = []

    def encode(texts):
        seen.extend(texts)
        n = len(texts)
        return {"hidden": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 3, 2).clone(),
                "pooled": torch.full((n, 2), float(len(seen)))}

    cache = FeatureCache(tmp_path)
    keys = cache_text(["a cat", "a dog", "a cat"], cache, encode, "te-1", batch_size=1)
    assert seen == ["a cat", "a dog"] and keys[0] == keys[2] != keys[1]
    assert cache.load(keys[1])["hidden"].shape == (3, 2)
    assert cache_text(["a dog"], FeatureCache(tmp_path), encode, "te-1") == [keys[1]] and len(seen) == 2
    assert cache_text(["a dog"], FeatureCache(tmp_path), encode, "te-1", clip_skip=2) != [keys[1]]
    assert cache_text(["a dog"], FeatureCache(tmp_path), encode, "te-2") != [keys[1]] and len(seen) == 4


def test_module_fingerprint_tracks_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    a = module_fingerprint(lin)
    assert a == module_fingerprint(lin)
    with torch.no_grad():
        lin.weight[0, 0] += 1e-3
    assert module_fingerprint(lin) != a


def test_cache_conflicts_name_the_options(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    index = build_index(_dataset(tmp_path))
    assert latent_cache_conflicts(index) == [] and text_cache_conflicts(index) == []
    index.subsets[0].flip_aug = True
    assert len(latent_cache_conflicts(index)) == 1 and latent_cache_conflicts(index, flips_cached=True) == []
    index.subsets[0].random_crop = True
    index.subsets[0].shuffle_caption = True
    assert ["random_crop" in c for c in latent_cache_conflicts(index, flips_cached=True)] == [True]
    assert ["shuffle_caption" in c for c in text_cache_conflicts(index)] == [True]


@pytest.mark.parametrize("bad", [b"", b"\x00" * 8, b"garbage that is not safetensors"])
def test_garbage_entries_are_misses(tmp_path, bad):
    cache = FeatureCache(tmp_path)
    key = cache_key(k=bad.hex())
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(bad)
    assert cache.load(key) is None and key not in cache


def test_tiny_vae_latents_round_trip_through_the_cache(tmp_path):
    from sdstack.models.tiny import tiny_bundle

    vae = tiny_bundle("sd1").vae
    im = Image.new("RGB", (48, 16), (10, 200, 90))
    im.paste((250, 20, 20), (0, 0, 16, 16))  # a red left third: flips are visible
    im.save(tmp_path / "a.png")
    index = build_index(DataConfig([DatasetConfig(subsets=[SubsetConfig(image_dir=str(tmp_path))], resolution=32,
                                                  enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64,
                                                  bucket_reso_steps=16)]))
    assert index.items[0].bucket == (48, 16)  # exact size is a bucket: no resize, no crop

    def encode(px):
        return vae.encode(px).latent_dist.mean * vae.config.scaling_factor

    cache = FeatureCache(tmp_path / "cache")
    key = cache_latents(index, cache, encode, vae_id=module_fingerprint(vae))[0]
    from sdstack.data.dataset import load_sample

    with torch.no_grad():
        want = encode(load_sample(index, 0).pixels[None])[0]
    got = FeatureCache(tmp_path / "cache").load(key)["latents"]
    assert got.shape == (4, 4, 12)
    torch.testing.assert_close(got, want)
    key_m = cache_latents(index, cache, encode, vae_id=module_fingerprint(vae), flipped=True)[0]
    with torch.no_grad():
        want_m = encode(load_sample(index, 0).pixels[None].flip(-1))[0]
    got_m = FeatureCache(tmp_path / "cache").load(key_m)["latents"]
    torch.testing.assert_close(got_m, want_m)
    assert not torch.allclose(got_m, got, atol=1e-2)
