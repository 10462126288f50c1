"""The shapes world: a deterministic, seeded generator of captioned images for training and evaluation.

Each image is a plain background with 1 to 4 flat-coloured objects (shape, colour, size, place), drawn
antialiased (drawn `SUPERSAMPLE` times larger, box-downsampled). Scenes live in normalised coordinates
(x right, y down, both in [0, 1]), so the same (seed, index) gives the same scene at every resolution.

    world = ShapesWorld(resolution=64, seed=0, split="train")
    image, caption, scene = world.sample(12345)

Splits: "train" never shows a `HELDOUT_PAIRS` colour-shape pair; "heldout" shows at least one in every image;
"all" draws freely. The held-out pairs measure whether a model composes what it never saw.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError
from .captions import (COLOURS, MAX_OBJECTS, PLACES, RELATIONS, SHAPES, SIZES, ObjectSpec, PromptSpec, Relation,
                       parse_caption, render_caption)

__all__ = ["PALETTE", "COLOURS", "SHAPES", "CONCEPT_SHAPES", "SIZES", "PLACES", "RELATIONS", "HELDOUT_PAIRS",
           "ShapesWorld", "Scene", "SceneObject", "ObjectSpec", "PromptSpec", "Relation", "render_scene",
           "scene_from_prompt", "random_spec", "parse_caption", "render_caption", "in_place", "relation_holds",
           "size_of", "shape_polygon", "seeded_rng"]

PALETTE = {
    "red": "#E02828", "orange": "#F58C1E", "yellow": "#F0D228", "green": "#28AA3C", "cyan": "#28C8DC",
    "blue": "#2850DC", "purple": "#8C3CBE", "pink": "#F582BE", "white": "#F5F5F5", "black": "#141414",
    "gray": "#808080",
}
assert tuple(PALETTE) == COLOURS

# Never drawn in split="train": one pair per shape, each with a different colour, so every colour and every shape
# is still seen in training (in other combinations).
HELDOUT_PAIRS = (("purple", "circle"), ("orange", "square"), ("cyan", "triangle"), ("green", "star"),
                 ("pink", "hexagon"), ("blue", "heart"), ("yellow", "cross"))

SPLITS = ("train", "heldout", "all")
SUPERSAMPLE = 4

# Drawable (shape_polygon, render_scene) but never drawn by the world nor named in its captions: new concepts for
# fine-tuning (sdstack.eval.concepts). A ring's hole has RING_HOLE of its radius; a crescent is the unit circle
# minus a circle of radius CRESCENT_CUT[1] centred CRESCENT_CUT[0] to the right (opening to the right).
CONCEPT_SHAPES = ("ring", "crescent")
RING_HOLE = 0.5
CRESCENT_CUT = (0.5, 0.85)

# ---- Geometry rules, shared by the generator and the oracle (normalised coordinates; see module docstring). ----
# An object's centre is the centre of its bounding box; its radius is half the larger side of that box.
SIZE_RADIUS = {"small": (0.11, 0.13), "large": (0.18, 0.22)}  # what the generator draws
SIZE_THRESHOLD = 0.155  # rule: radius < 0.155 -> "small", else "large"
PLACE_LIMIT = 0.4  # rule: "left" = cx < 0.4, "right" = cx > 0.6, "top" = cy < 0.4, "bottom" = cy > 0.6
CENTRE_LIMIT = 0.15  # rule: "centre" = |cx - 0.5| < 0.15 and |cy - 0.5| < 0.15
RELATION_MARGIN = 0.1  # rule: "A left of B" = cx_B - cx_A > 0.1; "A above B" = cy_B - cy_A > 0.1
BORDER = 0.03  # generator: gap between an object's box and the image edge
GAP = 0.05  # generator: gap between two objects' boxes


def size_of(radius: float) -> str:
    return "small" if radius < SIZE_THRESHOLD else "large"


def in_place(cx: float, cy: float, place: str) -> bool:
    """The absolute-place rule (see the constants above)."""
    if place == "left":
        return cx < PLACE_LIMIT
    if place == "right":
        return cx > 1 - PLACE_LIMIT
    if place == "top":
        return cy < PLACE_LIMIT
    if place == "bottom":
        return cy > 1 - PLACE_LIMIT
    if place == "centre":
        return abs(cx - 0.5) < CENTRE_LIMIT and abs(cy - 0.5) < CENTRE_LIMIT
    raise ValueError(f"unknown place {place!r}")


def relation_holds(a: tuple[float, float], b: tuple[float, float], rel: str) -> bool:
    """The relation rule between two centres (x, y): 'A left of B' iff B's x exceeds A's by RELATION_MARGIN."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx > RELATION_MARGIN, "right of": -dx > RELATION_MARGIN,
            "above": dy > RELATION_MARGIN, "below": -dy > RELATION_MARGIN}[rel]


# ---------------------------------------------------------------------------------------------------- shapes

def _regular(n: int, start_deg: float, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * k / n)),
             radius * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def _raw_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "circle":
        return _regular(96, 0)
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":  # equilateral, pointing up
        return _regular(3, -90)
    if shape == "star":  # five points, pointing up, deep notches (inner/outer = 0.45)
        outer, inner = _regular(5, -90), _regular(5, -54, 0.45)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "hexagon":  # flat top and bottom
        return _regular(6, 0)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return list(zip(x.tolist(), y.tolist()))
    if shape == "cross":  # a plus sign, arms 0.36 of the width
        a = 0.36
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
                (-a, -a)]
    if shape == "ring":  # outer circle, then the hole the other way round, joined by a slit of zero width
        outer, inner = _regular(96, 0), _regular(96, 0, RING_HOLE)
        return outer + outer[:1] + inner[:1] + inner[::-1]
    if shape == "crescent":  # outer arc through the left, back along the cut circle's arc; horns at (xh, +-yh)
        d, rc = CRESCENT_CUT
        xh = (1 - rc * rc + d * d) / (2 * d)
        th, ph = math.atan2(math.sqrt(1 - xh * xh), xh), math.atan2(math.sqrt(1 - xh * xh), xh - d)
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(th, 2 * math.pi - th, 80)]
        return outer + [(d + rc * math.cos(t), rc * math.sin(t)) for t in np.linspace(2 * math.pi - ph, ph, 60)[1:-1]]
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


@lru_cache(maxsize=None)
def shape_polygon(shape: str) -> np.ndarray:
    """Polygon (N, 2) whose bounding box is centred on 0 with its larger half-side equal to 1."""
    p = np.asarray(_raw_polygon(shape), dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    p = (p - (lo + hi) / 2) / ((hi - lo).max() / 2)
    p.setflags(write=False)
    return p


@lru_cache(maxsize=None)
def shape_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of the shape's box, for radius 1."""
    p = shape_polygon(shape)
    return float(p[:, 0].max()), float(p[:, 1].max())


# ---------------------------------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    center: tuple[float, float]  # normalised (x, y) of the box centre
    radius: float  # normalised half of the larger box side

    @property
    def size(self) -> str:
        return size_of(self.radius)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Normalised (x0, y0, x1, y1)."""
        hw, hh = shape_extent(self.shape)
        (cx, cy), r = self.center, self.radius
        return (cx - hw * r, cy - hh * r, cx + hw * r, cy + hh * r)

    def bbox_px(self, resolution: int) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.bbox
        return (math.floor(x0 * resolution), math.floor(y0 * resolution),
                math.ceil(x1 * resolution), math.ceil(y1 * resolution))


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution % 8 or not 32 <= resolution <= 256:
        raise UserError(f"resolution must be a multiple of 8 from 32 to 256, got {resolution!r}", field="resolution")
    return resolution


def render_scene(scene: Scene, resolution: int = 64, outline: float = 0.0,
                 outline_colour: str | tuple[str, ...] = "black", outline_outside: bool = False) -> Image.Image:
    """Draw `scene` as an RGB image, antialiased by drawing SUPERSAMPLE times larger and box-downsampling.

    `outline` > 0 (normalised width; the world's captions never use it) draws a band that wide inside each object's
    edge (or, with `outline_outside`, around it: the object keeps all of its fill), in `outline_colour` (a palette
    name, or one per object).
    """
    check_resolution(resolution)
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    bands = (outline_colour,) * len(scene.objects) if isinstance(outline_colour, str) else outline_colour
    for obj, band in zip(scene.objects, bands):
        pts = shape_polygon(obj.shape) * obj.radius + np.asarray(obj.center)
        pts = pts * big - 0.5  # pixel centres sit at half-integers
        polygon = [tuple(p) for p in pts.tolist()]
        if outline <= 0:
            draw.polygon(polygon, fill=PALETTE[obj.colour])
            continue
        mask = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask).polygon(polygon, fill=255)
        width = 2 * round(outline * big) + 1
        if outline_outside:  # the band grows out of the shape; the fill is the whole shape
            band_mask, fill_mask = mask.filter(ImageFilter.MaxFilter(width)), mask
        else:  # the band is the shape's rim; the fill shrinks inside it
            band_mask, fill_mask = mask, mask.filter(ImageFilter.MinFilter(width))
        image.paste(PALETTE[band], mask=band_mask)
        image.paste(PALETTE[obj.colour], mask=fill_mask)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------------- spec -> scene

def _centre_range(place: str | None, axis: int, r_half: float) -> tuple[float, float]:
    lo, hi = BORDER + r_half, 1 - BORDER - r_half
    if place == "centre":
        return max(lo, 0.45), min(hi, 0.55)
    side = {("left", 0): "lo", ("right", 0): "hi", ("top", 1): "lo", ("bottom", 1): "hi"}.get((place, axis))
    if side == "lo":
        return lo, min(hi, PLACE_LIMIT - 0.1)
    if side == "hi":
        return max(lo, 1 - PLACE_LIMIT + 0.1), hi
    return lo, hi


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def _relation_clear(a: SceneObject, b: SceneObject, rel: str) -> bool:
    """Generator side of a relation: well past the rule's margin, and along its own axis."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= 0.25 and abs(across) <= 0.15


def _centre_bounds(shape: str, r: float, place: str | None, quadrant: int | None) -> list[tuple[float, float]]:
    """Allowed (lo, hi) of the centre's x and y: inside the border, in `place`, and in `quadrant` (0..3) if given."""
    bounds = []
    for axis, half in enumerate(shape_extent(shape)):
        lo, hi = _centre_range(place, axis, half * r)
        if quadrant is not None:
            if (quadrant >> axis) & 1:
                lo = max(lo, 0.5 + GAP / 2 + half * r)
            else:
                hi = min(hi, 0.5 - GAP / 2 - half * r)
        bounds.append((lo, hi))
    return bounds


def _place_objects(items: list[tuple[str, str, str, str | None]], relation: Relation | None,
                   rng: random.Random, tries: int = 200, grid: bool = False) -> tuple[SceneObject, ...] | None:
    """Rejection sampling of (shape, colour, size, place) items; with `grid`, one quadrant each (crowded scenes)."""
    for _ in range(tries):
        quadrants = rng.sample(range(4), len(items)) if grid else [None] * len(items)
        placed: list[SceneObject] = []
        for (shape, colour, size, place), quadrant in zip(items, quadrants):
            r = rng.uniform(*SIZE_RADIUS[size])
            (xlo, xhi), (ylo, yhi) = _centre_bounds(shape, r, place, quadrant)
            if xlo > xhi or ylo > yhi:
                break
            obj = SceneObject(shape, colour, (rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)), r)
            if not all(_boxes_apart(obj, other) for other in placed):
                break
            placed.append(obj)
        else:
            if relation is None or _relation_clear(placed[relation.a], placed[relation.b], relation.rel):
                return tuple(placed)
    return None


def scene_from_prompt(spec: PromptSpec, rng: random.Random, background: str | None = None) -> Scene:
    """A random scene that makes every claim of `spec` true (unstated sizes, places and background are drawn)."""
    colours = {o.colour for o in spec.objects}
    bg = spec.background or background or rng.choice([c for c in COLOURS if c not in colours])
    if bg in colours:
        raise ValueError(f"background {bg!r} is also an object colour")
    for attempt in range(20):
        items = []
        for o in spec.objects:
            for _ in range(o.count):
                # unstated sizes lean small as the attempts fail, so crowded scenes still fit
                size = o.size or ("small" if rng.random() < 0.5 + attempt * 0.1 else "large")
                items.append((o.shape, o.colour, size, o.place))
        objects = _place_objects(items, spec.relation, rng, grid=attempt % 2 == 1 or len(items) == MAX_OBJECTS)
        if objects is not None:
            return Scene(bg, objects)
    raise RuntimeError(f"could not lay out {spec.text or spec!r}")


# ---------------------------------------------------------------------------------------------------- random specs

KIND_WEIGHTS = {"single": 0.3, "relation": 0.2, "counting": 0.2, "two": 0.15, "list": 0.15}


def _pairs(split: str) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in every if (p in HELDOUT_PAIRS) == (split == "heldout")] if split != "all" else every


def _maybe(rng: random.Random, p: float, options):
    return rng.choice(options) if rng.random() < p else None


def _counts(kind: str, rng: random.Random) -> list[int]:
    """How many objects each group of a prompt of this kind has."""
    if kind == "counting":
        return [rng.randint(2, MAX_OBJECTS)]
    if kind in ("relation", "two"):
        return [1, 1]
    counts = [1] * rng.choice((2, 3, 3, 4))  # "list": 2 to 4 groups, some of them plural, 4 objects at most
    for _ in range(rng.randint(0, MAX_OBJECTS - len(counts))):
        counts[rng.randrange(len(counts))] += 1
    return counts


def check_kind_weights(weights) -> tuple[float, ...]:
    """`weights` (one per KIND_WEIGHTS kind, in its order) checked: non-negative, not all zero."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(KIND_WEIGHTS) or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"kind weights must be {len(KIND_WEIGHTS)} non-negative numbers, not all zero, for "
                        f"{', '.join(KIND_WEIGHTS)} (in that order); got {list(weights)}", field="kind_weights")
    return weights


def random_spec(rng: random.Random, split: str = "train", kind: str | None = None,
                weights: tuple[float, ...] | None = None) -> PromptSpec:
    """Random claims of one of the KIND_WEIGHTS kinds (drawn with `weights`, one per kind, default KIND_WEIGHTS);
    train never uses HELDOUT_PAIRS, heldout always does."""
    kind = kind or rng.choices(tuple(KIND_WEIGHTS), weights=weights or tuple(KIND_WEIGHTS.values()))[0]
    pool, other = _pairs(split), _pairs("train" if split == "heldout" else split)
    if kind == "single":
        c, s = rng.choice(pool)
        objects = [ObjectSpec(s, c, 1, _maybe(rng, 0.5, SIZES), _maybe(rng, 0.4, PLACES))]
    else:
        counts = _counts(kind, rng)
        chosen = [rng.choice(pool)]  # in the heldout split, one held-out pair among training pairs
        while len(chosen) < len(counts):
            pair = rng.choice(other)
            if pair not in chosen:
                chosen.append(pair)
        rng.shuffle(chosen)
        objects = [ObjectSpec(s, c, n, _maybe(rng, 0.3, SIZES)) for (c, s), n in zip(chosen, counts)]
    relation = Relation(0, rng.choice(RELATIONS), 1) if kind == "relation" else None
    colours = {o.colour for o in objects}
    background = _maybe(rng, 0.4, [c for c in COLOURS if c not in colours])
    return PromptSpec(tuple(objects), relation, background)


# ---------------------------------------------------------------------------------------------------- the world

def seeded_rng(*parts) -> random.Random:
    """A `random.Random` fixed by `parts` alone (stable across Python versions and platforms)."""
    digest = hashlib.sha256(":".join(map(str, ("sdstack-shapes",) + parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


DETAIL_WIDTHS = (1.0, 3.0)  # the band widths (pixels at 64x64) of ShapesWorld's detail images


def check_detail(share: float, widths) -> None:
    """UserError unless 0 <= share <= 1 and widths is (min, max) pixels with 0 < min <= max."""
    if not 0.0 <= share <= 1.0:
        raise UserError(f"detail_share must lie in [0, 1], got {share}", field="detail_share")
    if len(widths) != 2 or not 0 < widths[0] <= widths[1]:
        raise UserError(f"detail_widths must be [min, max] pixels with 0 < min <= max, got {list(widths)}",
                        field="detail_widths")


class ShapesWorld:
    """An endless, indexable dataset of (image, caption, scene); `sample(i)` depends only on (seed, split, i) and
    the kind weights (how often each KIND_WEIGHTS kind of caption is drawn; the default is KIND_WEIGHTS)."""

    def __init__(self, resolution: int = 64, seed: int = 0, split: str = "train",
                 kind_weights: tuple[float, ...] | None = None, detail_share: float = 0.0,
                 detail_widths: tuple[float, float] = DETAIL_WIDTHS):
        self.resolution = check_resolution(resolution)
        check_detail(detail_share, detail_widths)
        self.detail_share, self.detail_widths = detail_share, tuple(detail_widths)
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}", field="split")
        self.seed, self.split = seed, split
        self.kind_weights = check_kind_weights(kind_weights) if kind_weights else None

    def spec(self, index: int) -> tuple[PromptSpec, Scene]:
        """The claims and the scene of sample `index` (no pixels)."""
        rng = seeded_rng(self.seed, self.split, index)
        spec = random_spec(rng, self.split, weights=self.kind_weights)
        spec = PromptSpec(spec.objects, spec.relation, spec.background, text=render_caption(spec, rng))
        return spec, scene_from_prompt(spec, rng)

    def sample(self, index: int) -> tuple[Image.Image, str, Scene]:
        spec, scene = self.spec(index)
        if self.detail_share > 0:
            rng = seeded_rng(self.seed, self.split, index, "detail")
            if rng.random() < self.detail_share:
                return self._detailed(scene, rng), spec.text, scene
        return render_scene(scene, self.resolution), spec.text, scene

    def _detailed(self, scene: Scene, rng: random.Random) -> Image.Image:
        """Codec training only (the caption does not mention it): every object with a band inside its edge, of a
        random width in `detail_widths` (pixels at 64x64) and a random palette colour other than the object's and
        the background's, so that a decoder learns thin lines between colours."""
        width = rng.uniform(*self.detail_widths) / 64
        bands = tuple(rng.choice([c for c in PALETTE if c not in (o.colour, scene.background)])
                      for o in scene.objects)
        return render_scene(scene, self.resolution, outline=width, outline_colour=bands)

    def __getitem__(self, index: int) -> tuple[Image.Image, str, Scene]:
        return self.sample(index)
