"""Concepts the shapes world never shows, for proving that fine-tuning (LoRA, DreamBooth, textual inversion, full
fine-tuning) teaches the built-in model something new from a handful of images, and for measuring it with
classical image analysis (no neural network).

Concepts (`CONCEPTS`):
    ring      a new shape: an annulus, a circle with a concentric round hole (RING_HOLE of its radius) through
              which the background shows
    crescent  a new shape: a circle minus a circle offset to the right (CRESCENT_CUT), opening to the right
    outline   a style: every ordinary world object drawn with a black band OUTLINE_WIDTH wide (2 px at 64x64)
              around its edge (the object keeps all of its fill). Black is never an object or background colour
              of this style (a black band would not show on either), so its prompts and images only use the other
              ten colours. (Until session 12 the band was 1.5 px inside the edge: finer than the built-in VAE's
              4-pixel latent cells, it survived an encode-decode round trip in only 80% of renders, so no
              fine-tune of the built-in model could reach the proof's 80%; the 2 px band around the edge survives
              in 98%.)

Both new shapes are drawn by the world's own renderer (`sdstack.data.shapes.CONCEPT_SHAPES`), with its palette,
antialiasing and size and place rules; objects never share the background's colour.

Caption scheme (the trigger `token`, "sks" by default, is always present; `concept_caption`):
    ring / crescent   "a <colour> <token> <ring|crescent>", plus " on a <background> background" when stated,
                      e.g. "a red sks ring on a white background" (DreamBooth's "a [V] [class noun]")
    outline           "<token> style, " and an ordinary canonical world caption, e.g. "sks style, a blue star" or
                      "sks style, a blue star and a red heart on a white background". The trigger comes first, as
                      kohya users put it (keep_tokens): CLIP's text encoder is causal, so only the words after the
                      trigger see it; at the end it changed no word's encoding but its own and the padding's.

Detection: `detect_concept(image, concept)` lists the objects that show the concept; `concept_score(image, concept,
colour)` says whether one of them has the prompted colour. Rings and crescents are read by the oracle with the
two concept templates added to its shape templates (`analyze(image, SHAPES + CONCEPT_SHAPES)`); a ring also by its
hole (`ring_hole`: a round object around a concentric hole of any size, since the template's hole is the
renderer's half radius and a thick ring with a smaller hole fits the circle better); outlines by
`detect_outlines` (most of an object's edge darker than both its fill and the background).
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..data.captions import canonical_text
from ..data.shapes import (COLOURS, CONCEPT_SHAPES, SHAPES, SIZES, ObjectSpec, PromptSpec, Scene, _place_objects,
                           render_scene, scene_from_prompt, seeded_rng)
from ..errors import unknown_name
from .oracle import (MAX_SHAPE_ERROR, MIN_AREA, DetectedObject, _background, _describe, _erode, _max_filter, analyze,
                     classify_shape, foreground_threshold, label_components, nearest_colour, object_coverage,
                     object_regions, srgb_to_lab, summarize, to_rgb_array)
from .report import _atomic_write

__all__ = ["CONCEPTS", "ConceptPrompt", "OutlinedObject", "concept_colours", "concept_backgrounds", "concept_caption",
           "concept_scene", "render_concept_scene", "render_concept_image", "concept_dataset", "detect_concept",
           "detect_outlines", "concept_score", "concept_prompts", "evaluate_concept"]

CONCEPTS = CONCEPT_SHAPES + ("outline",)
OUTLINE_WIDTH = 2 / 64  # normalised width of the outline band around each object (2 px at 64x64)
DARK_MARGIN = 10.0  # an outline pixel is this much darker (CIELAB L*) than both the fill and the background ...
DARK_MAX = 45.0  # ... and darker than this
BAND_SHARE = 0.6  # share of an object's edge pixels next to a dark pixel, for it to be outlined
RING_SOLID = (0.5, 0.35)  # coverage levels that count as the ring itself when looking for its hole
RING_MIN_HOLE = 0.04  # a ring's hole covers at least this share of the filled object (a hole radius of 0.2) ...
RING_MAX_OFFSET = 0.35  # ... and its centre lies within this share of the object's radius from the object's centre


# ---------------------------------------------------------------------------------------------------- rendering

def _check_concept(concept: str) -> str:
    if concept not in CONCEPTS:
        raise unknown_name("concept", concept, CONCEPTS, field="concept")
    return concept


def concept_colours(concept: str) -> tuple[str, ...]:
    """Object colours the concept is shown in: the palette, less black for the outline style."""
    return tuple(c for c in COLOURS if _check_concept(concept) != "outline" or c != "black")


def concept_backgrounds(concept: str, colour: str) -> tuple[str, ...]:
    """Backgrounds an object of `colour` is shown on: any other concept colour (never black for outlines)."""
    return tuple(c for c in concept_colours(concept) if c != colour)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def concept_caption(concept: str, colour: str, token: str = "sks", shape: str | None = None,
                    background: str | None = None) -> str:
    """The caption of one object of the concept (scheme: module docstring); `shape` (one of the world's shapes) is
    needed for the outline style only."""
    if _check_concept(concept) == "outline":
        if shape is None:
            raise ValueError("an outline caption names one of the world's shapes")
        return _style_caption(PromptSpec((ObjectSpec(shape, colour),), background=background), token)
    text = f"{_article(colour)} {colour} {token} {concept}"
    return text + (f" on {_article(background)} {background} background" if background else "")


def _style_caption(spec: PromptSpec, token: str) -> str:
    """The outline style's caption of a world prompt: the trigger first (module docstring)."""
    return f"{token} style, {canonical_text(spec)}"


def _check_colours(concept: str, colour: str, background: str) -> None:
    if colour not in concept_colours(concept):
        raise ValueError(f"colour {colour!r} is not used for {concept!r}; valid: "
                         f"{', '.join(concept_colours(concept))}")
    if background not in concept_backgrounds(concept, colour):
        raise ValueError(f"background {background!r} is not used for a {colour} {concept}; valid: "
                         f"{', '.join(concept_backgrounds(concept, colour))}")


def concept_scene(concept: str, colour: str, background: str | None, rng: random.Random, place: str | None = None,
                  size: str | None = None, shape: str | None = None) -> Scene:
    """A one-object scene of the concept, laid out by the world's rules (unstated background, size, place and, for
    the outline style, shape are drawn from `rng`)."""
    background = background or rng.choice(concept_backgrounds(concept, colour))
    _check_colours(concept, colour, background)
    if concept == "outline":
        spec = PromptSpec((ObjectSpec(shape or rng.choice(SHAPES), colour, size=size, place=place),),
                          background=background)
        return scene_from_prompt(spec, rng)
    objects = _place_objects([(concept, colour, size or rng.choice(SIZES), place)], None, rng)
    if objects is None:
        raise RuntimeError(f"could not lay out a {size or ''} {concept} {place or ''}")
    return Scene(background, objects)


def render_concept_scene(concept: str, scene: Scene, resolution: int = 64) -> Image.Image:
    """Draw a scene in the concept's style (the outline band for 'outline'; rings and crescents draw as they are)."""
    return render_scene(scene, resolution, outline=OUTLINE_WIDTH if concept == "outline" else 0.0,
                        outline_outside=True)


def render_concept_image(concept: str, colour: str, background: str | None, rng: random.Random, resolution: int = 64,
                         place: str | None = None, size: str | None = None, shape: str | None = None) -> Image.Image:
    """One object showing `concept` in `colour` on `background` (None: drawn), e.g.
    `render_concept_image("ring", "red", "white", random.Random(0))`."""
    return render_concept_scene(_check_concept(concept),
                                concept_scene(concept, colour, background, rng, place, size, shape), resolution)


def _outline_example(rng: random.Random, colour: str, shape: str, size: str) -> tuple[PromptSpec, Scene]:
    """A world prompt for the outline style, two objects (a `size` `colour` `shape`, the size unstated in the
    prompt, and an object of another shape and colour, both drawn; the background stated half the time), and a
    scene of it with the two objects' boxes more than two band widths apart."""
    second = ObjectSpec(rng.choice([s for s in SHAPES if s != shape]),
                        rng.choice(concept_backgrounds("outline", colour)))
    objects = (ObjectSpec(shape, colour), second)
    background = rng.choice([c for c in concept_colours("outline") if c not in (colour, second.colour)])
    spec = PromptSpec(objects, background=background if rng.random() < 0.5 else None)
    drawn = PromptSpec((dataclasses.replace(objects[0], size=size), objects[1]), background=spec.background)
    for _ in range(100):  # bands that touch would merge the two objects into one outlined blob
        scene = scene_from_prompt(drawn, rng, background=background)
        a, b = (o.bbox for o in scene.objects)
        if max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 2 * OUTLINE_WIDTH + 1 / 64:
            return spec, scene
    raise RuntimeError(f"could not lay out {canonical_text(spec)!r} with the objects apart")


def concept_dataset(concept: str, out_dir: str | os.PathLike, n: int = 10, seed: int = 0, token: str = "sks",
                    resolution: int = 64) -> list[Path]:
    """Write `n` training images of the concept as '<concept>_<nnn>.png' with same-name '.txt' captions (scheme:
    module docstring) into `out_dir`; returns the image paths. Colours go round a shuffled palette so that every
    colour is seen. For the outline style every image has two objects (a style is seen on more objects per image),
    the first object's shape and size go round the shapes and sizes, and the second one's shape and colour are
    drawn. (A second colour going round the palette half a turn behind, each colour twice, did worse: session 13,
    68% against 74-76% on fresh seeds, two training seeds each.)"""
    _check_concept(concept)
    rng = seeded_rng("concept-dataset", concept, seed)
    colours = list(concept_colours(concept))
    rng.shuffle(colours)
    shapes = list(SHAPES)
    if concept == "outline":
        rng.shuffle(shapes)
    out, paths = Path(out_dir), []
    for i in range(n):
        colour = colours[i % len(colours)]
        if concept == "outline":
            spec, scene = _outline_example(rng, colour, shapes[i % len(shapes)], SIZES[i % len(SIZES)])
            image = render_concept_scene(concept, scene, resolution)
            caption = _style_caption(spec, token)
        else:
            background = rng.choice(concept_backgrounds(concept, colour))
            image = render_concept_image(concept, colour, background, rng, resolution)
            caption = concept_caption(concept, colour, token, background=background if rng.random() < 0.5 else None)
        path = out / f"{concept}_{i:03d}.png"
        _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        _atomic_write(path.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(caption + "\n", encoding="utf-8"))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class OutlinedObject:
    colour: str  # the fill's palette colour
    center: tuple[float, float]  # normalised (x, y) of the box centre
    radius: float  # normalised half of the larger box side
    band_share: float  # share of the edge pixels next to a dark (outline) pixel


def _depth_core(comp: np.ndarray, depth: int) -> np.ndarray:
    """The pixels of `comp` at least `depth` pixels in from its edge (or its deepest pixels, if none are)."""
    core = comp
    for _ in range(depth):
        inner = _erode(core)
        if not inner.any():
            return core
        core = inner
    return core


def _fill_holes(comp: np.ndarray) -> np.ndarray:
    """`comp` with every region it encloses (not connected to the image border outside it)."""
    outside = label_components(~comp)
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    return comp | ((outside >= 0) & ~np.isin(outside, border))


def _outlined(comp: np.ndarray, rgb: np.ndarray, lab: np.ndarray, darkest: np.ndarray, background: str,
              bg_lab: np.ndarray, band_px: int) -> OutlinedObject | None:
    """Read one foreground component: its fill (the lighter half of its core, past the band) and how much of its
    edge lies next to a pixel darker than both the fill and the background."""
    core = _depth_core(comp, band_px + 1)
    light = lab[core][:, 0] >= np.median(lab[core][:, 0])
    fill_lab = srgb_to_lab(np.median(rgb[core][light], axis=0))
    dark = min(bg_lab[0] - DARK_MARGIN, fill_lab[0] - DARK_MARGIN, DARK_MAX)
    edge = comp & ~_erode(comp)
    share = float((darkest[edge] < dark).mean())
    if share < BAND_SHARE:
        return None
    h, w = comp.shape
    ys, xs = np.nonzero(comp)
    x0, x1, y0, y1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
    return OutlinedObject(COLOURS[int(nearest_colour(fill_lab, exclude=background))], ((x0 + x1) / 2, (y0 + y1) / 2),
                          max(x1 - x0, y1 - y0) / 2, share)


def detect_outlines(image) -> list[OutlinedObject]:
    """The objects of an image that carry an outline band (see `_outlined`). Objects are the 4-connected strong
    foreground components (as the oracle seeds them, but not split by colour: band and fill are one object), with
    what they enclose (a fill much nearer the background than the band is not strong)."""
    rgb = to_rgb_array(image)
    lab = srgb_to_lab(rgb)
    background, bg_rgb, noise = _background(rgb, lab)
    if background is None:
        return []
    bg_lab = srgb_to_lab(bg_rgb)
    delta = np.linalg.norm(lab - bg_lab, axis=-1)
    strong = (delta > foreground_threshold(background, noise)) & (delta >= 0.5 * _max_filter(delta, 2))
    comps = label_components(strong)
    darkest = -_max_filter(-lab[..., 0], 1)  # the darkest L* in each 3x3 neighbourhood
    band_px = int(np.ceil(OUTLINE_WIDTH * max(rgb.shape[:2])))
    found = []
    for k in range(comps.max() + 1):
        comp = _fill_holes(comps == k)
        if comp.sum() >= MIN_AREA * comp.size:
            obj = _outlined(comp, rgb, lab, darkest, background, bg_lab, band_px)
            if obj is not None:
                found.append(obj)
    return found


def detect_concept(image, concept: str) -> list:
    """The objects of `image` that show `concept`: for 'ring' / 'crescent' the oracle's `DetectedObject`s read as
    that shape (with the concept templates among the candidates, error at most MAX_SHAPE_ERROR); for 'outline'
    the `OutlinedObject`s of `detect_outlines`."""
    if _check_concept(concept) == "outline":
        return detect_outlines(image)
    if concept == "ring":
        return detect_rings(image)
    return [o for o in analyze(image, SHAPES + CONCEPT_SHAPES).objects
            if o.shape == concept and o.shape_error <= MAX_SHAPE_ERROR]


def ring_hole(alpha: np.ndarray) -> bool:
    """Whether an object's coverage window shows a ring by its hole: a round object (with what it encloses filled
    in, the world's circle fits it best, within MAX_SHAPE_ERROR) around an enclosed hole of at least RING_MIN_HOLE
    of its filled area, whose centre lies within RING_MAX_OFFSET of its radius from the object's centre. The ring
    is its pixels of coverage at least one of RING_SOLID (the higher finds a hole a soft blur half fills, the lower
    closes a ring with one faint side). Any concentric hole size counts, not only the RING_HOLE the renderer
    draws: a thick ring with a small hole is still a ring, a disc with a speck or a notch is not."""
    return any(_ring_at(alpha, level) for level in RING_SOLID)


def _ring_at(alpha: np.ndarray, level: float) -> bool:
    solid = np.pad(alpha >= level, 1)
    filled = _fill_holes(solid)
    holes = label_components(filled & ~solid)
    if holes.max() < 0:
        return False
    sizes = np.bincount(holes[holes >= 0])
    hole = holes == int(sizes.argmax())
    area = float(filled.sum())
    if hole.sum() < RING_MIN_HOLE * area or hole.sum() < 2:
        return False
    ys, xs = np.nonzero(filled)
    hy, hx = np.nonzero(hole)
    offset = np.hypot(hx.mean() - xs.mean(), hy.mean() - ys.mean())
    if offset > RING_MAX_OFFSET * np.sqrt(area / np.pi):
        return False
    shape, error, _ = classify_shape(np.where(filled & ~solid, 1.0, np.pad(alpha, 1))[1:-1, 1:-1], SHAPES)
    return shape == "circle" and error <= MAX_SHAPE_ERROR


def detect_rings(image) -> list[DetectedObject]:
    """The oracle's objects of `image` that are rings: read as the ring template (among the world's shapes and the
    concept shapes), or round with a concentric hole of any size (`ring_hole`)."""
    background, rgb, bg_rgb, labels = object_regions(image)
    if background is None:
        return []
    found = []
    for k in range(labels.max() + 1):
        coverage = object_coverage(labels == k, background, rgb, bg_rgb)
        obj = _describe(coverage, labels.shape, SHAPES + CONCEPT_SHAPES)
        if obj.shape == "ring" or ring_hole(coverage[1]):
            found.append(obj)
    return found


def concept_score(image, concept: str, colour: str) -> bool:
    """Whether `image` shows `concept` in `colour` (an object of that colour that is a ring / crescent, or that is
    outlined)."""
    return any(o.colour == colour for o in detect_concept(image, concept))


# ---------------------------------------------------------------------------------------------------- evaluation

class ConceptPrompt(NamedTuple):
    prompt: str
    colour: str


def concept_prompts(concept: str, token: str = "sks", n: int = 100) -> list[ConceptPrompt]:
    """`n` distinct (prompt, colour) pairs for `concept` with the trigger `token`, deterministic: colours in turn
    (balanced), each with a stated background or none; outline prompts also go round the world's shapes."""
    colours = concept_colours(concept)
    rng = seeded_rng("concept-prompts", concept)
    backgrounds = {}
    for c in colours:
        backgrounds[c] = [None, *concept_backgrounds(concept, c)]
        rng.shuffle(backgrounds[c])
    out = []
    for k in range(n):
        colour = colours[k % len(colours)]
        options = backgrounds[colour]
        background = options[(k // len(colours)) % len(options)]
        shape = SHAPES[k % len(SHAPES)] if concept == "outline" else None
        out.append(ConceptPrompt(concept_caption(concept, colour, token, shape, background), colour))
    return out


def evaluate_concept(images_by_prompt: list, concept: str, prompts: list[ConceptPrompt]) -> dict:
    """Score generated images (one image or a list of them per prompt, aligned with `prompts`). Claims per image:
    'concept' (some object shows the concept) and 'colour' (one in the prompted colour: the image is correct).
    Returns an `oracle.summarize` summary for the suite 'concept-<concept>'."""
    if len(images_by_prompt) != len(prompts):
        raise ValueError(f"{len(images_by_prompt)} image lists for {len(prompts)} prompts")
    rows = []
    for i, (p, images) in enumerate(zip(prompts, images_by_prompt)):
        for seed, image in enumerate(images if isinstance(images, (list, tuple)) else [images]):
            colours = {o.colour for o in detect_concept(image, concept)}
            claims = {"concept": bool(colours), "colour": p.colour in colours}
            rows.append({"id": f"{concept}/{i:03d}", "prompt": p.prompt, "seed": seed,
                         "all_correct": claims["colour"], "claims": claims})
    return summarize(rows, f"concept-{concept}", len(prompts))
