"""Concepts the world never shows (sdstack/eval/concepts.py): rendering checked against plain Pillow drawings,
detection rates on the concepts' own images (clean and degraded), false positives on the world's images and on
noise, the training-set writer, the prompt sets, scoring, and `sdstack eval --concept` on a tiny random model."""

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFilter

from sdstack.data.shapes import (COLOURS, PALETTE, PLACES, SHAPES, SIZES, ObjectSpec, PromptSpec, Scene, SceneObject,
                                 ShapesWorld, in_place, parse_caption, render_scene, scene_from_prompt, size_of)
from sdstack.errors import UserError
from sdstack.eval.concepts import (CONCEPTS, concept_backgrounds, concept_colours, concept_dataset, concept_prompts,
                                   concept_scene, concept_score, detect_concept, evaluate_concept,
                                   render_concept_image, render_concept_scene)
from sdstack.eval.oracle import analyze

RGB = {name: np.array([int(h[i:i + 2], 16) for i in (1, 3, 5)]) for name, h in PALETTE.items()}


def degrade(image, rng, blur=0.9, noise=5.0, shift=8.0):
    """What a small decoder does to an image (as in test_oracle): blur, per-pixel noise, a colour shift."""
    image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float64)
    arr = arr + rng.normal(0, noise, arr.shape) + rng.uniform(-shift, shift, 3)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def colour_pairs(concept):
    """Every (object colour, background) pair the concept uses, with a random size, place and shape each."""
    rng = random.Random(f"pairs-{concept}")
    for colour in concept_colours(concept):
        for background in concept_backgrounds(concept, colour):
            yield colour, background, rng.choice(SIZES), rng.choice((None,) + PLACES), rng.choice(SHAPES), rng


@pytest.fixture(scope="module")
def concept_images():
    """Per concept: [(image, colour)] over every colour pair."""
    return {c: [(render_concept_image(c, colour, bg, rng, place=place, size=size, shape=shape), colour)
                for colour, bg, size, place, shape, rng in colour_pairs(c)] for c in CONCEPTS}


@pytest.fixture(scope="module")
def world_singles():
    """[(image, colour, shape)]: single world objects, every shape and colour, circles three times as often."""
    rng = random.Random("world-singles")
    out = []
    for k in range(90):
        shape = SHAPES[k % len(SHAPES)] if k % 3 else "circle"
        colour = COLOURS[k % len(COLOURS)]
        spec = PromptSpec((ObjectSpec(shape, colour, size=rng.choice(SIZES)),))
        out.append((render_scene(scene_from_prompt(spec, rng), 64), colour, shape))
    return out


# ------------------------------------------------------------------------------------------------ rendering

def _exact(inside, colour, background, res=64, ss=8):
    """An exact reference drawing: the share of an ss x ss grid of points per pixel that `inside(x, y)` (normalised
    coordinates) holds for, blending the two palette colours."""
    g = (np.arange(res * ss) + 0.5) / (res * ss)
    x, y = np.meshgrid(g, g)
    cover = inside(x, y).reshape(res, ss, res, ss).mean((1, 3))[..., None]
    return cover * RGB[colour] + (1 - cover) * np.asarray(RGB[background], float)


@pytest.mark.parametrize("concept", ["ring", "crescent"])
def test_ring_and_crescent_match_exact_drawings(concept):
    for k, (colour, background) in enumerate((("red", "white"), ("yellow", "blue"), ("black", "gray"))):
        for size in SIZES:
            scene = concept_scene(concept, colour, background, random.Random(k), size=size)
            (obj,) = scene.objects
            assert obj.shape == concept and obj.colour == colour and size_of(obj.radius) == size
            r = obj.radius
            if concept == "ring":  # concentric, the hole half the outer radius
                (cx, cy), inner, offset = obj.center, 0.5 * r, 0.0
            else:  # the circle minus a circle of radius 0.85 offset 0.5 radii right; box x: [-1, horn], y: [-1, 1]
                horn = (1 - 0.85 ** 2 + 0.5 ** 2) / (2 * 0.5)
                (cx, cy), inner, offset = (obj.center[0] + (1 - horn) / 2 * r, obj.center[1]), 0.85 * r, 0.5 * r
            exact = _exact(lambda x, y: (np.hypot(x - cx, y - cy) <= r) & (np.hypot(x - cx - offset, y - cy) > inner),
                           colour, background)
            disc = _exact(lambda x, y: np.hypot(x - cx, y - cy) <= r, colour, background)
            image = np.asarray(render_scene(scene, 64), float)
            error = np.abs(image - exact).mean()
            assert error < 1.0 and np.abs(image - disc).mean() > 3 * error, (colour, size, error)


def _shares(pixels, colours):
    """Least-squares shares of each palette colour in each pixel (shares sum to 1)."""
    basis = np.asarray([RGB[c] for c in colours], float)
    a = np.vstack([basis.T, np.ones(len(colours))])
    return np.linalg.lstsq(a, np.vstack([np.asarray(pixels, float).T, np.ones(len(pixels))]), rcond=None)[0].T


def test_outline_is_a_dark_band_around_the_objects_edge():
    scene = Scene("white", (SceneObject("square", "yellow", (0.5, 0.5), 0.25),))  # box: pixels 16 to 47
    row = _shares(np.asarray(render_concept_scene("outline", scene))[32], ("white", "black", "yellow"))
    plain = _shares(np.asarray(render_scene(scene, 64))[32], ("white", "yellow"))
    np.testing.assert_allclose(row[:, 2], plain[:, 1], atol=0.02)  # the object keeps all of what the world draws
    assert row[:16, 1].sum() == pytest.approx(2, abs=0.05) and row[48:, 1].sum() == pytest.approx(2, abs=0.05)
    assert row[[14, 48, 49], 1].min() > 0.95 and row[14:50, 0].max() < 0.02  # the band hugs the fill, no gap
    np.testing.assert_allclose(row[list(range(13)) + list(range(50, 64)), 0], 1, atol=0.02)  # then the background
    one = render_concept_image("outline", "red", "white", random.Random(0), size="large", shape="star")
    again = render_concept_image("outline", "red", "white", random.Random(0), size="large", shape="star")
    assert np.array_equal(np.asarray(one), np.asarray(again))  # deterministic for a given rng


def test_concept_scenes_follow_the_worlds_rules():
    rng = random.Random(1)
    for concept in CONCEPTS:
        for place in PLACES:
            for size in SIZES:
                colour = rng.choice(concept_colours(concept))
                scene = concept_scene(concept, colour, None, rng, place=place, size=size)
                (obj,) = scene.objects
                assert in_place(*obj.center, place) and size_of(obj.radius) == size
                assert scene.background != colour and scene.background in COLOURS
                x0, y0, x1, y1 = obj.bbox
                assert min(x0, y0) > 0 and max(x1, y1) < 1
                if concept == "outline":
                    assert "black" not in (colour, scene.background) and obj.shape in SHAPES


def test_bad_concepts_and_colours_are_refused():
    with pytest.raises(UserError, match="ring"):
        render_concept_image("square-ring", "red", "white", random.Random(0))
    with pytest.raises(ValueError, match="background"):
        render_concept_image("ring", "red", "red", random.Random(0))
    with pytest.raises(ValueError, match="black"):
        render_concept_image("outline", "black", "white", random.Random(0))
    with pytest.raises(ValueError, match="background"):
        render_concept_image("outline", "red", "black", random.Random(0))
    assert "black" not in concept_colours("outline") and "black" in concept_colours("ring")


# ------------------------------------------------------------------------------------------------ detection

@pytest.mark.parametrize("concept", CONCEPTS)
def test_detects_each_concept_on_its_own_images(concept_images, concept):
    items = concept_images[concept]
    assert len(items) >= 90
    hits = [concept_score(image, concept, colour) for image, colour in items]
    assert np.mean(hits) >= 0.97, [c for (_, c), ok in zip(items, hits) if not ok]
    rng = np.random.default_rng(0)
    assert np.mean([concept_score(degrade(image, rng), concept, colour) for image, colour in items[::2]]) >= 0.9


@pytest.mark.parametrize("concept", CONCEPTS)
def test_a_concept_in_another_colour_is_not_scored(concept_images, concept):
    wrong = [concept_score(image, concept, next(c for c in concept_colours(concept) if c != colour))
             for image, colour in concept_images[concept][::3]]
    assert np.mean(wrong) <= 0.05


@pytest.mark.parametrize("concept", CONCEPTS)
def test_world_images_are_not_the_concept(world_singles, concept):
    fp = [concept_score(image, concept, colour) for image, colour, _ in world_singles]
    assert np.mean(fp) <= 0.05, [(c, s) for (_, c, s), bad in zip(world_singles, fp) if bad]
    rng = np.random.default_rng(1)
    assert np.mean([concept_score(degrade(im, rng), concept, c) for im, c, _ in world_singles[::2]]) <= 0.05
    circles = [concept_score(im, concept, c) for im, c, s in world_singles if s == "circle"]
    assert len(circles) >= 30 and np.mean(circles) <= 0.05
    world = ShapesWorld(64, seed=3, split="all")  # scenes of 1 to 4 objects
    assert np.mean([bool(detect_concept(world.sample(i)[0], concept)) for i in range(40)]) <= 0.05


@pytest.mark.parametrize("concept", CONCEPTS)
def test_noise_is_not_the_concept(concept):
    rng = np.random.default_rng(2)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    blobs = [Image.fromarray(np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8))
             for _ in range(10)]
    assert sum(bool(detect_concept(im, concept)) for im in noise + blobs) <= 1


def _drawn(draw, background="white"):
    """A 64x64 image drawn at 4x with plain Pillow by `draw(ImageDraw)` and box-downsampled."""
    big = Image.new("RGB", (256, 256), PALETTE[background])
    draw(ImageDraw.Draw(big))
    return big.resize((64, 64), Image.Resampling.BOX)


def test_independent_drawings_are_detected():
    """Drawn here with plain Pillow: a ring, a crescent moon and an outlined disc (4x, box-downsampled)."""
    def draw(d):
        d.ellipse((20, 20, 110, 110), fill=PALETTE["blue"])
        d.ellipse((43, 43, 87, 87), fill=PALETTE["white"])
        d.ellipse((150, 30, 230, 110), fill=PALETTE["red"])
        d.ellipse((170, 36, 238, 104), fill=PALETTE["white"])
        d.ellipse((60, 150, 150, 240), fill=PALETTE["green"], outline=PALETTE["black"], width=7)

    image = _drawn(draw)
    assert [o.colour for o in detect_concept(image, "ring")] == ["blue"]
    assert [o.colour for o in detect_concept(image, "crescent")] == ["red"]
    outlined = detect_concept(image, "outline")
    assert [o.colour for o in outlined] == ["green"]
    assert outlined[0].center == pytest.approx((105 / 256, 195 / 256), abs=0.02)
    # the ordinary oracle is unchanged: it still only names the world's shapes
    assert all(o.shape in SHAPES + ("unknown",) for o in analyze(image).objects)


def _disc_with_hole(hole, dx=0.0, outer=72, colour="blue", shape="ellipse"):
    """A disc (or square) of radius `outer` (4x pixels) at the centre, with a background hole of `hole` times its
    radius, offset `dx` radii to the right."""
    def draw(d):
        c = 128
        getattr(d, shape)((c - outer, c - outer, c + outer, c + outer), fill=PALETTE[colour])
        if hole:
            hx, r = c + dx * outer, hole * outer
            d.ellipse((hx - r, c - r, hx + r, c + r), fill=PALETTE["white"])
    return _drawn(draw)


@pytest.mark.parametrize("hole", [0.25, 0.35, 0.5, 0.7])
def test_a_ring_with_any_concentric_hole_is_a_ring(hole):
    """The renderer's rings have a hole of half the radius; thicker or thinner rings still show the concept."""
    assert [o.colour for o in detect_concept(_disc_with_hole(hole), "ring")] == ["blue"]
    small = _disc_with_hole(hole, outer=36, colour="red")  # a small ring: 9 px radius at 64x64
    assert [o.colour for o in detect_concept(small, "ring")] == ["red"]


@pytest.mark.parametrize("case", ["off-centre hole", "square with a hole", "speck", "notch", "plain disc"])
def test_holes_that_do_not_make_a_ring(case):
    image = {"off-centre hole": lambda: _disc_with_hole(0.3, dx=0.5),
             "square with a hole": lambda: _disc_with_hole(0.4, shape="rectangle"),
             "speck": lambda: _disc_with_hole(0.1),  # a hole of 1.8 px radius: 1% of the disc
             "notch": lambda: _drawn(lambda d: (d.ellipse((56, 56, 200, 200), fill=PALETTE["blue"]),
                                                d.rectangle((128, 110, 200, 146), fill=PALETTE["white"]))),
             "plain disc": lambda: _disc_with_hole(0.0)}[case]()
    assert detect_concept(image, "ring") == []
    assert [o.colour for o in analyze(image).objects] == ["blue"]  # the object itself is still found


# ------------------------------------------------------------------------------------------------ data, prompts, eval

@pytest.mark.parametrize("concept", CONCEPTS)
def test_concept_dataset_writes_images_and_captions(tmp_path, concept):
    paths = concept_dataset(concept, tmp_path / concept, n=10, seed=0, token="zwx")
    assert len(paths) == 10 and len({p.name for p in paths}) == 10
    assert sorted(p.name for p in (tmp_path / concept).iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".txt").name for p in paths])  # no temp files left
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
    colours, seconds, shapes = [], [], set()
    for path, caption in zip(paths, captions):
        image = Image.open(path)
        assert image.size == (64, 64) and image.format == "PNG"
        assert "zwx" in caption.split()
        if concept == "outline":
            assert caption.startswith("zwx style, ")  # the trigger first: every later word's encoding sees it
            spec = parse_caption(caption.removeprefix("zwx style, "))  # an ordinary world caption
            assert len(spec.objects) == 2 and spec.objects[0].shape != spec.objects[1].shape
            colour, second = spec.objects[0].colour, spec.objects[1].colour
            assert concept_score(image, concept, second), caption  # both objects carry the band
            seconds.append(second)
            shapes.add(spec.objects[0].shape)
        else:
            words = caption.split()
            assert words[2:4] == ["zwx", concept]
            colour = words[1]
        colours.append(colour)
        assert concept_score(image, concept, colour), caption
    assert len(set(colours)) == 10  # colours go round the palette
    if concept == "outline":  # a second object of another colour; every shape drawn outlined
        assert all(a != b for a, b in zip(colours, seconds)) and shapes == set(SHAPES)
    again = concept_dataset(concept, tmp_path / "again", n=10, seed=0, token="zwx")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    other = concept_dataset(concept, tmp_path / "other", n=3, seed=1, token="zwx")
    assert [p.read_bytes() for p in other] != [p.read_bytes() for p in paths[:3]]


@pytest.mark.parametrize("concept", CONCEPTS)
def test_concept_prompts(concept):
    prompts = concept_prompts(concept, "sks", n=100)
    assert len(prompts) == 100 and len({p.prompt for p in prompts}) == 100
    assert prompts == concept_prompts(concept, "sks", n=100)
    counts = {c: sum(p.colour == c for p in prompts) for c in concept_colours(concept)}
    assert min(counts.values()) >= 100 // len(counts) and set(counts) == {p.colour for p in prompts}
    for text, colour in prompts:
        if concept == "outline":
            assert text.startswith("sks style, ") and colour != "black"
            assert parse_caption(text.removeprefix("sks style, ")).objects[0].colour == colour
        else:
            assert f"{colour} sks {concept}" in text
    assert all("zwx" in p.prompt for p in concept_prompts(concept, "zwx", n=5))


def test_evaluate_concept_scores_the_share_that_shows_the_concept():
    prompts = concept_prompts("ring", n=8)
    rng = random.Random(0)
    good = [render_concept_image("ring", p.colour, None, rng) for p in prompts]
    world = ShapesWorld(64, seed=0, split="all")
    images = [[good[i], world.sample(i)[0]] if i % 2 else good[i] for i in range(8)]  # odd prompts: 2 images
    summary = evaluate_concept(images, "ring", prompts)
    assert summary["suite"] == "concept-ring" and summary["n_prompts"] == 8 and summary["n_images"] == 12
    assert summary["accuracy"] == pytest.approx(8 / 12)
    assert set(summary["claims"]) == {"concept", "colour"}
    swapped = evaluate_concept(good[1:] + good[:1], "ring", prompts)  # rings, but in other prompts' colours
    assert swapped["claims"]["concept"] == 1.0 and swapped["accuracy"] == 0.0
    with pytest.raises(ValueError, match="prompts"):
        evaluate_concept(good[:3], "ring", prompts)


def test_eval_cli_scores_a_concept_on_a_tiny_model(tmp_path):
    from sdstack.eval.cli import eval_command
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    model = save_diffusers_folder(tiny_bundle("sd1"), tmp_path / "tiny")
    out = tmp_path / "report"
    result = CliRunner().invoke(eval_command, ["--model", str(model), "--concept", "crescent", "--token", "sks",
                                               "--seeds", "2", "--limit", "2", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "suite concept-crescent" in result.output and "mean" in result.output
    report = json.loads((out / "concept-crescent.json").read_text())
    assert report["n_prompts"] == 2 and report["n_images"] == 4 and 0.0 <= report["accuracy"] <= 1.0
    assert report["settings"] == {"steps": 1, "seeds": 2, "token": "sks"}
    assert [r["prompt"] for r in report["results"][::2]] == [p.prompt for p in concept_prompts("crescent", n=2)]
    assert [s["suite"] for s in json.loads((out / "summary.json").read_text())] == ["concept-crescent"]
    assert Image.open(out / "concept-crescent.png").format == "PNG"
    both = CliRunner().invoke(eval_command, ["--model", str(model), "--concept", "outline", "--suite", "single",
                                             "--seeds", "1", "--limit", "1", "--steps", "1", "--out", str(out)])
    assert both.exit_code == 0, both.output
    assert [s["suite"] for s in json.loads((out / "summary.json").read_text())] == ["single", "concept-outline"]
    bad = CliRunner().invoke(eval_command, ["--model", str(model), "--concept", "donut"])
    assert bad.exit_code == 2 and "ring" in bad.output
