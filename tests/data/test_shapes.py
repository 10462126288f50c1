"""The shapes world: determinism, scene invariants, held-out pairs, captions and the caption parser."""

import random
from collections import Counter

import numpy as np
import pytest

from sdstack.data import captions as cap
from sdstack.data.shapes import (BORDER, GAP, HELDOUT_PAIRS, PALETTE, SHAPES, SIZE_RADIUS, ObjectSpec, PromptSpec,
                                 Relation, ShapesWorld, parse_caption, random_spec, render_caption, render_scene,
                                 scene_from_prompt, seeded_rng)
from sdstack.errors import UserError

ISSUE_PALETTE = {  # as written in the issue, independent of the code
    "red": "#E02828", "orange": "#F58C1E", "yellow": "#F0D228", "green": "#28AA3C", "cyan": "#28C8DC",
    "blue": "#2850DC", "purple": "#8C3CBE", "pink": "#F582BE", "white": "#F5F5F5", "black": "#141414",
    "gray": "#808080",
}


def _rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def samples():
    world = ShapesWorld(64, seed=3, split="all")
    return [world.spec(i) for i in range(600)]


def test_palette_and_shapes_are_the_issues():
    assert PALETTE == ISSUE_PALETTE
    assert {"circle", "square", "triangle", "star", "hexagon", "heart", "cross"} <= set(SHAPES)


def test_sample_is_deterministic_per_seed_and_index():
    a, b = ShapesWorld(64, seed=5), ShapesWorld(64, seed=5)
    for i in (0, 1, 17, 10**9):
        (ia, ca, sa), (ib, cb, sb) = a.sample(i), b.sample(i)
        assert ca == cb and sa == sb and ia.tobytes() == ib.tobytes()
    other = ShapesWorld(64, seed=6)
    assert any(other.sample(i)[1] != a.sample(i)[1] for i in range(10))
    assert len({a.sample(i)[1] for i in range(20)}) > 15  # indices differ from each other


def test_resolutions_share_the_scene_and_bad_ones_are_refused():
    for res in (32, 64, 136, 256):
        image, caption, scene = ShapesWorld(res, seed=1).sample(7)
        assert image.size == (res, res) and image.mode == "RGB"
        assert (caption, scene) == ShapesWorld(64, seed=1).sample(7)[1:]
    for bad in (30, 33, 264, 0, "64", 64.0):
        with pytest.raises(UserError):
            ShapesWorld(bad)
    with pytest.raises(UserError):
        ShapesWorld(64, split="test")


def test_scene_invariants(samples):
    sizes = Counter()
    for spec, scene in samples:
        assert 1 <= len(scene.objects) <= 4
        assert len(scene.objects) == spec.n_objects  # the caption names every object
        for k, o in enumerate(scene.objects):
            assert o.colour != scene.background
            x0, y0, x1, y1 = o.bbox
            assert BORDER - 1e-9 <= min(x0, y0) and max(x1, y1) <= 1 - BORDER + 1e-9
            lo, hi = SIZE_RADIUS[o.size]
            assert lo <= o.radius <= hi
            sizes[o.size] += 1
            for other in scene.objects[k + 1:]:
                ox0, oy0, ox1, oy1 = other.bbox
                assert x1 + GAP <= ox0 + 1e-9 or ox1 + GAP <= x0 + 1e-9 or y1 + GAP <= oy0 + 1e-9 or \
                    oy1 + GAP <= y0 + 1e-9
    assert min(sizes.values()) > 200


def test_train_split_never_shows_heldout_pairs_and_heldout_always_does():
    train, heldout, every = ShapesWorld(seed=0), ShapesWorld(seed=0, split="heldout"), ShapesWorld(seed=0, split="all")
    for i in range(1500):
        assert not {(o.colour, o.shape) for o in train.spec(i)[1].objects} & set(HELDOUT_PAIRS)
    for i in range(300):
        assert {(o.colour, o.shape) for o in heldout.spec(i)[1].objects} & set(HELDOUT_PAIRS)
    seen = {(o.colour, o.shape) for i in range(1500) for o in every.spec(i)[1].objects}
    assert set(HELDOUT_PAIRS) <= seen
    assert len(HELDOUT_PAIRS) >= 5
    # every colour and every shape still appears in training, in other combinations
    train_pairs = {(o.colour, o.shape) for i in range(1500) for o in train.spec(i)[1].objects}
    assert {c for c, _ in train_pairs} == set(PALETTE) and {s for _, s in train_pairs} == set(SHAPES)


def test_captions_are_true_of_their_scenes(samples):
    from sdstack.eval.oracle import scene_analysis, score

    for spec, scene in samples:
        parsed = parse_caption(spec.text)
        assert parsed == spec
        claims = score(scene_analysis(scene), parsed)
        assert claims["all_correct"], (spec.text, scene, claims)


def test_captions_cover_the_issues_kinds(samples):
    texts = [spec.text for spec, _ in samples]
    joined = " ".join(texts)
    for words in ("small", "large|big", "two", "three", "four", "background", "left of", "right of", "above", "below"):
        assert any(w in joined for w in words.split("|")), words
    specs = [s for s, _ in samples]
    assert {o.place for s in specs for o in s.objects} >= set(cap.PLACES)
    assert {s.relation.rel for s in specs if s.relation} == set(cap.RELATIONS)
    assert {o.count for s in specs for o in s.objects} == {1, 2, 3, 4}
    assert len(set(texts)) > 0.95 * len(texts)  # varied wording
    assert any(t.startswith("there ") for t in texts) and any(t.startswith("a picture of") for t in texts)


def test_kind_weights_set_the_mix_and_default_to_the_worlds():
    def kinds(world, n=400):
        out = Counter()
        for i in range(n):
            spec = world.spec(i)[0]
            counts = [o.count for o in spec.objects]
            out["relation" if spec.relation else "single" if len(spec.objects) == 1 and counts == [1] else "other"] += 1
        return out

    plain = ShapesWorld(64, seed=5)
    assert [plain.spec(i)[0] for i in range(50)] == [ShapesWorld(64, seed=5, kind_weights=(.3, .2, .2, .15, .15))
                                                     .spec(i)[0] for i in range(50)]  # the documented default mix
    only_rel = kinds(ShapesWorld(64, seed=5, kind_weights=(0, 1, 0, 0, 0)))
    assert only_rel == {"relation": 400}
    leaning = kinds(ShapesWorld(64, seed=5, kind_weights=(0.1, 0.6, 0.1, 0.1, 0.1)))
    assert 0.5 < leaning["relation"] / 400 < 0.7  # binomial(400, 0.6): 0.6 +- 0.025 sd
    base = kinds(plain)
    assert 0.14 < base["relation"] / 400 < 0.26
    with pytest.raises(UserError, match="single, relation, counting, two, list"):
        ShapesWorld(64, kind_weights=(1, 1))


def test_parse_caption_round_trips_every_template_and_synonym():
    rng = random.Random(0)
    used = Counter()
    for i in range(400):
        spec = random_spec(rng, "all")
        for template in cap.TEMPLATES:
            text = render_caption(spec, rng, template)
            used.update(text.split())
            assert parse_caption(text) == spec, text
        assert parse_caption(render_caption(spec)) == spec
    for table in (cap.COLOUR_WORDS, cap.SIZE_WORDS):
        for words in table.values():
            assert all(used[w] for w in words), words
    assert used["discs"] and used["plus"] and used["beneath"] and used["middle"]


@pytest.mark.parametrize("text, expected", [
    ("a small red circle on the left", PromptSpec((ObjectSpec("circle", "red", size="small", place="left"),))),
    ("two blue squares on a white background", PromptSpec((ObjectSpec("square", "blue", count=2),), None, "white")),
    ("a yellow star above a green heart",
     PromptSpec((ObjectSpec("star", "yellow"), ObjectSpec("heart", "green")), Relation(0, "above", 1))),
    ("A red star on a blue background.", PromptSpec((ObjectSpec("star", "red"),), None, "blue")),
    ("an orange plus sign, two grey dots, and a big cyan hexagon",
     PromptSpec((ObjectSpec("cross", "orange"), ObjectSpec("circle", "gray", 2),
                 ObjectSpec("hexagon", "cyan", 1, "large")))),
])
def test_parse_caption_examples(text, expected):
    assert parse_caption(text) == expected


@pytest.mark.parametrize("text", ["a dog", "two red circle", "a red circle and a red circle", "a red blob",
                                  "a red circle on a red background", "five red circles"])
def test_parse_caption_refuses_what_the_templates_never_write(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_rendering_is_antialiased_and_in_the_right_colours():
    spec = PromptSpec((ObjectSpec("circle", "red", size="large", place="centre"),), None, "blue")
    scene = scene_from_prompt(spec, seeded_rng("test"))
    arr = np.asarray(render_scene(scene, 64)).reshape(-1, 3)
    colours = Counter(map(tuple, arr))
    red, blue = _rgb(PALETTE["red"]), _rgb(PALETTE["blue"])
    assert colours[red] > 300 and colours[blue] > 2000
    mixed = sum(n for c, n in colours.items() if c not in (red, blue))
    assert mixed > 40  # soft edges, not a hard two-colour mask
    # coverage (each pixel's share of red on the blue->red line) matches the disc's area
    axis = np.subtract(red, blue)
    coverage = np.clip((arr - blue) @ axis / (axis @ axis), 0, 1)
    assert coverage.sum() / 64**2 == pytest.approx(np.pi * scene.objects[0].radius ** 2, rel=0.02)
    cx, cy = scene.objects[0].center
    assert tuple(np.asarray(render_scene(scene, 64))[int(cy * 64), int(cx * 64)]) == red


def test_detail_images_band_every_object_in_another_colour_and_keep_the_caption():
    plain, detailed = ShapesWorld(64, seed=5), ShapesWorld(64, seed=5, detail_share=0.5, detail_widths=(2.0, 2.0))
    palette = {name: np.asarray(_rgb(h)) for name, h in PALETTE.items()}
    changed = 0
    for i in range(80):
        (a, cap_a, scene), (b, cap_b, _) = plain[i], detailed[i]
        assert cap_a == cap_b  # the caption never mentions the band
        a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
        if (a == b).all():
            continue
        changed += 1
        for obj in scene.objects:  # along the row through the object's centre: its fill, and a band of a
            row = b[int(obj.center[1] * 64)]  # third palette colour (neither the fill's nor the background's)
            if obj.radius > 0.15:  # (a small star's core is all band)
                assert (np.abs(row - palette[obj.colour]).sum(axis=1) < 10).any(), (i, obj)
            others = [n for n in PALETTE if n not in (obj.colour, scene.background)]
            assert any((np.abs(row - palette[n]).sum(axis=1) < 10).any() for n in others), (i, obj)
        assert (np.abs(a - b).sum(axis=2) > 0).mean() < 0.5  # only the objects' edges change
    assert 25 <= changed <= 55  # detail_share 0.5 of 80 images
    with pytest.raises(UserError):
        ShapesWorld(64, detail_share=2.0)


def test_scene_from_prompt_makes_crowded_prompts_fit():
    spec = PromptSpec((ObjectSpec("heart", "yellow", count=4, size="large"),))
    for k in range(10):
        scene = scene_from_prompt(spec, seeded_rng("crowd", k))
        assert len(scene.objects) == 4 and all(o.size == "large" for o in scene.objects)
