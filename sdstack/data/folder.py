"""A folder of images with same-name caption files (`cat.png` + `cat.txt`), the layout kohya-ss and OneTrainer
users already have. Kept simple: square centre crops at one resolution (aspect buckets and caches come later).

    ds = ImageFolder("data/cats", resolution=64)
    image, caption = ds[0]          # PIL RGB image (resolution x resolution), caption text
    ds.summary                      # {'images': ..., 'captioned': ..., 'uncaptioned': ..., 'corrupt': ...}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class FolderItem:
    image: Path
    caption: str


@dataclass
class FolderScan:
    items: list[FolderItem] = field(default_factory=list)
    uncaptioned: list[Path] = field(default_factory=list)
    corrupt: list[Path] = field(default_factory=list)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixels; a truncated file fails here
            im.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def scan_folder(root: str | Path, caption_ext: str = ".txt") -> FolderScan:
    """Every image under `root` (recursively, sorted) with its caption; corrupt images are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}", field="data.path")
    scan = FolderScan()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        if not _readable(path):
            warnings.warn(f"skipping corrupt image {path}", stacklevel=2)
            scan.corrupt.append(path)
            continue
        cap = path.with_suffix(caption_ext)
        if not cap.is_file():
            scan.uncaptioned.append(path)
            continue
        scan.items.append(FolderItem(path, cap.read_text(encoding="utf-8", errors="replace").strip()))
    if not scan.items:
        found = len(scan.uncaptioned) + len(scan.corrupt)
        what = (f"none of its {found} images has a {caption_ext} caption" if scan.uncaptioned
                else f"it holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
        raise UserError(f"data folder {root}: {what}", field="data.path")
    if scan.uncaptioned:
        warnings.warn(f"{len(scan.uncaptioned)} images in {root} have no {caption_ext} caption; they are skipped",
                      stacklevel=2)
    return scan


def square_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (Lanczos), then crop the centre square."""
    image = image.convert("RGB")
    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    x0, y0 = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((x0, y0, x0 + resolution, y0 + resolution))


class ImageFolder:
    """Indexable (image, caption) pairs from a folder; see the module docstring."""

    def __init__(self, root: str | Path, resolution: int = 64, caption_ext: str = ".txt"):
        self.root, self.resolution = Path(root), resolution
        self.scan = scan_folder(root, caption_ext)

    @property
    def summary(self) -> dict[str, int]:
        s = self.scan
        return {"images": len(s.items), "captioned": len(s.items), "uncaptioned": len(s.uncaptioned),
                "corrupt": len(s.corrupt)}

    def __len__(self) -> int:
        return len(self.scan.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        item = self.scan.items[index]
        with Image.open(item.image) as im:
            return square_crop(im, self.resolution), item.caption
