"""Words of the shapes world: the structured claims of a caption, caption templates, and the caption parser.

A caption is rendered from a `PromptSpec` (the claims as data) by one of `TEMPLATES`, with synonyms drawn from
`random.Random`; `parse_caption` recovers the same `PromptSpec` from any caption the templates produce. Nothing
here knows about pixels (see `sdstack.data.shapes`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# Canonical names. The palette (hex values) lives in sdstack.data.shapes, keyed by these names.
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart", "cross")
SIZES = ("small", "large")
PLACES = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4

# Synonyms; the first of each list is the canonical word used by `canonical_text`.
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"gray": ("gray", "grey")}
SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "hexagon": (("hexagon", "hexagons"),),
    "heart": (("heart", "hearts"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",), 4: ("four",)}
PLACE_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS = ("on {} background", "against {} background", "with {} background", "over {} background")
PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "a simple drawing of ")


@dataclass(frozen=True)
class ObjectSpec:
    """One group of identical objects a caption names: `count` objects of this colour and shape."""

    shape: str
    colour: str
    count: int = 1
    size: str | None = None  # None: the caption does not say
    place: str | None = None  # None: the caption does not say; only used with count == 1

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.size, SIZES + (None,), "size")
        _check(self.place, PLACES + (None,), "place")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be 1..{MAX_OBJECTS}, got {self.count}")
        if self.place is not None and self.count != 1:
            raise ValueError("a place is only claimed for a single object")


@dataclass(frozen=True)
class Relation:
    """`objects[a]` is `rel` `objects[b]` (both groups have count 1)."""

    a: int
    rel: str
    b: int

    def __post_init__(self):
        _check(self.rel, RELATIONS, "relation")


@dataclass(frozen=True)
class PromptSpec:
    """The claims of a caption, as data. `text` is not part of equality: two captions with the same claims are equal."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None
    background: str | None = None
    text: str = field(default="", compare=False)
    id: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        _check(self.background, COLOURS + (None,), "background")
        if not 1 <= self.n_objects <= MAX_OBJECTS:
            raise ValueError(f"a prompt names 1..{MAX_OBJECTS} objects, got {self.n_objects}")
        pairs = [(o.colour, o.shape) for o in self.objects]
        if len(set(pairs)) != len(pairs):
            raise ValueError("each colour-shape pair appears in one group only")
        if self.background is not None and any(o.colour == self.background for o in self.objects):
            raise ValueError("objects never share the background's colour")
        if self.relation is not None:
            r = self.relation
            if len(self.objects) != 2 or {r.a, r.b} != {0, 1} or any(o.count != 1 for o in self.objects):
                raise ValueError("a relation links the two single objects of a two-object prompt")

    @property
    def n_objects(self) -> int:
        return sum(o.count for o in self.objects)


def _check(value, valid, what):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


# ---------------------------------------------------------------------------------------------------- rendering

def _pick(rng: random.Random | None, options):
    return options[0] if rng is None else rng.choice(options)


def object_phrase(o: ObjectSpec, rng: random.Random | None = None) -> str:
    """'a small red circle on the left', 'three blue squares'."""
    words = [_pick(rng, COUNT_WORDS[o.count])]
    if o.size:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    words.append(_pick(rng, COLOUR_WORDS[o.colour]))
    words.append(_pick(rng, SHAPE_WORDS[o.shape])[0 if o.count == 1 else 1])
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    if o.place:
        words.append(_pick(rng, PLACE_WORDS[o.place]))
    return " ".join(words)


def _join(phrases: list[str], rng: random.Random | None) -> str:
    if len(phrases) == 1:
        return phrases[0]
    last = _pick(rng, (" and ", ", and ")) if len(phrases) > 2 else " and "
    return ", ".join(phrases[:-1]) + last + phrases[-1]


def _body(spec: PromptSpec, rng: random.Random | None) -> str:
    if spec.relation is not None:
        r = spec.relation
        a, b = spec.objects[r.a], spec.objects[r.b]
        return f"{object_phrase(a, rng)} {_pick(rng, RELATION_WORDS[r.rel])} {object_phrase(b, rng)}"
    return _join([object_phrase(o, rng) for o in spec.objects], rng)


def _there(spec: PromptSpec, rng, body: str) -> str:
    verb = "is" if spec.objects[0].count == 1 else "are"
    return f"there {verb} {body}"


TEMPLATES = {
    "plain": lambda spec, rng, body: body,
    "prefix": lambda spec, rng, body: _pick(rng, PREFIXES) + body,
    "there": _there,
}


def render_caption(spec: PromptSpec, rng: random.Random | None = None, template: str | None = None) -> str:
    """English caption for `spec`; `rng=None` gives the canonical (first-synonym, plain) wording."""
    if template is None:
        template = "plain" if rng is None else rng.choice(tuple(TEMPLATES))
    text = TEMPLATES[template](spec, rng, _body(spec, rng))
    if spec.background is not None:
        word = _pick(rng, COLOUR_WORDS[spec.background])
        text += " " + _pick(rng, BACKGROUND_WORDS).format(("an " if word[0] in "aeiou" else "a ") + word)
    return text


def canonical_text(spec: PromptSpec) -> str:
    return render_caption(spec, None, "plain")


# ---------------------------------------------------------------------------------------------------- parsing

def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _inverse(table: dict) -> dict[str, str]:
    out = {}
    for key, words in table.items():
        for w in words:
            for x in (w if isinstance(w, tuple) else (w,)):
                out[x] = key
    return out


_COLOUR_OF = _inverse(COLOUR_WORDS)
_SHAPE_OF = _inverse(SHAPE_WORDS)
_SIZE_OF = _inverse(SIZE_WORDS)
_COUNT_OF = _inverse(COUNT_WORDS) | {"an": 1}
_PLACE_OF = _inverse(PLACE_WORDS)
_RELATION_OF = _inverse(RELATION_WORDS)

_OBJECT_RE = (rf"(?P<count{{n}}>{_alternation(_COUNT_OF)}) (?:(?P<size{{n}}>{_alternation(_SIZE_OF)}) )?"
              rf"(?P<colour{{n}}>{_alternation(_COLOUR_OF)}) (?P<shape{{n}}>{_alternation(_SHAPE_OF)})"
              rf"(?: (?P<place{{n}}>{_alternation(_PLACE_OF)}))?")
_BACKGROUND_RE = re.compile(
    "(?P<head>.*?) (?:" + "|".join(w.format(rf"an? (?P<bg{i}>{_alternation(_COLOUR_OF)})")
                                   for i, w in enumerate(BACKGROUND_WORDS)) + ")$")
_PREFIX_RE = re.compile(rf"^(?:{_alternation([p.strip() for p in PREFIXES])}|there is|there are) ")
_LIST_SPLIT_RE = re.compile(r", and |, | and ")
_RELATION_RE = re.compile(f"^{_OBJECT_RE.format(n=0)} (?P<rel>{_alternation(_RELATION_OF)}) {_OBJECT_RE.format(n=1)}$")
_SINGLE_RE = re.compile(f"^{_OBJECT_RE.format(n=0)}$")


def _object_from(m: re.Match, n: int) -> ObjectSpec:
    g = m.groupdict()
    shape_word = g[f"shape{n}"]
    count = _COUNT_OF[g[f"count{n}"]]
    plural = any(shape_word == words[1] for table in SHAPE_WORDS.values() for words in table)
    if plural != (count > 1):
        raise ValueError(f"count and noun disagree in {m.group(0)!r}")
    return ObjectSpec(shape=_SHAPE_OF[shape_word], colour=_COLOUR_OF[g[f"colour{n}"]], count=count,
                      size=_SIZE_OF.get(g[f"size{n}"]), place=_PLACE_OF.get(g[f"place{n}"]))


def parse_caption(text: str) -> PromptSpec:
    """Recover the claims of a caption written by `render_caption` (any template, any synonyms).

    Raises ValueError for text outside the templates' grammar.
    """
    s = " ".join(text.lower().strip().rstrip(".").split())
    background = None
    m = _BACKGROUND_RE.match(s)
    if m:
        word = next(v for k, v in m.groupdict().items() if k.startswith("bg") and v)
        background, s = _COLOUR_OF[word], m.group("head")
    s = _PREFIX_RE.sub("", s, count=1)
    m = _RELATION_RE.match(s)
    if m:
        objects = (_object_from(m, 0), _object_from(m, 1))
        return PromptSpec(objects, Relation(0, _RELATION_OF[m.group("rel")], 1), background, text=text)
    objects = []
    for part in _LIST_SPLIT_RE.split(s):
        m = _SINGLE_RE.match(part)
        if not m:
            raise ValueError(f"not a shapes-world caption: {text!r} (cannot read {part!r})")
        objects.append(_object_from(m, 0))
    return PromptSpec(tuple(objects), None, background, text=text)
