"""`sdstack eval --lora FILE[:WEIGHT] --embedding FILE` (sdstack/eval/cli.py) on a tiny random model: the LoRA is
applied to every image exactly as `<lora:name:w>` in the prompt would be, an embedding is used by its file name, in
the suites and in `--concept`; missing or unusable files are a one-line error with exit status 2."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdstack.engine.generate as engine
from sdstack.cli import main
from sdstack.eval.cli import EvalNetworks, parse_networks, run_concept_eval, run_eval
from sdstack.models.embeddings import save_embedding_a1111

TOKEN = "zshinything"  # not a CLIP word: an embedding of this name replaces its tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    root = tmp_path_factory.mktemp("evalnets")
    model = save_diffusers_folder(tiny_bundle("sd1", seed=0), root / "model")
    g = torch.Generator().manual_seed(0)
    t = {}
    for key, out_f, in_f in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 16),
                             ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)):
        t[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g)
        t[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g)
        t[f"{key}.alpha"] = torch.tensor(4.0)
    (root / "loras").mkdir()
    save_file(t, root / "loras" / "star.safetensors")
    (root / "loras" / "other.safetensors").write_bytes(b"not a LoRA: never read, only the named file is used")
    emb = save_embedding_a1111(root / "emb" / f"{TOKEN}.safetensors", TOKEN, torch.randn(2, 32, generator=g) * 3)
    wide = save_embedding_a1111(root / "emb-wide" / "wide.safetensors", "wide", torch.randn(1, 768, generator=g))
    return {"model": model, "lora": root / "loras" / "star.safetensors", "emb": emb, "wide": wide}


@pytest.fixture
def calls(monkeypatch):
    """Every engine.generate call the evaluation makes: (prompt, keyword arguments, images as arrays)."""
    seen, real = [], engine.generate

    def spy(bundle, params, **kw):
        result = real(bundle, params, **kw)
        seen.append((params.prompt, kw, [np.asarray(im) for im in result.images]))
        return result

    monkeypatch.setattr(engine, "generate", spy)
    return seen


def _direct(model, prompt, seeds, seed, **kw):
    from sdstack.models.loader import load_model
    from sdstack.params import make_params

    r = engine.generate(load_model(model), make_params(prompt=prompt, seed=seed, batch_size=seeds, steps=2), **kw)
    return [np.asarray(im) for im in r.images], r


def test_lora_applies_to_every_suite_image_as_the_prompt_tag_would(files, calls, tmp_path):
    gen = {"steps": 2}
    plain = run_eval(files["model"], ["single"], 2, 2, None, gen)
    nets = parse_networks([f"{files['lora']}:0.7"], [])
    with_lora = run_eval(files["model"], ["single"], 2, 2, tmp_path / "r", gen, nets)
    assert len(calls) == 4
    (p0, _, im0), (p1, _, im1), (q0, kw, lo0), (q1, _, lo1) = calls
    assert q0 == p0 + " <lora:star:0.7>" and q1 == p1 + " <lora:star:0.7>"
    assert not all(np.array_equal(a, b) for a, b in zip(im0 + im1, lo0 + lo1)), "the LoRA changed nothing"
    # the same images as generating with the tag in the prompt and the LoRA's own folder
    direct, r = _direct(files["model"], p0 + " <lora:star:0.7>", 2, 0, lora_dir=files["lora"].parent)
    assert all(np.array_equal(a, b) for a, b in zip(direct, lo0))
    assert "Lora hashes: \"star: " in r.infotexts[0]
    assert plain[0]["settings"] == {"steps": 2, "seeds": 2}
    saved = json.loads((tmp_path / "r" / "single.json").read_text())
    assert saved["settings"] == {"steps": 2, "seeds": 2, "loras": [f"{files['lora']}:0.7"]}
    assert with_lora[0]["n_images"] == 4


def test_embedding_is_used_by_name_in_concept_prompts(files, calls):
    gen = {"steps": 2}
    run_concept_eval(files["model"], "ring", TOKEN, 1, 2, None, gen)
    summary = run_concept_eval(files["model"], "ring", TOKEN, 1, 2, None, gen,
                               parse_networks([], [str(files["emb"])]))
    assert summary["settings"]["embeddings"] == [str(files["emb"])]
    (p0, _, im0), (p1, _, _), (q0, kw, em0), (q1, _, _) = calls
    assert (q0, q1) == (p0, p1) and TOKEN in q0  # the prompt is unchanged: the token is the embedding's name
    assert set(kw["embeddings"].loaded) == {TOKEN}
    assert not np.array_equal(im0[0], em0[0])
    direct, r = _direct(files["model"], q0, 1, 0, embeddings=kw["embeddings"])
    assert np.array_equal(direct[0], em0[0]) and f'TI hashes: "{TOKEN}: ' in r.infotexts[0]


def test_cli_runs_the_concept_with_lora_and_embedding(files, capsys, tmp_path):
    main(["eval", "--model", str(files["model"]), "--concept", "ring", "--token", TOKEN, "--suite", "single",
          "--seeds", "1", "--limit", "1", "--steps", "1", "--lora", str(files["lora"]),
          "--embedding", str(files["emb"]), "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["suite"] for s in summary] == ["single", "concept-ring"]
    assert all(s["settings"]["loras"] == [f"{files['lora']}:1"] for s in summary)
    assert "suite concept-ring" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--lora", "nosuch.safetensors"], "--lora: file not found: nosuch.safetensors"),
    (["--lora", "nosuch.safetensors:0.5"], "--lora: file not found: nosuch.safetensors"),
    (["--embedding", "nosuch.pt"], "--embedding: file not found: nosuch.pt"),
    (["--lora", "{model}/model_index.json"], "is not a LoRA file"),
    (["--embedding", "{wide}"], "wide.safetensors: vectors do not fit this model"),
    (["--lora", "{other}"], "other.safetensors"),
])
def test_missing_or_unusable_files_are_one_line_errors(files, capsys, args, message):
    fill = {"model": files["model"], "wide": files["wide"], "other": files["lora"].parent / "other.safetensors"}
    args = [a.format(**fill) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(files["model"]), "--suite", "single", "--limit", "1", "--seeds", "1",
              "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_no_networks_means_no_extra_arguments():
    nets = EvalNetworks()
    assert not nets and nets.settings() == {}
    with nets.applied(None) as (suffix, kw):
        assert suffix == "" and kw == {}
