"""Benchmark prompt suites for the shapes world, GenEval-style. Each prompt carries its claims as data
(`PromptSpec`), a canonical English text, and an id '<suite>/<nnn>'; everything is deterministic.

    single       one object: colour + shape (sometimes a size), every colour-shape pair seen in training
    heldout      one object whose colour-shape pair never appears in training (HELDOUT_PAIRS)
    two-objects  two different objects: both must appear with the right colours
    counting     two, three or four objects of one colour and shape: the count must be exact
    position     an absolute place (left, right, top, bottom, centre) or a relation between two objects
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from ..data.captions import canonical_text
from ..data.shapes import (COLOURS, HELDOUT_PAIRS, PLACES, RELATIONS, SHAPES, SIZES, ObjectSpec, PromptSpec, Relation,
                           Scene, render_scene, scene_from_prompt, seeded_rng)
from ..errors import unknown_name
from .oracle import scene_analysis, score

SUITE_NAMES = ("single", "heldout", "two-objects", "counting", "position")
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: tuple[PromptSpec, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def reference_scene(self, index: int, seed: int = 0) -> Scene:
        """A scene the world draws for prompt `index`: every claim true (for validating the oracle)."""
        return scene_from_prompt(self.prompts[index], seeded_rng("suite-reference", self.name, index, seed))

    def reference_image(self, index: int, resolution: int = 64, seed: int = 0) -> Image.Image:
        return render_scene(self.reference_scene(index, seed), resolution)


def _single(rng: random.Random) -> list[PromptSpec]:
    specs = [PromptSpec((ObjectSpec(s, c),)) for c, s in TRAIN_PAIRS]
    for c, s in rng.sample(TRAIN_PAIRS, 40):
        specs.append(PromptSpec((ObjectSpec(s, c, size=rng.choice(SIZES)),)))
    return specs


def _heldout(rng: random.Random) -> list[PromptSpec]:
    specs = []
    for c, s in HELDOUT_PAIRS:
        backgrounds = [None] + rng.sample([b for b in COLOURS if b != c], 4)
        specs += [PromptSpec((ObjectSpec(s, c, size=size),), background=bg) for size in (None,) + SIZES
                  for bg in backgrounds]
    return specs


def _distinct_pairs(rng: random.Random, n: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.sample(TRAIN_PAIRS, 2)
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            out.append((a, b))
    return out


def _two_objects(rng: random.Random) -> list[PromptSpec]:
    return [PromptSpec((ObjectSpec(sa, ca), ObjectSpec(sb, cb))) for (ca, sa), (cb, sb) in _distinct_pairs(rng, 100)]


def _counting(rng: random.Random) -> list[PromptSpec]:
    return [PromptSpec((ObjectSpec(s, c, count=n),)) for n in (2, 3, 4) for c, s in rng.sample(TRAIN_PAIRS, 35)]


def _position(rng: random.Random) -> list[PromptSpec]:
    specs = [PromptSpec((ObjectSpec(s, c, place=p),)) for p in PLACES for c, s in rng.sample(TRAIN_PAIRS, 10)]
    pairs = _distinct_pairs(rng, 15 * len(RELATIONS))
    for k, ((ca, sa), (cb, sb)) in enumerate(pairs):
        rel = RELATIONS[k % len(RELATIONS)]
        specs.append(PromptSpec((ObjectSpec(sa, ca), ObjectSpec(sb, cb)), Relation(0, rel, 1)))
    return specs


_BUILDERS = {"single": _single, "heldout": _heldout, "two-objects": _two_objects, "counting": _counting,
             "position": _position}


def get_suite(name: str) -> Suite:
    """The suite `name` (one of SUITE_NAMES); the same prompts, in the same order, every time."""
    if name not in _BUILDERS:
        raise unknown_name("suite", name, SUITE_NAMES, field="suite")
    specs = _BUILDERS[name](seeded_rng("suite", name))
    prompts = tuple(PromptSpec(s.objects, s.relation, s.background, text=canonical_text(s), id=f"{name}/{i:03d}")
                    for i, s in enumerate(specs))
    return Suite(name, prompts)


# ---------------------------------------------------------------------------------------------------- validation

_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
             "left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large", "large": "small"}


def _perturbations(spec: PromptSpec, scene: Scene, rng: random.Random) -> list[PromptSpec]:
    """Candidate prompts that differ from `spec` in one claim."""
    present = {(o.colour, o.shape) for o in scene.objects}
    out = []

    def replace(i: int, **changes):
        objs = list(spec.objects)
        objs[i] = ObjectSpec(**{**objs[i].__dict__, **changes})
        return PromptSpec(tuple(objs), spec.relation, spec.background)

    for i, o in enumerate(spec.objects):
        colours = [c for c in COLOURS if (c, o.shape) not in present and c != scene.background]
        shapes = [s for s in SHAPES if (o.colour, s) not in present]
        out.append(replace(i, colour=rng.choice(colours)))
        out.append(replace(i, shape=rng.choice(shapes)))
        if o.count > 1:
            out.append(replace(i, count=rng.choice([n for n in (2, 3, 4) if n != o.count])))
        if o.size is not None:
            out.append(replace(i, size=_OPPOSITE[o.size]))
        if o.place is not None:
            out.append(replace(i, place=_OPPOSITE.get(o.place, rng.choice(("left", "right", "top", "bottom")))))
    if spec.relation is not None:
        r = spec.relation
        out.append(PromptSpec(spec.objects, Relation(r.a, _OPPOSITE[r.rel], r.b), spec.background))
    return out


def wrong_prompt(spec: PromptSpec, scene: Scene, rng: random.Random) -> PromptSpec:
    """A prompt like `spec` with one claim changed so that `scene` makes it false (checked on the ground truth).

    Prefers the claims the suite is about (count, place, relation) when the prompt has them.
    """
    candidates = []
    for p in _perturbations(spec, scene, rng):
        try:
            p = PromptSpec(p.objects, p.relation, p.background, text=canonical_text(p), id=spec.id)
        except ValueError:
            continue  # e.g. the new colour collides with another group
        if not score(scene_analysis(scene), p)["all_correct"]:
            candidates.append(p)
    focused = [p for p in candidates if _changed_kind(spec, p) in ("count", "place", "relation")]
    return rng.choice(focused or candidates)


def _changed_kind(a: PromptSpec, b: PromptSpec) -> str:
    if a.relation != b.relation:
        return "relation"
    for x, y in zip(a.objects, b.objects):
        for kind in ("count", "place", "size", "colour", "shape"):
            if getattr(x, kind) != getattr(y, kind):
                return kind
    return "background"
