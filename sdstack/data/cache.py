"""On-disk cache of VAE latents and text-encoder outputs, reused across runs.

Each entry is one `.safetensors` file under the cache folder, named by a key: the sha256 of a canonical JSON
of everything the value depends on -- for latents the image file's content hash, the bucket/resize/crop
geometry and the VAE's identity; for text the caption and the encoder's identity (plus any settings the
caller adds, e.g. clip skip). Change the image, the crop or the model and the key changes, so a stale entry
is never read (it stays on disk until `prune`). Writes go to a temporary file that is renamed into place, so
an interrupted run leaves no half-written entry; an unreadable entry counts as a miss and is rewritten.

    cache = FeatureCache("runs/cache")
    keys = cache_latents(index, cache, encode=lambda px: vae.encode(px).latent_dist.mean, vae_id=vae_fingerprint)
    latents = cache.load(keys[i])["latents"]

kohya caches to `.npz` next to the images; OneTrainer to its own folder. Ours lives in one folder (any number
of datasets and models can share it) and is keyed by content, not file names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from PIL import Image

from ..models.hashing import HashCache
from ..fsio import atomic_write

CACHE_VERSION = 1  # bump when the meaning of a cached value changes (resize filter, latent layout, ...)
_META_KEY = "sdstack_cache"


def cache_key(**parts) -> str:
    """sha256 hex of the canonical JSON of `parts` (sorted keys, no whitespace) and CACHE_VERSION."""
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of a module's state dict: the identity of a VAE or text
    encoder when no file hash is known (a fine-tuned text encoder gets a new one after each update)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """Key -> dict of tensors, one safetensors file per key under `root` (`root/ab/abcdef....safetensors`).

    File content hashes are remembered in `root/file_hashes.json` (by path, size and mtime)."""

    def __init__(self, root: str | Path, hash_cache: HashCache | None = None):
        self.root = Path(root)
        self.hashes = hash_cache or HashCache(self.root / "file_hashes.json")
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------------------------------ keys

    def file_sha256(self, path: str | Path) -> str:
        return self.hashes.sha256(path)

    def latent_key(self, image_path: str | Path, geometry: Mapping, vae_id: str, **settings) -> str:
        """Key of one image's latents: content hash + geometry (CropInfo.as_dict()) + VAE identity + settings."""
        return cache_key(kind="latents", content=self.file_sha256(image_path), geometry=dict(geometry),
                         vae=vae_id, settings=settings)

    def text_key(self, text: str, encoder_id: str, **settings) -> str:
        """Key of one caption's encoder outputs: the text itself + encoder identity + settings."""
        return cache_key(kind="text", text=text, encoder=encoder_id, settings=settings)

    # ------------------------------------------------------------------------------------------ entries

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether a readable entry for `key` exists (reads only the file header)."""
        from safetensors import SafetensorError, safe_open

        p = self.path(key)
        if not p.is_file():
            return False
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return (f.metadata() or {}).get(_META_KEY) == key
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return False

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under `key`, or None (absent, unreadable, or stored under another key)."""
        from safetensors import SafetensorError, safe_open

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get(_META_KEY) != key:
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None

    def save(self, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Store `tensors` under `key` atomically (temporary file in the same folder, then rename)."""
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={_META_KEY: key})
        return atomic_write(self.path(key), data)

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The cached tensors for `key`, computing and storing them on a miss (counted in hits/misses)."""
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        value = {k: v.detach().to("cpu") for k, v in compute().items()}
        self.save(key, value)
        return value

    def prune(self, keep: Iterable[str]) -> int:
        """Delete every entry whose key is not in `keep` (and stray temporary files); returns how many."""
        keep = set(keep)
        removed = 0
        for p in self.root.glob("??/*"):
            if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.stem not in keep):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


# ---------------------------------------------------------------------------------------------------- datasets


def latent_cache_conflicts(index, flips_cached: bool = False) -> list[str]:
    """Why the latents of a DatasetIndex cannot be cached (random crops change the pixels every epoch; so do
    flips, unless both orientations are cached); empty when they can. kohya refuses the same."""
    out = []
    for sub in index.subsets:
        name = sub.image_dir or sub.metadata_file
        if sub.random_crop:
            out.append(f"{name}: random_crop is on")
        if sub.flip_aug and not flips_cached:
            out.append(f"{name}: flip_aug is on")
    return out


def text_cache_conflicts(index) -> list[str]:
    """Why the text-encoder outputs of a DatasetIndex cannot be cached (captions that change per draw)."""
    out = []
    for sub in index.subsets:
        name = sub.image_dir or sub.metadata_file
        for option in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate"):
            if getattr(sub, option):
                out.append(f"{name}: {option} is on")
    return out


def cache_latents(index, cache: FeatureCache, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str,
                  *, batch_size: int = 4, flipped: bool = False, **settings) -> list[str]:
    """Encode every item of a DatasetIndex (centred crop; mirrored with `flipped`) through `encode` (CPU pixels
    in [-1, 1], B x 3 x H x W -> latents; move them to the device inside), skipping items already cached;
    returns the key of each item, in item order. Items are batched by bucket; `settings` (e.g. dtype) become
    part of every key."""
    from .buckets import crop_info
    from .dataset import load_image, to_tensor

    keys: list[str] = []
    todo: dict[tuple[int, int], dict[str, int]] = {}  # bucket -> {key: item index}
    for i, item in enumerate(index.items):
        geometry = crop_info(item.assignment, flipped=flipped).as_dict()
        key = cache.latent_key(item.path, geometry, vae_id, **settings)
        keys.append(key)
        if key in cache:
            cache.hits += 1
        else:
            todo.setdefault(item.bucket, {}).setdefault(key, i)
    for group in todo.values():
        pending = list(group.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            images = [load_image(index, i)[0] for _, i in chunk]
            if flipped:
                images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
            with torch.no_grad():
                latents = encode(torch.stack([to_tensor(im) for im in images]))
            for (key, _), lat in zip(chunk, latents):
                cache.misses += 1
                cache.save(key, {"latents": lat.detach().to("cpu").clone()})
    return keys


def cache_text(captions: list[str], cache: FeatureCache, encode: Callable[[list[str]], Mapping[str, torch.Tensor]],
               encoder_id: str, *, batch_size: int = 16, **settings) -> list[str]:
    """Encode each distinct caption once through `encode` (list of texts -> dict of batched tensors, e.g.
    {"hidden": B x 77 x C, "pooled": B x C}); returns the key of each caption, in order."""
    keys = [cache.text_key(c, encoder_id, **settings) for c in captions]
    todo = list(dict.fromkeys((c, k) for c, k in zip(captions, keys) if k not in cache))
    cache.hits += len(keys) - len(todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        with torch.no_grad():
            out = encode([c for c, _ in chunk])
        for j, (_, key) in enumerate(chunk):
            cache.misses += 1
            cache.save(key, {name: t[j].detach().to("cpu").clone() for name, t in out.items()})
    return keys
