"""The shapes oracle: components, colour science, object reading on independent and world images, robustness to
blur and noise, failure on noise and on blobs, and the claim rules."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdstack.data.shapes import (PALETTE, ObjectSpec, PromptSpec, Relation, ShapesWorld, render_scene,
                                 scene_from_prompt, seeded_rng)
from sdstack.eval.oracle import Analysis, DetectedObject, analyze, label_components, score, srgb_to_lab


def degrade(image, rng, blur=0.9, noise=5.0, shift=8.0):
    """What a small decoder does to an image: a little blur, per-pixel noise and an overall colour shift."""
    image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float64)
    arr = arr + rng.normal(0, noise, arr.shape) + rng.uniform(-shift, shift, 3)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def obj(shape="circle", colour="red", center=(0.5, 0.5), radius=0.2):
    return DetectedObject(shape, colour, center, radius, (0, 0, 1, 1), 0.1, 0.0)


# ------------------------------------------------------------------------------------------------ building blocks

def test_label_components_matches_scipy_on_random_masks():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for k in range(20):
        mask = rng.random((40, 50)) < (0.3 + 0.02 * k)
        ours = label_components(mask)
        ref, n = ndimage.label(mask)  # 4-connectivity by default
        assert ours.max() + 1 == n
        # same partition: a bijection between labels
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n


def test_label_components_follows_a_spiral():
    mask = np.zeros((9, 9), bool)
    mask[0, :] = mask[:, 8] = mask[8, :] = mask[2:, 0] = mask[2, :7] = mask[2:7, 6] = mask[6, 2:7] = True
    mask[4, 4] = True  # an island
    labels = label_components(mask)
    assert labels.max() == 1 and labels[0, 0] == labels[6, 2] and labels[4, 4] != labels[0, 0]


def test_srgb_to_lab_reference_values():
    np.testing.assert_allclose(srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.1)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 255]), [32.30, 79.19, -107.86], atol=0.1)


# ------------------------------------------------------------------------------------------------ reading images

def _hand_drawn():
    """Drawn here with plain Pillow, not by the world: a red disc left-top, a blue square right, a black
    triangle at the bottom, on white, antialiased by drawing 4x larger."""
    big = Image.new("RGB", (256, 256), PALETTE["white"])
    d = ImageDraw.Draw(big)
    d.ellipse((20, 20, 100, 100), fill=PALETTE["red"])
    d.rectangle((170, 100, 230, 160), fill=PALETTE["blue"])
    d.polygon([(100, 236), (156, 236), (128, 188)], fill=PALETTE["black"])
    return big.resize((64, 64), Image.Resampling.BOX)


def test_analyze_reads_an_independently_drawn_image():
    a = analyze(_hand_drawn())
    assert a.background == "white"
    found = sorted((o.colour, o.shape, o.size) for o in a.objects)
    assert found == [("black", "triangle", "small"), ("blue", "square", "small"), ("red", "circle", "large")]
    red = next(o for o in a.objects if o.colour == "red")
    assert red.center == pytest.approx((60 / 256, 60 / 256), abs=0.01)
    assert red.radius == pytest.approx(40 / 256, abs=0.01)
    spec = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), Relation(0, "left of", 1),
                      "white")
    assert score(_hand_drawn(), spec)["all_correct"]
    assert not score(_hand_drawn(), PromptSpec(spec.objects, Relation(0, "right of", 1)))["all_correct"]


def _two_squares(colour_a, colour_b, gap_px, size=64):
    big = Image.new("RGB", (size * 4, size * 4), PALETTE["white"])
    d = ImageDraw.Draw(big)
    x = 4 * (32 - gap_px / 2)
    d.rectangle((x - 64, 80, x - 1, 143), fill=PALETTE[colour_a])
    d.rectangle((x + 4 * gap_px, 80, x + 4 * gap_px + 63, 143), fill=PALETTE[colour_b])
    return big.resize((size, size), Image.Resampling.BOX)


def test_close_objects_are_not_bridged_by_blur_and_noise():
    rng = np.random.default_rng(3)
    for k in range(5):
        a = analyze(degrade(_two_squares("black", "black", 3), rng, blur=1.0, noise=6.0))
        assert [(o.colour, o.shape) for o in a.objects] == [("black", "square")] * 2


def test_touching_objects_of_two_colours_are_split():
    a = analyze(_two_squares("red", "blue", 0))
    assert sorted((o.colour, o.shape) for o in a.objects) == [("blue", "square"), ("red", "square")]
    a = analyze(_two_squares("gray", "black", 0))  # collinear with the white background in RGB
    assert sorted((o.colour, o.shape) for o in a.objects) == [("black", "square"), ("gray", "square")]


def _world_accuracy(images, scenes):
    """Share of objects whose colour, shape and size are all read right, and of images with the right count."""
    right = total = counts = 0
    for image, scene in zip(images, scenes):
        a = analyze(image)
        counts += len(a.objects) == len(scene.objects) and a.background == scene.background
        for o in scene.objects:
            total += 1
            if a.objects:
                near = min(a.objects, key=lambda d: np.hypot(d.center[0] - o.center[0], d.center[1] - o.center[1]))
                right += (near.colour, near.shape, near.size) == (o.colour, o.shape, o.size)
    return right / total, counts / len(scenes)


@pytest.fixture(scope="module")
def world_samples():
    world = ShapesWorld(64, seed=11, split="all")
    return [world.sample(i) for i in range(250)]


def test_analyze_reads_world_images(world_samples):
    objects, counts = _world_accuracy([s[0] for s in world_samples], [s[2] for s in world_samples])
    assert objects >= 0.99 and counts >= 0.99


def test_analyze_is_robust_to_mild_blur_noise_and_colour_shift(world_samples):
    rng = np.random.default_rng(1)
    images = [degrade(s[0], rng) for s in world_samples]
    objects, counts = _world_accuracy(images, [s[2] for s in world_samples])
    assert objects >= 0.97 and counts >= 0.97


def test_analyze_reads_other_resolutions():
    for res in (128, 256):
        world = ShapesWorld(res, seed=2, split="all")
        samples = [world.sample(i) for i in range(15)]
        objects, counts = _world_accuracy([s[0] for s in samples], [s[2] for s in samples])
        assert objects >= 0.97 and counts >= 0.97


# ------------------------------------------------------------------------------------------------ failing wrong ones

def test_noise_images_have_no_objects():
    rng = np.random.default_rng(2)
    spec = PromptSpec((ObjectSpec("circle", "red"),))
    for k in range(20):
        noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        blotches = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 64),
                                                                                           Image.Resampling.BICUBIC)
        assert analyze(noise).objects == ()
        assert not score(noise, spec)["all_correct"] and not score(blotches, spec)["all_correct"]


def _blobify(image, sigma):
    """A blob that keeps the object's colour and area but not its outline (what a weak autoencoder draws)."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)).resize((256, 256), Image.Resampling.BICUBIC),
                     dtype=np.float64)
    bg = np.asarray(Image.new("RGB", (1, 1), PALETTE["white"]), dtype=np.float64)[0, 0]
    mask = np.linalg.norm(arr - bg, axis=-1) > 0.5 * np.linalg.norm(arr - bg, axis=-1).max()
    out = np.where(mask[..., None], np.asarray(image.resize((256, 256)))[128, 128], bg).astype(np.uint8)
    return Image.fromarray(out).resize(image.size, Image.Resampling.BOX)


@pytest.mark.parametrize("shape", ["star", "hexagon", "cross"])
def test_small_shapes_turned_into_blobs_are_not_read_as_those_shapes(shape):
    spec = PromptSpec((ObjectSpec(shape, "green", size="small", place="centre"),), None, "white")
    read_as_shape = 0
    for k in range(12):
        image = render_scene(scene_from_prompt(spec, seeded_rng("blob", shape, k)), 64)
        assert score(image, spec)["all_correct"]  # the sharp shape is read
        read_as_shape += score(_blobify(image, 2.5), spec)["shape:0"]
    assert read_as_shape <= 1


# ------------------------------------------------------------------------------------------------ claim rules

def test_score_rules_on_hand_made_analyses():
    a = Analysis("white", (obj("circle", "red", (0.2, 0.5), 0.1), obj("star", "blue", (0.8, 0.3), 0.2),
                           obj("star", "blue", (0.5, 0.8), 0.2)))
    s = score(a, PromptSpec((ObjectSpec("circle", "red", size="small", place="left"),), None, "white"))
    assert s == {"shape:0": True, "colour:0": True, "size:0": True, "place:0": True, "background": True,
                 "all_correct": True}
    s = score(a, PromptSpec((ObjectSpec("circle", "blue", size="large", place="right"),), None, "black"))
    assert s == {"shape:0": True, "colour:0": False, "size:0": False, "place:0": False, "background": False,
                 "all_correct": False}
    assert score(a, PromptSpec((ObjectSpec("star", "blue", 2),)))["count:0"]
    assert not score(a, PromptSpec((ObjectSpec("star", "blue", 3),)))["count:0"]
    assert not score(a, PromptSpec((ObjectSpec("heart", "blue"),)))["shape:0"]
    left = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("star", "blue")), Relation(0, "left of", 1))
    assert score(a, left)["relation"]
    for rel, expected in (("right of", False), ("above", True), ("below", True)):
        assert score(a, PromptSpec(left.objects, Relation(0, rel, 1)))["relation"] == expected
    assert score(a, PromptSpec(left.objects, Relation(1, "above", 0)))["relation"]  # the star at y=0.3
    assert score(Analysis(None), PromptSpec((ObjectSpec("circle", "red"),))) == {
        "shape:0": False, "colour:0": False, "all_correct": False}


def test_place_and_relation_rules_at_their_limits():
    from sdstack.data.shapes import in_place, relation_holds

    assert in_place(0.39, 0.9, "left") and not in_place(0.41, 0.5, "left")
    assert in_place(0.61, 0.5, "right") and in_place(0.5, 0.39, "top") and in_place(0.5, 0.61, "bottom")
    assert in_place(0.36, 0.64, "centre") and not in_place(0.34, 0.5, "centre")
    assert relation_holds((0.3, 0.5), (0.45, 0.9), "left of") and not relation_holds((0.3, 0.5), (0.35, 0.5),
                                                                                       "left of")
    assert relation_holds((0.5, 0.2), (0.5, 0.4), "above") and relation_holds((0.5, 0.4), (0.5, 0.2), "below")
