"""<lora:name:w> in prompts and textual-inversion embeddings by name, through the whole engine."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstack.engine.generate import generate
from sdstack.errors import UserError
from sdstack.metadata.infotext import parse_infotext
from sdstack.models.embeddings import EmbeddingLibrary, save_embedding_a1111
from sdstack.models.hashing import addnet_hash
from sdstack.models.tiny import tiny_bundle
from sdstack.params import make_params


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1")


def kohya_lora(path, bundle, rank=4):
    """A kohya-format LoRA on one attention projection and one text-encoder projection."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for key, out_f, in_f in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 16),
                             ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)):
        t[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g)
        t[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g)
        t[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(t, path)


def run(bundle, prompt, lora_dir=None, embeddings=None):
    r = generate(bundle, make_params(prompt=prompt, steps=2, seed=5), lora_dir=lora_dir, embeddings=embeddings)
    return r, np.asarray(r.images[0], dtype=np.int16)


def test_lora_tag_applies_for_the_job_only(bundle, tmp_path):
    kohya_lora(tmp_path / "star.safetensors", bundle)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    _, plain = run(bundle, "a red star", tmp_path)
    r, with_lora = run(bundle, "a red star <lora:star:1>", tmp_path)
    _, half = run(bundle, "a red star <lora:star:0.5>", tmp_path)
    assert not np.array_equal(plain, with_lora) and not np.array_equal(with_lora, half)
    # weights restored bit-exactly after the job; the same prompt without the tag gives the same image again
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())
    assert np.array_equal(plain, run(bundle, "a red star", tmp_path)[1])
    info = parse_infotext(r.infotexts[0])
    assert info["Prompt"] == "a red star <lora:star:1>"
    assert info["Lora hashes"] == f"star: {addnet_hash(tmp_path / 'star.safetensors')[:12]}"


def test_unknown_lora_is_a_user_error_listing_valid_names(bundle, tmp_path):
    kohya_lora(tmp_path / "star.safetensors", bundle)
    with pytest.raises(UserError, match="star"):
        run(bundle, "x <lora:nosuch:1>", tmp_path)


def test_embedding_by_name_replaces_token_vectors(bundle, tmp_path):
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    save_embedding_a1111(tmp_path / "shinything.safetensors", "shinything", vec)
    lib = EmbeddingLibrary(tmp_path, bundle)
    from sdstack.prompts.conditioning import TextConditioner

    cond = TextConditioner(bundle, embeddings=lib)
    got = cond("a shinything star").context
    # Independent reference: feed the encoder input embeddings where positions 2-3 hold the vectors.
    enc = bundle.text_encoders[0]
    tok = bundle.tokenizers[0]
    ids = [tok.bos_token_id, tok.encode("a")[0], 0, 0, tok.encode("star")[0], tok.eos_token_id]
    ids += [tok.eos_token_id] * (77 - len(ids))
    emb = enc.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    emb[0, 2:4] = vec
    from sdstack.prompts.conditioning import final_layer_norm

    handle = enc.get_input_embeddings().register_forward_hook(lambda m, i, o: emb)
    try:
        with torch.no_grad():
            ref = final_layer_norm(enc)(enc(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1])
    finally:
        handle.remove()
    torch.testing.assert_close(got, ref[0], rtol=0, atol=1e-6)
    r, _ = run(bundle, "a shinything star", embeddings=lib)
    assert "TI hashes: \"shinything: " in r.infotexts[0]


@pytest.mark.parametrize("layout", ["string_to_param", "emb_params"])
def test_embedding_bundled_in_a_lora_is_used_by_name_while_the_lora_is_loaded(bundle, tmp_path, caplog, layout):
    """AUTOMATIC1111's `bundle_emb.<name>.*` keys (pivotal-tuning LoRAs): while `<lora:...>` loads the file, its
    embedding works by name exactly as the same vectors from the embeddings folder; the folder's embedding of the
    same name wins (A1111 skips the bundled one); a bundled embedding of the wrong width is skipped with a warning."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(2)
    vec, other = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    loras, folder, theirs = (tmp_path / d for d in ("lora", "emb", "emb2"))
    for d in (loras, folder, theirs):
        d.mkdir()
    kohya_lora(loras / "style.safetensors", bundle)
    t = load_file(loras / "style.safetensors")
    key = "bundle_emb.glowy.string_to_param.*" if layout == "string_to_param" else "bundle_emb.glowy.emb_params"
    save_file({**t, key: vec, "bundle_emb.widez.emb_params": torch.randn(1, 48, generator=g)},
              loras / "style.safetensors")
    save_file(t, loras / "bare.safetensors")  # the same layers, no embedding
    save_embedding_a1111(folder / "glowy.safetensors", "glowy", vec)
    save_embedding_a1111(theirs / "glowy.safetensors", "glowy", other)
    prompt = "a glowy star <lora:style:1>"
    with caplog.at_level("WARNING"):
        r, bundled = run(bundle, prompt, loras)
    _, from_folder = run(bundle, prompt, loras, EmbeddingLibrary(folder, bundle))
    _, folder_wins = run(bundle, prompt, loras, EmbeddingLibrary(theirs, bundle))
    _, theirs_with_bare = run(bundle, "a glowy star <lora:bare:1>", loras, EmbeddingLibrary(theirs, bundle))
    assert np.array_equal(bundled, from_folder)
    assert "TI hashes: \"glowy: " in r.infotexts[0]
    _, lora_no_emb = run(bundle, "a star <lora:style:1>", loras)
    assert not np.array_equal(bundled, lora_no_emb)
    assert np.array_equal(folder_wins, theirs_with_bare) and not np.array_equal(folder_wins, bundled)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "bundled embedding 'widez' does not fit" in warned
    assert "matched no layer" not in warned  # bundle keys are not LoRA layers
