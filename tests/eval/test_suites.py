"""Benchmark suites: content, determinism, the oracle's scores on the world's own images (clean and degraded),
on wrong captions and on noise; `evaluate` and the reports (table, JSON, contact sheet)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdstack.data.shapes import HELDOUT_PAIRS, parse_caption, seeded_rng
from sdstack.errors import UserError
from sdstack.eval.oracle import analyze, evaluate, score
from sdstack.eval.oracle import images_per_prompt
from sdstack.eval.report import (contact_sheet, format_overview, format_table, save_contact_sheet, save_report,
                                 write_json)
from sdstack.eval.suites import SUITE_NAMES, get_suite, wrong_prompt


def degrade(image, rng, blur=0.9, noise=5.0, shift=8.0):
    image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (*image.size[::-1], 3))
    arr += rng.uniform(-shift, shift, 3)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def references():
    """Per suite: (suite, reference scenes, clean analyses, degraded analyses)."""
    out = {}
    rng = np.random.default_rng(0)
    for name in SUITE_NAMES:
        suite = get_suite(name)
        scenes = [suite.reference_scene(i) for i in range(len(suite))]
        images = [suite.reference_image(i) for i in range(len(suite))]
        out[name] = (suite, scenes, [analyze(im) for im in images], [analyze(degrade(im, rng)) for im in images])
    return out


def test_suites_are_large_distinct_and_deterministic():
    assert set(SUITE_NAMES) == {"single", "heldout", "two-objects", "counting", "position"}
    for name in SUITE_NAMES:
        suite = get_suite(name)
        assert len(suite) >= 100
        assert len({p.id for p in suite}) == len(suite) and len(set(suite.prompts)) == len(suite)
        again = get_suite(name)
        assert [(p, p.text, p.id) for p in again] == [(p, p.text, p.id) for p in suite]
        assert suite.reference_image(3).tobytes() == again.reference_image(3).tobytes()
        for p in suite:
            assert parse_caption(p.text) == p  # the text says exactly the claims


def test_suites_ask_what_their_names_say():
    pairs = {name: [{(o.colour, o.shape) for o in p.objects} for p in get_suite(name)] for name in SUITE_NAMES}
    assert all(len(ps) == 1 and ps <= set(HELDOUT_PAIRS) for ps in pairs["heldout"])
    assert {pair for ps in pairs["heldout"] for pair in ps} == set(HELDOUT_PAIRS)
    for name in ("single", "two-objects", "counting", "position"):
        assert not any(ps & set(HELDOUT_PAIRS) for ps in pairs[name]), name
    assert all(len(p.objects) == 2 and p.relation is None for p in get_suite("two-objects"))
    counts = [p.objects[0].count for p in get_suite("counting")]
    assert all(counts.count(n) >= 30 for n in (2, 3, 4))
    position = get_suite("position")
    assert {p.objects[0].place for p in position if p.relation is None} == {"left", "right", "top", "bottom",
                                                                            "centre"}
    assert {p.relation.rel for p in position if p.relation} == {"left of", "right of", "above", "below"}


def test_unknown_suite_is_a_user_error():
    with pytest.raises(UserError, match="counting"):
        get_suite("colours")


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_oracle_scores_the_worlds_own_images_right(references, name):
    suite, _, clean, degraded = references[name]
    summary = evaluate(clean, suite)
    assert summary["accuracy"] >= 0.99, [r for r in summary["results"] if not r["all_correct"]]
    assert evaluate(degraded, suite)["accuracy"] >= 0.95


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_oracle_fails_wrong_captions_and_noise(references, name):
    suite, scenes, clean, _ = references[name]
    rng = seeded_rng("wrong", name)
    wrong = [wrong_prompt(p, s, rng) for p, s in zip(suite, scenes)]
    assert all(w != p for w, p in zip(wrong, suite))
    assert np.mean([score(a, w)["all_correct"] for a, w in zip(clean, wrong)]) <= 0.02
    perm = np.random.default_rng(1).permutation(len(suite))
    others = [suite.prompts[j] for j in perm]
    assert np.mean([score(a, p)["all_correct"] for a, p in zip(clean, others)]) <= 0.1
    noise = np.random.default_rng(2)
    noise_images = [Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    assert not any(score(im, p)["all_correct"] for im, p in zip(noise_images, suite))


def test_evaluate_takes_images_by_prompt_id_with_several_seeds():
    suite = get_suite("counting")
    by_id = {p.id: [suite.reference_image(i, seed=s) for s in range(2)] for i, p in enumerate(suite.prompts[:6])}
    small = type(suite)(suite.name, suite.prompts[:6])
    summary = evaluate(by_id, small)
    assert summary["n_images"] == 12 and summary["n_prompts"] == 6
    assert [r["seed"] for r in summary["results"][:2]] == [0, 1]
    assert summary["accuracy"] == 1.0 and set(summary["claims"]) == {"shape", "colour", "count"}
    flat = [im for ims in images_per_prompt(by_id, small.prompts) for im in ims]
    assert flat[1] is by_id[small.prompts[0].id][1] and len(flat) == 12
    del by_id[small.prompts[0].id]
    with pytest.raises(ValueError, match="no images"):
        evaluate(by_id, small)


def test_reports(tmp_path):
    suite = get_suite("single")
    small = type(suite)(suite.name, suite.prompts[:4])
    good = [small.reference_image(i) for i in range(4)]
    images = [good[0], good[1], good[3], good[3]]  # the third is another prompt's image: a failure
    summary = evaluate(images, small)
    assert summary["accuracy"] == 0.75
    table = format_table(summary)
    assert "colour" in table and "shape" in table and "75.0%" in table
    # prompts 0-3 ask for a circle, a square, a triangle and a star; the triangle prompt got the star's image
    assert [p.objects[0].shape for p in small.prompts] == ["circle", "square", "triangle", "star"]
    assert summary["shape_by_shape"] == {"circle": 1.0, "square": 1.0, "star": 1.0, "triangle": 0.0}
    assert "shape right by shape: " in table
    assert summary["colour_by_colour"] == {"red": 0.75}  # no triangle: its colour claim fails with the shape
    assert "single" in format_overview([summary])
    path = write_json([summary], tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text())[0]["accuracy"] == 0.75
    sheet = contact_sheet(images, summary["results"], columns=2, cell=64)
    assert sheet.size[0] >= 128 and sheet.size[1] >= 128
    arr = np.asarray(sheet).astype(int)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)
    for k, row in enumerate(summary["results"]):  # each cell's left edge: red frame only on the failure
        x, y = 2 + (k % 2) * 66, 2 + (k // 2) * 80
        assert red[y:y + 64, x].all() == (not row["all_correct"])
    out = save_contact_sheet(images, summary["results"], tmp_path / "sheet.png", columns=2)
    assert Image.open(out).size == contact_sheet(images, summary["results"], columns=2).size
    paths = save_report(summary, images, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["suite"] == "single"
    assert Image.open(paths["contact_sheet"]).format == "PNG"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["single.json", "single.png"]  # no temp files


def test_colour_by_colour_groups_the_colour_claims_by_the_prompted_colour():
    suite = get_suite("single")
    picked = [suite.prompts[i] for i in (0, 1, 7)]
    assert [(p.objects[0].colour, p.objects[0].shape) for p in picked] == [
        ("red", "circle"), ("red", "square"), ("orange", "circle")]
    small = type(suite)(suite.name, picked)
    red_circle = suite.reference_image(0)
    summary = evaluate([red_circle, suite.reference_image(1), red_circle], small)  # orange asked, red drawn
    assert summary["colour_by_colour"] == {"orange": 0.0, "red": 1.0}
    assert summary["shape_by_shape"] == {"circle": 1.0, "square": 1.0}
    assert "colour right by colour: orange 0%, red 100%" in format_table(summary)
