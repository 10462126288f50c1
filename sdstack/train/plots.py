"""PNG outputs of a training run, drawn with Pillow (no plotting library): image grids and the loss curve."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from ..fsio import atomic_path


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically (temp file, then rename)."""
    with atomic_path(path, durable=False) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def image_grid(images: list[Image.Image], columns: int, cell: int = 128, labels: list[str] | None = None,
               label_height: int = 12) -> Image.Image:
    """Images in rows of `columns`, each scaled to `cell` (nearest), with an optional label under each row."""
    rows = max(1, math.ceil(len(images) / columns))
    lh = label_height if labels else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + lh)), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * (cell + lh)))
    for r, text in enumerate(labels or []):
        draw.text((2, r * (cell + lh) + cell), text[: columns * cell // 6], fill=(0, 0, 0), font=font)
    return grid


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(history: list[tuple[int, float]], size: tuple[int, int] = (640, 360), log_y: bool = True,
               title: str = "training loss", x_label: str = "step") -> Image.Image:
    """Loss against step (grey: raw, blue: moving average), y axis logarithmic by default; `x_label` names the
    x unit (e.g. "k images" for runs of different batch sizes on one axis)."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.text((8, 4), title, fill=(0, 0, 0), font=font)
    pts = [(s, v) for s, v in history if v == v and (v > 0 or not log_y)]
    if len(pts) < 2:
        return img
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    steps, vals = [p[0] for p in pts], [f(p[1]) for p in pts]
    x0, x1, y0, y1 = min(steps), max(steps), min(vals), max(vals)
    y1 = y1 if y1 > y0 else y0 + 1e-6
    left, right, top, bottom = 56, w - 10, 20, h - 24

    def xy(s, v):
        return (left + (s - x0) / max(1, x1 - x0) * (right - left), bottom - (v - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for frac in (0.0, 0.5, 1.0):
        v = y0 + frac * (y1 - y0)
        y = bottom - frac * (bottom - top)
        draw.text((2, y - 6), f"{10 ** v if log_y else v:.3g}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 6), f"{x_label} {x0}", fill=(0, 0, 0), font=font)
    draw.text((right - 6 * len(f"{x_label} {x1}") - 4, bottom + 6), f"{x_label} {x1}", fill=(0, 0, 0), font=font)
    draw.line([xy(s, v) for s, v in zip(steps, vals)], fill=(190, 190, 190), width=1)
    smooth = _smooth(vals, max(1, len(vals) // 50))
    draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 80, 200), width=2)
    return img
