"""The shapes oracle: classical image analysis (numpy + Pillow, no neural network) that reads a shapes-world image
and scores it against the claims of the prompt it was made from, GenEval-style.

`analyze(image)` finds the background (the palette colour that dominates the image border), separates the
objects from it (colour distance in CIELAB), and for each object names its colour (nearest palette colour in
CIELAB), its shape (the best-fitting shape template, rendered at the object's own place and scale and compared
as soft coverage masks, which tolerates blur), its size and its place. `score(image, spec)` turns a `PromptSpec`
into claims, each right or wrong (rules below); `evaluate` summarises a suite.

Claim rules (per object group i of the prompt, "matching" = same colour AND same shape):
  shape:i     at least one object has the shape (any colour)
  colour:i    at least one object has the shape in the stated colour (attribute binding)
  count:i     (only when the prompt states 2, 3 or 4) exactly that many matching objects
  size:i      (when stated) at least `count` matching objects have that size (sdstack.data.shapes.size_of)
  place:i     (when stated) a matching object is in that place (sdstack.data.shapes.in_place)
  relation    a matching object of group a and another of group b satisfy it (relation_holds)
  background  the detected background colour is the stated one
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..data.shapes import (COLOURS, PALETTE, SHAPES, PromptSpec, in_place, relation_holds, shape_extent,
                           shape_polygon, size_of)

FG_DELTA = 10.0  # a pixel is foreground when its CIELAB distance to the background exceeds this
BORDER_SHARE = 0.5  # the background colour must cover at least this share of the image border
MIN_AREA = 0.0025  # components smaller than this share of the image are specks, not objects
SPLIT_SHARE = 0.2  # a second colour covering this share of a component makes it two touching objects
MAX_SHAPE_ERROR = 0.5  # a best template error above this leaves the shape "unknown"
TEMPLATE_SUPERSAMPLE = 4

_PALETTE_RGB = np.array([[int(PALETTE[c][i:i + 2], 16) for i in (1, 3, 5)] for c in COLOURS], dtype=np.float64)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, D65) -> CIELAB, vectorised over leading axes."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = srgb_to_lab(_PALETTE_RGB)


def nearest_colour(lab: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour for each Lab vector (optionally never `exclude`)."""
    d = np.linalg.norm(np.asarray(lab)[..., None, :] - _PALETTE_LAB, axis=-1)
    if exclude is not None:
        d[..., COLOURS.index(exclude)] = np.inf
    return d.argmin(-1)


@dataclass(frozen=True)
class DetectedObject:
    shape: str  # one of SHAPES, or "unknown"
    colour: str
    center: tuple[float, float]  # normalised (x, y) of the box centre
    radius: float  # normalised half of the larger box side
    bbox: tuple[float, float, float, float]  # normalised (x0, y0, x1, y1)
    area: float  # share of the image
    shape_error: float  # template mismatch of the chosen shape (0 = perfect)

    @property
    def size(self) -> str:
        return size_of(self.radius)


@dataclass(frozen=True)
class Analysis:
    background: str | None  # None: no dominant background (then no objects either)
    objects: tuple[DetectedObject, ...] = field(default_factory=tuple)
    width: int = 0
    height: int = 0


def to_rgb_array(image) -> np.ndarray:
    """PIL image or HxWx3 uint8 array -> float64 array in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return arr.astype(np.float64)


# ---------------------------------------------------------------------------------------------------- components

def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask: int array, -1 outside, else a label per component.

    Min-label propagation with pointer jumping (labels are pixel indices, so L[L[p]] <= L[p]).
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m = np.where(mask, m, big).ravel()
        inside = m < big
        for _ in range(4):
            m[inside] = m[m[inside]]
        m = m.reshape(h, w)
        if np.array_equal(m, lab):
            break
        lab = m
    out = np.full((h, w), -1, dtype=np.int64)
    _, out[mask] = np.unique(lab[mask], return_inverse=True)
    return out


# ---------------------------------------------------------------------------------------------------- analysis

def _background(rgb: np.ndarray, lab: np.ndarray) -> tuple[str | None, np.ndarray]:
    h, w = lab.shape[:2]
    k = max(1, min(h, w) // 32)
    ring = np.ones((h, w), bool)
    ring[k:h - k, k:w - k] = False
    names = nearest_colour(lab[ring])
    counts = np.bincount(names, minlength=len(COLOURS))
    best = int(counts.argmax())
    if counts[best] < BORDER_SHARE * ring.sum():
        return None, np.zeros(3)
    return COLOURS[best], np.median(rgb[ring][names == best], axis=0)


def _mix_labels(pixels: np.ndarray, bg_rgb: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel, the palette colour that best explains it as a mix with the background, and its share.

    Antialiased edges are such mixes, so they take the colour of their object rather than a colour of their own.
    """
    axes = _PALETTE_RGB - bg_rgb  # (C, 3)
    d = pixels - bg_rgb  # (N, 3)
    t = np.clip(d @ axes.T / np.maximum((axes * axes).sum(-1), 1e-6), 0.0, 1.0)  # (N, C)
    resid = np.linalg.norm(d[:, None, :] - t[..., None] * axes, axis=-1)
    resid[:, COLOURS.index(background)] = np.inf
    best = resid.argmin(-1)
    return best, t[np.arange(len(best)), best]


def _regions(rgb: np.ndarray, fg: np.ndarray, bg_rgb: np.ndarray, background: str) -> list[np.ndarray]:
    """Object masks: components of the foreground, split where objects of two colours touch."""
    labels = label_components(fg)
    regions = []
    min_px = MIN_AREA * fg.size
    for k in range(labels.max() + 1):
        comp = labels == k
        if comp.sum() < min_px:
            continue
        names, share = _mix_labels(rgb[comp], bg_rgb, background)
        counts = np.bincount(names[share >= 0.5], minlength=len(COLOURS))
        major = np.flatnonzero(counts >= SPLIT_SHARE * max(counts.sum(), 1))
        if len(major) <= 1:
            regions.append(comp)
            continue
        own = np.full(comp.shape, -1)
        axes = _PALETTE_RGB[major] - bg_rgb
        d = rgb[comp] - bg_rgb
        t = np.clip(d @ axes.T / (axes * axes).sum(-1), 0.0, 1.0)
        own[comp] = major[np.linalg.norm(d[:, None] - t[..., None] * axes, axis=-1).argmin(-1)]
        for c in major:
            sub = label_components(own == c)
            regions += [sub == j for j in range(sub.max() + 1) if (sub == j).sum() >= min_px]
    return regions


def _coverage(rgb: np.ndarray, bg_rgb: np.ndarray, obj_rgb: np.ndarray) -> np.ndarray:
    """Per-pixel share of the object colour, projecting each pixel on the background->object line in sRGB."""
    axis = obj_rgb - bg_rgb
    return np.clip((rgb - bg_rgb) @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)


def _template(shape: str, cx: float, cy: float, r: float, w: int, h: int) -> np.ndarray:
    """Coverage of `shape` (centre/radius in pixel units of a w x h window), drawn like the world draws it."""
    s = TEMPLATE_SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    pts = (shape_polygon(shape) * r + (cx, cy)) * s - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _box_profile(alpha: np.ndarray, axis: int) -> tuple[float, float]:
    """Subpixel (centre, length) of the object's extent along one axis, from the max coverage per line."""
    prof = alpha.max(axis=axis)
    idx = np.arange(prof.size) + 0.5
    length = float(prof.sum())
    centre = float((prof * idx).sum() / max(length, 1e-6))
    return centre, length


def classify_shape(alpha: np.ndarray) -> tuple[str, float, tuple[float, float, float]]:
    """Best shape for a coverage window: (shape, error, (cx, cy, r) in window pixels). Error = L1 mismatch / area."""
    h, w = alpha.shape
    (cx, bw), (cy, bh) = _box_profile(alpha, 0), _box_profile(alpha, 1)
    area = max(float(alpha.sum()), 1e-6)
    best = ("unknown", np.inf, (cx, cy, max(bw, bh) / 2))
    for shape in SHAPES:
        hw, hh = shape_extent(shape)
        for r in {round(bw / (2 * hw), 3), round(bh / (2 * hh), 3)}:
            err = float(np.abs(_template(shape, cx, cy, r, w, h) - alpha).sum()) / area
            if err < best[1]:
                best = (shape, err, (cx, cy, r))
    return best


def _describe(region: np.ndarray, background: str, rgb: np.ndarray, bg_rgb: np.ndarray, others: np.ndarray,
              ) -> DetectedObject:
    h, w = region.shape
    ys, xs = np.nonzero(region)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, h)
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, w)
    win_rgb = rgb[y0:y1, x0:x1]
    core = win_rgb[region[y0:y1, x0:x1]]
    dist = np.linalg.norm(core - bg_rgb, axis=-1)
    obj_rgb = np.median(core[dist >= np.quantile(dist, 0.5)], axis=0)
    colour = COLOURS[int(nearest_colour(srgb_to_lab(obj_rgb), exclude=background))]
    near = _dilate(_dilate(region)) & ~others
    alpha = _coverage(win_rgb, bg_rgb, obj_rgb) * near[y0:y1, x0:x1]
    shape, err, (cx, cy, r) = classify_shape(alpha)
    if err > MAX_SHAPE_ERROR:
        shape = "unknown"
    hw, hh = shape_extent(shape) if shape != "unknown" else (1.0, 1.0)
    cx, cy = (cx + x0) / w, (cy + y0) / h
    radius = r / max(w, h) if shape != "unknown" else r / max(w, h)
    return DetectedObject(shape=shape, colour=colour, center=(cx, cy), radius=radius,
                          bbox=(cx - hw * r / w, cy - hh * r / h, cx + hw * r / w, cy + hh * r / h),
                          area=float(alpha.sum()) / (w * h), shape_error=err)


def analyze(image) -> Analysis:
    """Find the background and the objects of a shapes-world image (PIL image or HxWx3 uint8 array)."""
    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    lab = srgb_to_lab(rgb)
    background, bg_rgb = _background(rgb, lab)
    if background is None:
        return Analysis(None, (), w, h)
    fg = np.linalg.norm(lab - srgb_to_lab(bg_rgb), axis=-1) > FG_DELTA
    regions = _regions(rgb, fg, bg_rgb, background)
    union = np.zeros((h, w), bool)
    for region in regions:
        union |= region
    objects = [_describe(region, background, rgb, bg_rgb, union & ~_dilate(region)) for region in regions]
    return Analysis(background, tuple(objects), w, h)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out
