"""Conditioning checked against direct transformers CLIP calls (independent of our chunking code)."""

import pytest
import torch

from sdstack.models.tiny import tiny_bundle
from sdstack.prompts.conditioning import CHUNK, TextConditioner, final_layer_norm, tokenize_prompt


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


def direct(bundle, ids, k=0, layer=-1, final_ln=True):
    enc = bundle.text_encoders[k]
    with torch.no_grad():
        out = enc(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[layer]
    return (final_layer_norm(enc)(h) if final_ln else h)[0], out


def test_plain_prompt_equals_direct_encoding(sd1):
    ids = sd1.tokenizers[0]("a red star on a blue background")
    ref, _ = direct(sd1, ids)
    got = TextConditioner(sd1)("a red star on a blue background").context
    assert got.shape == (77, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_emphasis_original_restores_mean(sd1):
    tok = sd1.tokenizers[0]
    ids = tok("a red star")
    base, _ = direct(sd1, ids)
    w = torch.ones(77, 1)
    w[3] = 1.5  # "star" is the 3rd prompt token -> position 3 after BOS
    expected = base * w
    expected = expected * (base.mean() / expected.mean())
    got = TextConditioner(sd1)("a red (star:1.5)").context
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_long_prompt_makes_two_chunks(sd1):
    tok = sd1.tokenizers[0]
    words = " ".join(["cat"] * 100)
    chunks, _ = tokenize_prompt(words, tok)
    assert len(chunks) == 2 and all(len(c.tokens) == CHUNK for c in chunks)
    got = TextConditioner(sd1)(words).context
    assert got.shape == (154, 32)
    cat = tok.encode("cat")[0]
    second = [tok.bos_token_id] + [cat] * 25 + [tok.eos_token_id] * 51
    ref, _ = direct(sd1, second)
    torch.testing.assert_close(got[77:], ref, rtol=0, atol=1e-6)


def test_break_starts_a_new_chunk(sd1):
    chunks, _ = tokenize_prompt("a cat BREAK a dog", sd1.tokenizers[0])
    assert len(chunks) == 2
    tok = sd1.tokenizers[0]
    assert chunks[1].tokens[:2] == tok.encode("a dog")


def test_comma_backtrack_moves_last_words(sd1):
    tok = sd1.tokenizers[0]
    cat = tok.encode("cat")[0]
    text = " ".join(["cat"] * 70) + ", dog bird fish frog mouse horse"
    chunks, _ = tokenize_prompt(text, tok)
    # 70 cats + comma = 71 tokens; the chunk fills at 75 and the 6 animal words after the comma (within 20
    # tokens of the end) move to the next chunk.
    assert chunks[0].tokens[:71] == [cat] * 70 + [tok.encoder[",</w>"]]
    assert chunks[0].tokens[71:] == [tok.eos_token_id] * 4
    assert chunks[1].tokens[:6] == tok.encode("dog bird fish frog mouse horse")


def test_clip_skip_uses_earlier_layer(sd1):
    ids = sd1.tokenizers[0]("a cat")
    ref, _ = direct(sd1, ids, layer=-2)
    got = TextConditioner(sd1, clip_skip=2)("a cat").context
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_sd2_pads_with_zero_after_eos():
    b = tiny_bundle("sd2")
    ids = [49406] + b.tokenizers[0].encode("a cat") + [49407]
    ids += [0] * (77 - len(ids))
    ref, _ = direct(b, ids)
    got = TextConditioner(b)("a cat").context
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_sdxl_concatenates_penultimate_layers_and_pools_from_encoder_2():
    b = tiny_bundle("sdxl")
    ids1 = b.tokenizers[0]("a cat")
    ids2 = b.tokenizers[1]("a cat")
    z1, _ = direct(b, ids1, k=0, layer=-2, final_ln=False)
    z2, out2 = direct(b, ids2, k=1, layer=-2, final_ln=False)
    cond = TextConditioner(b)("a cat")
    torch.testing.assert_close(cond.context, torch.cat([z1, z2], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, out2.text_embeds[0], rtol=0, atol=1e-6)


def _counting(monkeypatch):
    calls = []
    real = TextConditioner._encode_chunks

    def spy(self, chunks):
        calls.append(len(chunks))
        return real(self, chunks)

    monkeypatch.setattr(TextConditioner, "_encode_chunks", spy)
    return calls


def test_encodings_are_reused_across_jobs_until_the_weights_change(monkeypatch):
    bundle = tiny_bundle("sd1")
    calls = _counting(monkeypatch)
    first = TextConditioner(bundle)("a red star")
    again = TextConditioner(bundle)("a red star")  # a new job: the shared cache, not the encoder
    assert again is first and calls == [1]
    TextConditioner(bundle, clip_skip=2)("a red star")  # another clip skip: encoded
    TextConditioner(bundle)("a (red:1.2) star")  # other weights: encoded
    assert calls == [1, 1, 1]

    emb = bundle.text_encoders[0].get_input_embeddings().weight
    with torch.no_grad():
        emb.add_(0.5)  # in place (a LoRA merge, an optimizer step): the old encoding is stale
    changed = TextConditioner(bundle)("a red star")
    assert len(calls) == 4
    ref, _ = direct(bundle, bundle.tokenizers[0]("a red star"))
    torch.testing.assert_close(changed.context, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(changed.context, first.context)


def test_encodings_are_not_reused_with_hooks_training_mode_or_embeddings(monkeypatch):
    from sdstack.models.embeddings import Embedding, EmbeddingsByName

    bundle = tiny_bundle("sd1")
    calls = _counting(monkeypatch)
    enc = bundle.text_encoders[0]
    handle = enc.get_input_embeddings().register_forward_hook(lambda m, i, o: o * 2)
    try:
        TextConditioner(bundle)("a red star")
        TextConditioner(bundle)("a red star")
    finally:
        handle.remove()
    assert calls == [1, 1], "a hook may change the output: no reuse"
    enc.train()
    try:
        TextConditioner(bundle)("a red star")
        TextConditioner(bundle)("a red star")
    finally:
        enc.eval()
    assert calls == [1] * 4
    emb = Embedding("zwxemb", {"clip_l": torch.randn(1, 32)})
    lib = EmbeddingsByName([emb], bundle.tokenizers[0])
    TextConditioner(bundle, embeddings=lib)("a zwxemb star")
    TextConditioner(bundle, embeddings=lib)("a zwxemb star")
    assert calls == [1] * 6, "a prompt with an embedding is encoded anew"


def test_the_shared_cache_keeps_the_newest_entries(monkeypatch):
    from sdstack.prompts import conditioning

    monkeypatch.setattr(conditioning, "SHARED_ENTRIES", 2)
    bundle = tiny_bundle("sd1")
    calls = _counting(monkeypatch)
    for text in ("a", "b", "a", "c", "a", "b"):  # "a" used again stays; "b" was pushed out by "c"
        TextConditioner(bundle)(text)
    assert len(calls) == 4
