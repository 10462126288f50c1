"""Atomic file writes: every file sdstack writes (images, checkpoints, caches, LoRAs, embeddings, reports) is
written to a temporary file beside its destination, flushed to disk and renamed over it, so a crash or an error
leaves either the old file or the new one, never half of one. Torch-free.

    with atomic_path("out/model.safetensors") as tmp:
        save_file(tensors, tmp)
    atomic_write("run/latest", "step-00000100\\n")
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_temp(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named file beside `path` (mode 0666 less the umask): (open fd, its path)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write; on success it is fsynced (with `durable`)
    and renamed over `path`, on any error removed. Parent folders are created (with `make_parents`)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path)
    os.close(fd)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str, *, durable: bool = True) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return Path(path)
