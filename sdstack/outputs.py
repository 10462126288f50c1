"""Where generated images go, named like A1111: outputs/txt2img-images/YYYY-MM-DD/NNNNN-SEED.png."""

from __future__ import annotations

import datetime as _dt
import re
import threading
from pathlib import Path

from .metadata.images import save_image_atomic

_lock = threading.Lock()
_NUM = re.compile(r"^(\d{5,})-")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def output_folder(outputs: Path, img2img: bool, when: _dt.date | None = None) -> Path:
    sub = "img2img-images" if img2img else "txt2img-images"
    return outputs / sub / (when or _dt.date.today()).isoformat()


def next_number(folder: Path) -> int:
    """One more than the largest NNNNN- prefix in the folder (A1111's get_next_sequence_number)."""
    if not folder.is_dir():
        return 0
    nums = [int(m.group(1)) for f in folder.iterdir() if (m := _NUM.match(f.name))]
    return max(nums) + 1 if nums else 0


def save_images(images, seeds, infotexts, *, folder: Path | None = None, out: Path | None = None) -> list[Path]:
    """Save each image with its infotext; `out` is a file (first image; -1, -2... for more) or a folder."""
    paths: list[Path] = []
    if out is not None and out.suffix.lower() in IMAGE_SUFFIXES:
        for i, (img, info) in enumerate(zip(images, infotexts)):
            path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(img, path, info)
            paths.append(path)
        return paths
    target = out if out is not None else folder
    target.mkdir(parents=True, exist_ok=True)
    with _lock:
        n = next_number(target)
        for img, seed, info in zip(images, seeds, infotexts):
            path = target / f"{n:05d}-{seed}.png"
            save_image_atomic(img, path, info)
            paths.append(path)
            n += 1
    return paths
