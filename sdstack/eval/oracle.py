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

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..data.shapes import (COLOURS, PALETTE, SHAPES, PromptSpec, Scene, in_place, relation_holds, shape_extent,
                           shape_polygon, size_of)

FG_DELTA = 10.0  # a pixel is foreground when its CIELAB distance to the background exceeds this
BORDER_SHARE = 0.5  # the background colour must cover at least this share of the image border
MIN_AREA = 0.0025  # components smaller than this share of the image are specks, not objects
SPLIT_SHARE = 0.25  # a second colour covering this share of a component makes it two touching objects
MAX_SHAPE_ERROR = 0.5  # a best template error above this leaves the shape "unknown"
TEMPLATE_SUPERSAMPLE = 4
GROW = 3  # pixels an object's region grows past its strong pixels, to take in its soft (antialiased, blurred) edge
TEMPLATE_BLURS = (0.0, 0.6, 1.0, 1.4)  # Gaussian sigmas (pixels) tried on each shape template

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

def _background(rgb: np.ndarray, lab: np.ndarray) -> tuple[str | None, np.ndarray, float]:
    """(background colour name, its measured sRGB, its noise: 90th percentile CIELAB distance on the border)."""
    h, w = lab.shape[:2]
    k = max(1, min(h, w) // 32)
    ring = np.ones((h, w), bool)
    ring[k:h - k, k:w - k] = False
    names = nearest_colour(lab[ring])
    counts = np.bincount(names, minlength=len(COLOURS))
    best = int(counts.argmax())
    if counts[best] < BORDER_SHARE * ring.sum():
        return None, np.zeros(3), 0.0
    bg_rgb = np.median(rgb[ring][names == best], axis=0)
    noise = np.quantile(np.linalg.norm(lab[ring][names == best] - srgb_to_lab(bg_rgb), axis=-1), 0.9)
    return COLOURS[best], bg_rgb, float(noise)


def foreground_threshold(background: str, noise: float) -> float:
    """CIELAB distance from the background above which a pixel is foreground: FG_DELTA, raised for noisy images
    (2x the border's noise) but kept under 0.45x the distance to the palette colour nearest the background, so
    an object's half-covered edge pixels stay foreground."""
    i = COLOURS.index(background)
    nearest = np.delete(np.linalg.norm(_PALETTE_LAB - _PALETTE_LAB[i], axis=-1), i).min()
    return float(min(max(FG_DELTA, 2 * noise), 0.45 * nearest))


def _split(comp: np.ndarray, rgb: np.ndarray, lab: np.ndarray, bg_rgb: np.ndarray, background: str,
           ) -> list[np.ndarray]:
    """Split a component where objects of two colours touch; colours are read from its core only (2 px in from
    its edge), since antialiased edges are background mixes that resemble other palette colours."""
    core = _erode(_erode(comp))
    if core.sum() == 0:
        return [comp]
    counts = np.bincount(nearest_colour(lab[core], exclude=background), minlength=len(COLOURS))
    major = np.flatnonzero(counts >= SPLIT_SHARE * core.sum())
    if len(major) <= 1:
        return [comp]
    axes = _PALETTE_RGB[major] - bg_rgb  # each pixel goes to the major colour whose mix with the background fits it
    d = rgb[comp] - bg_rgb
    t = np.clip(d @ axes.T / (axes * axes).sum(-1), 0.0, 1.0)
    own = np.full(comp.shape, -1)
    own[comp] = np.linalg.norm(d[:, None] - t[..., None] * axes, axis=-1).argmin(-1)
    parts = []
    for k in range(len(major)):
        sub = label_components(own == k)
        parts += [sub == j for j in range(sub.max() + 1)]
    return parts


def _regions(rgb: np.ndarray, lab: np.ndarray, delta: np.ndarray, threshold: float, bg_rgb: np.ndarray,
             background: str) -> np.ndarray:
    """Label image of the objects (-1 = background), grown GROW pixels into their soft edges.

    Objects are seeded by their strong pixels: above the foreground threshold and at least half as far from the
    background as the farthest pixel within 2 px. Faint blur between two close objects is never strong, so it
    cannot bridge them; the seeds are split by colour where two colours touch, and specks are dropped.
    """
    strong = (delta > threshold) & (delta >= 0.5 * _max_filter(delta, 2))
    comps = label_components(strong)
    min_px = MIN_AREA * strong.size
    labels = np.full(strong.shape, -1)
    n = 0
    for k in range(comps.max() + 1):
        comp = comps == k
        if comp.sum() < min_px:
            continue
        for part in _split(comp, rgb, lab, bg_rgb, background):
            if part.sum() >= min_px:
                labels[part] = n
                n += 1
    return _grow(labels, GROW)


def _coverage(rgb: np.ndarray, bg_rgb: np.ndarray, obj_rgb: np.ndarray) -> np.ndarray:
    """Per-pixel share of the object colour, projecting each pixel on the background->object line in sRGB."""
    axis = obj_rgb - bg_rgb
    return np.clip((rgb - bg_rgb) @ axis / max(float(axis @ axis), 1e-6), -1.0, 2.0)  # unclipped noise stays unbiased


def _template(shape: str, cx: float, cy: float, r: float, w: int, h: int) -> np.ndarray:
    """Coverage of `shape` (centre/radius in pixel units of a w x h window), drawn like the world draws it."""
    s = TEMPLATE_SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    pts = (shape_polygon(shape) * r + (cx, cy)) * s - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


@lru_cache(maxsize=None)
def polygon_moments(shape: str) -> tuple[float, float, float]:
    """Area and centroid offset (from the box centre) of a shape of radius 1 (shoelace formula)."""
    p = shape_polygon(shape)
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    return abs(area), float(((x + x1) * cross).sum() / (6 * area)), float(((y + y1) * cross).sum() / (6 * area))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    k = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)
    g = np.exp(-0.5 * (k / sigma) ** 2)
    return g / g.sum()


def _blur_stack(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) arrays (zero outside)."""
    if sigma <= 0:
        return stack
    g = _gaussian_kernel(sigma)
    pad = len(g) // 2
    out = np.pad(stack, ((0, 0), (pad, pad), (pad, pad)))
    out = sum(g[i] * out[:, i:i + stack.shape[1], :] for i in range(len(g)))
    return sum(g[i] * out[:, :, i:i + stack.shape[2]] for i in range(len(g)))


def classify_shape(alpha: np.ndarray, shapes: tuple[str, ...] = SHAPES,
                   ) -> tuple[str, float, tuple[float, float, float]]:
    """Best of `shapes` for a coverage window: (shape, error, (cx, cy, r) in window pixels).

    Each shape is drawn with the object's area and centroid (both unchanged by blur and unbiased under noise),
    blurred by each of TEMPLATE_BLURS (generated images are soft); error = L1 coverage mismatch / object area.
    """
    h, w = alpha.shape
    area = max(float(alpha.sum()), 1e-6)
    mx = float((alpha.sum(0) * (np.arange(w) + 0.5)).sum()) / area
    my = float((alpha.sum(1) * (np.arange(h) + 0.5)).sum()) / area
    fits = []
    for shape in shapes:
        a, ox, oy = polygon_moments(shape)
        r = (area / a) ** 0.5
        fits.append((shape, mx - ox * r, my - oy * r, r))
    templates = np.stack([_template(shape, cx, cy, r, w, h) for shape, cx, cy, r in fits])
    errors = np.stack([np.abs(_blur_stack(templates, s) - alpha).sum((1, 2)) / area for s in TEMPLATE_BLURS])
    best = int(errors.min(0).argmin())
    shape, cx, cy, r = fits[best]
    return shape, float(errors[:, best].min()), (cx, cy, r)


def object_coverage(region: np.ndarray, background: str, rgb: np.ndarray, bg_rgb: np.ndarray,
                    ) -> tuple[str, np.ndarray, int, int]:
    """One object's colour name and its coverage window: (colour, alpha over the region's bounding box, x0, y0)."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    win_rgb, win = rgb[y0:y1, x0:x1], region[y0:y1, x0:x1]
    pixels = win_rgb[win]
    dist = np.linalg.norm(pixels - bg_rgb, axis=-1)
    obj_rgb = np.median(pixels[dist >= np.quantile(dist, 0.75)], axis=0)
    colour = COLOURS[int(nearest_colour(srgb_to_lab(obj_rgb), exclude=background))]
    return colour, _coverage(win_rgb, bg_rgb, obj_rgb) * win, int(x0), int(y0)


def _describe(coverage: tuple[str, np.ndarray, int, int], size: tuple[int, int],
              shapes: tuple[str, ...] = SHAPES) -> DetectedObject:
    """Colour, shape and geometry of one object, from its `object_coverage` in an image of `size` (h, w)."""
    h, w = size
    colour, alpha, x0, y0 = coverage
    shape, err, (cx, cy, r) = classify_shape(alpha, shapes)
    if err > MAX_SHAPE_ERROR:
        shape = "unknown"
    hw, hh = shape_extent(shape) if shape != "unknown" else (1.0, 1.0)
    cx, cy = (cx + x0) / w, (cy + y0) / h
    radius = r / max(w, h)
    return DetectedObject(shape=shape, colour=colour, center=(cx, cy), radius=radius,
                          bbox=(cx - hw * r / w, cy - hh * r / h, cx + hw * r / w, cy + hh * r / h),
                          area=float(alpha.sum()) / (w * h), shape_error=err)


def object_regions(image) -> tuple[str | None, np.ndarray, np.ndarray, np.ndarray]:
    """(background colour name or None, the image as float sRGB, the background's measured sRGB, the label image
    of the objects: -1 = background, else the object's index)."""
    rgb = to_rgb_array(image)
    lab = srgb_to_lab(rgb)
    background, bg_rgb, noise = _background(rgb, lab)
    if background is None:
        return None, rgb, bg_rgb, np.full(rgb.shape[:2], -1)
    delta = np.linalg.norm(lab - srgb_to_lab(bg_rgb), axis=-1)
    return background, rgb, bg_rgb, _regions(rgb, lab, delta, foreground_threshold(background, noise), bg_rgb,
                                             background)


def analyze(image, shapes: tuple[str, ...] = SHAPES) -> Analysis:
    """Find the background and the objects of a shapes-world image (PIL image or HxWx3 uint8 array); each object's
    shape is the best of `shapes` (e.g. SHAPES + CONCEPT_SHAPES to also read rings and crescents)."""
    background, rgb, bg_rgb, labels = object_regions(image)
    h, w = rgb.shape[:2]
    if background is None:
        return Analysis(None, (), w, h)
    objects = [_describe(object_coverage(labels == k, background, rgb, bg_rgb), labels.shape, shapes)
               for k in range(labels.max() + 1)]
    return Analysis(background, tuple(objects), w, h)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _max_filter(a: np.ndarray, k: int) -> np.ndarray:
    """Maximum over the (2k+1) x (2k+1) neighbourhood."""
    p = np.pad(a, k, mode="edge")
    h, w = a.shape
    rows = np.max([p[i:i + h] for i in range(2 * k + 1)], axis=0)
    return np.max([rows[:, i:i + w] for i in range(2 * k + 1)], axis=0)


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Give unlabelled (-1) pixels the label of a labelled 4-neighbour, `steps` times (a discrete Voronoi growth)."""
    for _ in range(steps):
        nb = labels.copy()
        np.maximum(nb[1:], labels[:-1], out=nb[1:])
        np.maximum(nb[:-1], labels[1:], out=nb[:-1])
        np.maximum(nb[:, 1:], labels[:, :-1], out=nb[:, 1:])
        np.maximum(nb[:, :-1], labels[:, 1:], out=nb[:, :-1])
        labels = np.where(labels >= 0, labels, nb)
    return labels


# ---------------------------------------------------------------------------------------------------- scoring

def scene_analysis(scene: Scene, resolution: int = 64) -> Analysis:
    """The ground truth of a scene in the oracle's terms: what a perfect `analyze` would return."""
    objects = tuple(DetectedObject(shape=o.shape, colour=o.colour, center=o.center, radius=o.radius, bbox=o.bbox,
                                   area=0.0, shape_error=0.0) for o in scene.objects)
    return Analysis(scene.background, objects, resolution, resolution)


def score(image, spec: PromptSpec) -> dict[str, bool]:
    """Each claim of `spec` right or wrong for `image` (a PIL image, an array, or an `Analysis`), plus
    'all_correct'. Claim names are '<kind>:<group>' or 'relation' / 'background' (rules: module docstring)."""
    analysis = image if isinstance(image, Analysis) else analyze(image)
    objs = analysis.objects
    result: dict[str, bool] = {}
    matches = []
    for i, group in enumerate(spec.objects):
        same_shape = [o for o in objs if o.shape == group.shape]
        match = [o for o in same_shape if o.colour == group.colour]
        matches.append(match)
        result[f"shape:{i}"] = bool(same_shape)
        result[f"colour:{i}"] = bool(match)
        if group.count > 1:
            result[f"count:{i}"] = len(match) == group.count
        if group.size is not None:
            result[f"size:{i}"] = sum(o.size == group.size for o in match) >= group.count
        if group.place is not None:
            result[f"place:{i}"] = any(in_place(*o.center, group.place) for o in match)
    if spec.relation is not None:
        r = spec.relation
        result["relation"] = any(relation_holds(a.center, b.center, r.rel)
                                 for a in matches[r.a] for b in matches[r.b] if a is not b)
    if spec.background is not None:
        result["background"] = analysis.background == spec.background
    result["all_correct"] = all(result.values())
    return result


def claim_kind(name: str) -> str:
    """'colour:1' -> 'colour'."""
    return name.split(":")[0]


def images_per_prompt(images_by_prompt, prompts) -> list[list]:
    """One list of images per prompt, in prompt order, from {prompt id: images} or an aligned list."""
    if isinstance(images_by_prompt, Mapping):
        missing = [p.id for p in prompts if p.id not in images_by_prompt]
        if missing:
            raise ValueError(f"no images for {len(missing)} prompts, e.g. {missing[:3]}")
        images_by_prompt = [images_by_prompt[p.id] for p in prompts]
    if len(images_by_prompt) != len(prompts):
        raise ValueError(f"{len(images_by_prompt)} image lists for {len(prompts)} prompts")
    return [list(imgs) if isinstance(imgs, (list, tuple)) else [imgs] for imgs in images_by_prompt]


def evaluate(images_by_prompt, suite) -> dict:
    """Score every image of a suite. `images_by_prompt`: {prompt id: [images]} or a list aligned with
    `suite.prompts` (an entry may be one image or a list, e.g. one per seed; images may be `Analysis` objects).

    Returns {'suite', 'n_prompts', 'n_images', 'accuracy' (share of images with every claim right),
    'claims' ({kind: share right}), 'results' (one row per image)}.
    """
    prompts = list(suite.prompts)
    rows = []
    for spec, images in zip(prompts, images_per_prompt(images_by_prompt, prompts)):
        for seed, image in enumerate(images):
            claims = score(image, spec)
            rows.append({"id": spec.id, "prompt": spec.text, "seed": seed, "all_correct": claims.pop("all_correct"),
                         "claims": claims, "shapes": [g.shape for g in spec.objects],
                         "colours": [g.colour for g in spec.objects]})
    return summarize(rows, getattr(suite, "name", "custom"), len(prompts))


def summarize(rows: list[dict], suite_name: str, n_prompts: int) -> dict:
    right: dict[str, list[bool]] = {}
    by_shape: dict[str, list[bool]] = {}  # the 'shape:i' claims grouped by the shape the prompt asks for
    by_colour: dict[str, list[bool]] = {}  # the 'colour:i' claims grouped by the colour the prompt asks for
    for row in rows:
        for name, ok in row["claims"].items():
            right.setdefault(claim_kind(name), []).append(ok)
        for key, groups, values in (("shape", by_shape, row.get("shapes", ())),
                                    ("colour", by_colour, row.get("colours", ()))):
            for i, value in enumerate(values):
                if f"{key}:{i}" in row["claims"]:
                    groups.setdefault(value, []).append(row["claims"][f"{key}:{i}"])
    return {"suite": suite_name, "n_prompts": n_prompts, "n_images": len(rows),
            "accuracy": float(np.mean([r["all_correct"] for r in rows])) if rows else 0.0,
            "claims": {k: float(np.mean(v)) for k, v in right.items()},
            "shape_by_shape": {k: float(np.mean(by_shape[k])) for k in sorted(by_shape)},
            "colour_by_colour": {k: float(np.mean(by_colour[k])) for k in sorted(by_colour)}, "results": rows}
