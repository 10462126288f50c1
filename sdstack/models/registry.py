"""Finding models by name in the data folder, the built-in default, and a small loaded-model cache."""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..paths import DataDir, list_checkpoints, list_vaes, resolve_file
from .hashing import HashCache, tree_sha256

BUILTIN_NAME = "shapes-v1"


def builtin_model_path() -> Path | None:
    p = Path(str(resources.files("sdstack"))) / "builtin" / BUILTIN_NAME
    return p if (p / "model_index.json").is_file() else None


def resolve_checkpoint(data: DataDir, name: str | None, cache: HashCache | None = None) -> Path:
    """A path, a name/title/short hash in models/Stable-diffusion, or (no name) the built-in model."""
    if name in (None, "", BUILTIN_NAME):
        builtin = builtin_model_path()
        if builtin is not None:
            return builtin
        found = list_checkpoints(data.checkpoints)
        if name is None and found:
            return found[0]
        raise UserError("no model given and the built-in model is not installed; pass --model PATH "
                        f"or put a checkpoint in {data.checkpoints}")
    found = list_checkpoints(data.checkpoints)
    hashes = None
    text = str(name)
    if cache is not None and len(text) == 10 and all(c in "0123456789abcdef" for c in text.lower()):
        hashes = {p: cache.sha256(p) if p.is_file() else tree_sha256(p) for p in found}
    return resolve_file(name, found, data.checkpoints, "model", hashes)


def resolve_from_infotext(data: DataDir, facts: dict, cache: HashCache | None = None) -> Path:
    """The model an image was made with: by 'Model hash', then 'Model' name; else the default model."""
    for hint in (facts.get("Model hash"), facts.get("Model")):
        if hint:
            try:
                return resolve_checkpoint(data, hint, cache)
            except UserError:
                continue
    return resolve_checkpoint(data, None, cache)


def resolve_vae(data: DataDir, name: str | None) -> Path | None:
    if name in (None, "", "None", "Automatic"):
        return None
    return resolve_file(name, list_vaes(data), data.vae, "VAE")


class ModelCache:
    """Keeps up to `size` loaded models, least recently used evicted first."""

    def __init__(self, size: int = 1):
        self.size = size
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, load):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.size:
            self._items.popitem(last=False)
        value = load()
        self._items[key] = value
        return value
