"""Infotext writing and parsing in A1111 v1.10.1's format (processing.create_infotext,
infotext_utils.parse_generation_parameters / quote / unquote). Infotexts below are written by hand in that format."""

import pytest

from sdstack.metadata.infotext import (
    KEY_ORDER,
    build_infotext,
    order_params,
    parse_infotext,
    parse_version,
    quote,
    unquote,
)

HIRES_LORA_TI = (
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.8>\n"
    "Negative prompt: easynegative, (worst quality:1.4), lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


# ---------------------------------------------------------------------------------------------- quote


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Euler a", "Euler a"),
        (7, 7),
        (7.0, 7.0),
        ("add_detail: 7c6bad76eb54, foo: 0123456789ab", '"add_detail: 7c6bad76eb54, foo: 0123456789ab"'),
        ("easynegative: c74b4e810b03", '"easynegative: c74b4e810b03"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("日本語, テスト", '"日本語, テスト"'),  # ensure_ascii=False
        ("日本語", "日本語"),
    ],
)
def test_quote(value, expected):
    assert quote(value) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('"a, b"', "a, b"),
        ('"two\\nlines"', "two\nlines"),
        ('"\\u00e9"', "é"),
        ("plain", "plain"),
        ("", ""),
        ('"', '"'),
        ('"a" and "b"', '"a" and "b"'),  # not valid JSON: returned as is
    ],
)
def test_unquote(text, expected):
    assert unquote(text) == expected


# ---------------------------------------------------------------------------------------------- build


def test_build_layout_and_skips():
    text = build_infotext(
        "a cat",
        "blurry",
        {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "512x512", "VAE": None},
    )
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1, Size: 512x512"


def test_build_without_negative_and_bare_key_and_strip():
    text = build_infotext("  a cat", "", {"Steps": 20, "Seed": 1, "Foo": "Foo"})
    assert text == "a cat\nSteps: 20, Seed: 1, Foo"
    # only the whole string is stripped: a prompt's own trailing newline stays (as in A1111)
    assert build_infotext("a cat\n", "", {"Steps": 20}) == "a cat\n\nSteps: 20"
    assert build_infotext("a cat", "", {}) == "a cat"


def test_build_quotes_values():
    text = build_infotext("p", "", {"Steps": 1, "Lora hashes": "add_detail: 7c6bad76eb54", "Hires prompt": "a, b"})
    assert text == 'p\nSteps: 1, Hires prompt: "a, b", Lora hashes: "add_detail: 7c6bad76eb54"'


def test_build_keeps_given_order_when_asked():
    text = build_infotext("p", "", {"Seed": 1, "Steps": 2}, ordered=False)
    assert text == "p\nSeed: 1, Steps: 2"


def test_order_params():
    params = {"Version": "v1", "Foo": 1, "Seed": 2, "Steps": 3, "Lora hashes": "x", "Bar": 4, "Size": "1x1",
              "User": "me", "Hires upscale": 2}  # fmt: skip
    assert list(order_params(params)) == [
        "Steps", "Seed", "Size", "Hires upscale", "Lora hashes", "Foo", "Bar", "Version", "User"
    ]  # fmt: skip


def test_key_order_core_prefix():
    assert KEY_ORDER[:10] == (
        "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
        "Model hash", "Model",
    )  # fmt: skip
    assert KEY_ORDER.index("Tiling") < KEY_ORDER.index("Hires upscale") < KEY_ORDER.index("Version")
    assert KEY_ORDER[-2:] == ("Version", "User")


# ---------------------------------------------------------------------------------------------- parse


def test_parse_docstring_example():
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by "
        "Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
        "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    res = parse_infotext(text)
    assert res["Prompt"].startswith("girl with an artist's beret") and res["Prompt"].endswith("intricate")
    assert res["Negative prompt"].startswith("ugly, fat") and res["Negative prompt"].endswith("messy drawing")
    assert {k: res[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512",
        "Size-2": "512", "Model hash": "45dee52b",
    }  # fmt: skip
    assert "Size" not in res
    assert res["Emphasis"] == "Original"  # the prompt uses (...)
    assert "Downcast alphas_cumprod" not in res  # no Version: no backcompat flags


def test_parse_hires_lora_ti():
    res = parse_infotext(HIRES_LORA_TI)
    assert res["Prompt"] == "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.8>"
    assert res["Negative prompt"] == "easynegative, (worst quality:1.4), lowres"
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["Clip skip"] == "2"
    assert res["Denoising strength"] == "0.45"
    assert (res["Hires upscale"], res["Hires steps"], res["Hires upscaler"]) == ("2", "15", "R-ESRGAN 4x+ Anime6B")
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert res["TI hashes"] == "easynegative: c74b4e810b03"
    assert res["Version"] == "v1.10.1"
    # defaults A1111 adds for keys that are absent
    assert res["RNG"] == "GPU"
    assert res["Hires sampler"] == "Use same sampler"
    assert res["Hires schedule type"] == "Use same scheduler"
    assert res["Hires checkpoint"] == "Use same checkpoint"
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (0, 0)
    assert res["FP8 weight"] == "Disable" and "Cache FP16 weight for LoRA" not in res
    assert res["Masked area padding"] == 32
    assert res["Refiner switch by sampling steps"] is False
    assert "Downcast alphas_cumprod" not in res and "Old prompt editing timelines" not in res


def test_parse_multiline_prompt_without_negative():
    text = (
        "a photo of a cat\n  sitting on a windowsill, golden hour  \n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: 45dee52b, Version: v1.6.0"
    )
    res = parse_infotext(text)
    assert res["Prompt"] == "a photo of a cat\nsitting on a windowsill, golden hour"
    assert res["Negative prompt"] == ""
    assert res["Clip skip"] == "1"
    assert res["Schedule type"] == "Automatic"
    assert "Emphasis" not in res
    assert res["Downcast alphas_cumprod"] is True  # v1.6.0 < v1.7.0-225
    assert "Old prompt editing timelines" not in res


def test_parse_multiline_negative():
    res = parse_infotext("p\nNegative prompt: n1\n n2\nSteps: 1, Sampler: Euler, Seed: 3")
    assert (res["Prompt"], res["Negative prompt"]) == ("p", "n1\nn2")


def test_parse_last_line_needs_three_params():
    res = parse_infotext("a cat\nSteps: 20, Seed: 1")
    assert res["Prompt"] == "a cat\nSteps: 20, Seed: 1"
    assert "Steps" not in res


def test_parse_quoted_values_with_escapes():
    text = 'p\nSteps: 20, Hires prompt: "line one\\nline \\"two\\", more", Seed: 1, Foo: , Sampler: Euler'
    res = parse_infotext(text)
    assert res["Hires prompt"] == 'line one\nline "two", more'
    assert "Foo" not in res  # an empty value is dropped, as A1111 does


def test_parse_old_version_backcompat():
    text = "a [cat:dog:0.5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Refiner: sdxl_refiner, Version: v1.5.1"
    res = parse_infotext(text)
    assert res["Old prompt editing timelines"] is True
    assert res["Pad conds v0"] is True
    assert res["Downcast alphas_cumprod"] is True
    assert res["Refiner switch by sampling steps"] is True
    assert "Old prompt editing timelines" not in parse_infotext(text, backcompat=False)


def test_parse_old_first_pass_size():
    text = "p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 1024x1024, First pass size: 0x0"
    res = parse_infotext(text)
    # sqrt(512*512 / (1024*1024)) = 0.5; ceil(0.5 * 1024 / 64) * 64 = 512
    assert (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"]) == (512, 512, 1024, 1024)
    res = parse_infotext("p\nSteps: 20, Seed: 1, Size: 768x512, First pass size: 384x256")
    assert (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"]) == (384, 256, 768, 512)


def test_parse_hypernet_and_fp8():
    text = "p\nSteps: 20, Seed: 1, Hypernet: anime, Hypernet strength: 0.5, FP8 weight: Enable for SDXL"
    res = parse_infotext(text)
    assert res["Prompt"] == "p<hypernet:anime:0.5>"
    assert res["Cache FP16 weight for LoRA"] is False


def test_parse_without_defaults():
    res = parse_infotext("p\nSteps: 1, Sampler: Euler, Seed: 3", defaults=False)
    assert res == {"Steps": "1", "Sampler": "Euler", "Seed": "3", "Prompt": "p", "Negative prompt": ""}


def test_parse_non_latin_prompt():
    res = parse_infotext("猫、桜 (笑顔:1.2)\nNegative prompt: ぼやけ\nSteps: 20, Sampler: Euler a, Seed: 7")
    assert (res["Prompt"], res["Negative prompt"]) == ("猫、桜 (笑顔:1.2)", "ぼやけ")


def test_round_trip_build_parse():
    params = {
        "Steps": 30, "Sampler": "DPM++ 2M SDE", "Schedule type": "Karras", "CFG scale": 5.5, "Seed": 3000000000,
        "Size": "832x1216", "Model hash": "31e35c80fc", "Model": "sd_xl_base_1.0", "Clip skip": 2,
        "Hires upscale": 1.5, "Hires upscaler": "Latent", "Lora hashes": "add_detail: 7c6bad76eb54, b: 0123",
        "Hires prompt": "line 1\nline 2, with: colon", "Version": "v1.10.1",
    }  # fmt: skip
    prompt = "a (cat:1.2) on a mat,\nsecond line [BREAK] <lora:add_detail:0.5>"
    text = build_infotext(prompt, "bad, ugly", params)
    res = parse_infotext(text)
    assert res["Prompt"] == prompt
    assert res["Negative prompt"] == "bad, ugly"
    for key, value in params.items():
        if key == "Size":
            assert (res["Size-1"], res["Size-2"]) == ("832", "1216")
        else:
            assert res[key] == str(value), key


def test_parse_version():
    assert parse_version("v1.10.1") > parse_version("v1.7.0-225-g1a2b3c4") > parse_version("v1.7.0")
    assert parse_version("v1.7.0-225-gabcdef") == parse_version("v1.7.0-225")
    assert parse_version("1.6.0-RC") < parse_version("1.6.0") == parse_version("v1.6")
    assert parse_version("v1.10.1") > parse_version("1.8.0") > parse_version("1.6.0")
    assert parse_version("f2.0.1v1.10.1-previous-600-g1") is None
    assert parse_version(None) is None
