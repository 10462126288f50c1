"""The data directory, in AUTOMATIC1111's layout, so `--data-dir` can point at an existing A1111 install.

    <data>/models/Stable-diffusion   checkpoints (.safetensors/.ckpt, or diffusers folders)
    <data>/models/VAE                separate VAEs
    <data>/models/Lora               LoRAs
    <data>/embeddings                textual-inversion embeddings
    <data>/outputs                   generated images (txt2img-images/DATE/NNNNN-SEED.png, img2img-images/...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, unknown_name
from .models.io import WEIGHT_SUFFIXES


def default_data_dir() -> Path:
    return Path(os.environ.get("SDSTACK_DATA_DIR") or Path.cwd())


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None) -> "DataDir":
        return cls(Path(root).expanduser().resolve() if root else default_data_dir().resolve())

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "Stable-diffusion"

    @property
    def vae(self) -> Path:
        return self.root / "models" / "VAE"

    @property
    def lora(self) -> Path:
        return self.root / "models" / "Lora"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def hash_cache(self) -> Path:
        return self.root / "cache" / "sdstack-hashes.json"


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "model_index.json").is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files (not *.vae.*) and diffusers folders under `folder`, sorted, like A1111's list."""
    if not folder.is_dir():
        return []
    folders = [p.parent for p in folder.rglob("model_index.json")]
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".safetensors", ".ckpt")
             and ".vae." not in p.name and not any(p.is_relative_to(f) for f in folders)]
    found += folders
    return sorted(set(found), key=lambda p: str(p).lower())


def list_vaes(data: DataDir) -> list[Path]:
    out = []
    if data.vae.is_dir():
        out += [p for p in data.vae.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    if data.checkpoints.is_dir():
        out += [p for p in data.checkpoints.rglob("*.vae.*") if p.suffix.lower() in WEIGHT_SUFFIXES]
    return sorted(out, key=lambda p: str(p).lower())


def checkpoint_title(path: Path, folder: Path, shorthash: str | None) -> str:
    """A1111's title: path relative to the checkpoints folder, plus ' [shorthash]' once hashed."""
    try:
        rel = path.relative_to(folder).as_posix()
    except ValueError:
        rel = path.name
    return f"{rel} [{shorthash}]" if shorthash else rel


def resolve_file(name: str | Path, candidates: list[Path], folder: Path, kind: str,
                 hashes: dict[Path, str] | None = None) -> Path:
    """A path, or a name matched like A1111: title, relative path, file name, stem, short hash."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    text = str(name).strip()
    bare = text.split(" [")[0] if text.endswith("]") else text
    for c in candidates:
        rel = c.relative_to(folder).as_posix() if c.is_relative_to(folder) else c.name
        stem = c.name if c.is_dir() else c.stem
        if bare in (rel, c.name, stem) or (hashes and hashes.get(c, "")[:10] == bare.lower()):
            return c
    if any(ch in text for ch in "/\\") or Path(text).suffix.lower() in WEIGHT_SUFFIXES:
        raise UserError(f"{kind} file not found: {text}")
    valid = [c.relative_to(folder).as_posix() if c.is_relative_to(folder) else c.name for c in candidates]
    raise unknown_name(kind, text, valid or ["(none found in " + str(folder) + ")"])
