"""File hashes as A1111 shows them: full sha256, the 10-hex short hash, the addnet hash of safetensors bodies.

Hashes are cached in a JSON file keyed by absolute path, size and mtime, so each file is read once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from ..fsio import atomic_write

_BLOCK = 1 << 20
_lock = threading.Lock()


def sha256_file(path: str | Path, *, skip: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash(path: str | Path) -> str:
    """sha256 of a .safetensors file's bytes after its header (kohya/A1111 'addnet' hash for LoRAs)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return sha256_file(path, skip=8 + n)


def old_model_hash(path: str | Path) -> str:
    """A1111's legacy 8-hex hash: sha256 of the 64 KiB at offset 0x100000."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class HashCache:
    """sha256 per file, cached in `cache_file` (JSON) by path, size and mtime."""

    def __init__(self, cache_file: str | Path | None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._data: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._data is None:
            self._data = {}
            if self.cache_file and self.cache_file.is_file():
                try:
                    self._data = json.loads(self.cache_file.read_text())
                except (json.JSONDecodeError, OSError):
                    self._data = {}
        return self._data

    def sha256(self, path: str | Path, kind: str = "sha256") -> str:
        p = Path(path).resolve()
        st = p.stat()
        key = f"{kind}:{p}"
        with _lock:
            hit = self._load().get(key)
            if hit and hit["size"] == st.st_size and hit["mtime"] == st.st_mtime:
                return hit["hash"]
        value = addnet_hash(p) if kind == "addnet" else sha256_file(p)
        with _lock:
            self._load()[key] = {"hash": value, "size": st.st_size, "mtime": st.st_mtime}
            self._save()
        return value

    def peek(self, path: str | Path, kind: str = "sha256") -> str | None:
        """The cached hash if it is still valid (same size and mtime); never reads the file."""
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError:
            return None
        with _lock:
            hit = self._load().get(f"{kind}:{p}")
        return hit["hash"] if hit and hit["size"] == st.st_size and hit["mtime"] == st.st_mtime else None

    def _save(self) -> None:
        if not self.cache_file:
            return
        atomic_write(self.cache_file, json.dumps(self._data, indent=0), durable=False)


def tree_sha256(folder: str | Path) -> str:
    """A stable hash of a diffusers folder: sha256 over (relative path, file sha256) of its weight/config files."""
    root = Path(folder)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
            h.update(str(f.relative_to(root)).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()
