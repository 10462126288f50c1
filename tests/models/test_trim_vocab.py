"""A trimmed text-encoder vocabulary (sdstack train trim-vocab): the kept words tokenize and encode as before, other
text still tokenizes, and sdstack, stock transformers/diffusers and the single-file format all read the result."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from sdstack.errors import UserError
from sdstack.models.loader import load_model
from sdstack.models.tiny import save_diffusers_folder, tiny_bundle
from sdstack.models.tokenizer import VOCAB_SIZE, ClipTokenizer
from sdstack.models.trim_vocab import trim_model_vocabulary
from sdstack.prompts.conditioning import TextConditioner

KEPT = ["a red zwx ring on a white background", "there are two grey hexagons above a tiny plus sign",
        "zwx style, a blue star"]
OTHER = ["photography of a lighthouse at dusk", "Ünïcödé ✓ text"]


def pieces(tok, text):
    return [tok.decoder[i] for i in tok.encode(text)]


def test_trimmed_vocabulary_keeps_the_kept_words_and_splits_the_rest():
    full = ClipTokenizer()
    small = full.trimmed(300, KEPT)
    assert small.vocab_size < 1500
    assert small.vocab_size == 512 + len(small.merges()) + 2  # CLIP's layout: bytes, bytes</w>, merges, specials
    for t in KEPT:
        assert pieces(small, t) == pieces(full, t)
    for t in OTHER:
        ids = small.encode(t)
        assert all(0 <= i < small.vocab_size for i in ids)
        assert small.decode(ids) == full.decode(full.encode(t))  # no unknown token: the text comes back whole
        assert len(ids) > len(full.encode(t))  # in shorter pieces
    assert small(KEPT[0])[0] == small.bos_token_id == small.vocab_size - 2
    assert small(KEPT[0])[-1] == small.pad_token_id == small.eos_token_id == small.vocab_size - 1


def test_stock_transformers_tokenizer_reads_the_trimmed_vocabulary_the_same(tmp_path):
    from transformers import CLIPTokenizer

    small = ClipTokenizer().trimmed(300, KEPT)
    small.save_pretrained(tmp_path / "tok")
    stock = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert len(stock) == small.vocab_size
    for t in KEPT + OTHER:
        assert stock(t, padding="max_length", max_length=77).input_ids == small(t)
    again = ClipTokenizer.from_pretrained(tmp_path / "tok")
    assert again.encoder == small.encoder and again.pad_token_id == small.pad_token_id


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trim")
    full = save_diffusers_folder(tiny_bundle("sd1"), root / "full")
    trimmed = root / "trimmed"
    stats = trim_model_vocabulary(full, trimmed, keep=200, texts=KEPT)
    return full, trimmed, stats


def test_trimmed_model_encodes_kept_prompts_bit_for_bit(folders):
    full, trimmed, stats = folders
    assert stats["tokens_before"] == VOCAB_SIZE and stats["tokens_after"] < 1000
    assert stats["bytes_after"] < stats["bytes_before"] / 40
    a, b = load_model(full), load_model(trimmed)
    assert b.text_encoders[0].get_input_embeddings().weight.shape[0] == stats["tokens_after"]
    assert b.tokenizers[0].vocab_size == stats["tokens_after"]
    ca, cb = TextConditioner(a), TextConditioner(b)
    for t in KEPT + [""]:
        assert torch.equal(ca(t).context, cb(t).context), t
    size = sum(f.stat().st_size for f in trimmed.rglob("*") if f.is_file())
    assert size < sum(f.stat().st_size for f in full.rglob("*") if f.is_file())


def test_stock_transformers_text_encoder_gives_the_same_output_from_the_trimmed_folder(folders):
    from transformers import CLIPTextModel, CLIPTokenizer

    full, trimmed, _ = folders
    outs = []
    for folder in (full, trimmed):
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        enc = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        ids = tok(KEPT[1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(ids)
        outs.append((out.last_hidden_state, out.pooler_output))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])  # pooled at the end token, found by the config's eos_token_id


def test_single_file_keeps_the_trimmed_vocabulary(folders, tmp_path):
    from sdstack.models.single_file import VOCAB_KEY, load_single_file, write_single_file
    from safetensors import safe_open

    _, trimmed, _ = folders
    bundle = load_model(trimmed)
    path = write_single_file(bundle, tmp_path / "m.safetensors")
    with safe_open(path, "pt") as f:
        assert VOCAB_KEY in f.metadata()
    again = load_single_file(path)
    assert again.tokenizers[0].encoder == bundle.tokenizers[0].encoder
    assert again.tokenizers[0].pad_token_id == bundle.tokenizers[0].pad_token_id
    c1, c2 = TextConditioner(bundle), TextConditioner(again)
    assert torch.equal(c1(KEPT[0]).context, c2(KEPT[0]).context)


def test_a_trimmed_text_encoder_without_its_vocabulary_is_refused(folders, tmp_path):
    _, trimmed, _ = folders
    broken = tmp_path / "broken"
    shutil.copytree(trimmed, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError, match="tokens, not CLIP's 49408"):
        load_model(broken)


def test_init_from_a_trimmed_model_puts_its_rows_at_their_clip_ids(folders):
    from sdstack.train.text2image import _widen_token_table

    _, trimmed, _ = folders
    from safetensors.torch import load_file

    key = "text_model.embeddings.token_embedding.weight"
    table = next(v for k, v in load_file(trimmed / "text_encoder" / "model.safetensors").items()
                 if k.endswith("embeddings.token_embedding.weight"))
    fresh = torch.randn(VOCAB_SIZE, table.shape[1])
    weights = {f"text_encoder.{key}": table.clone()}
    _widen_token_table(weights, {f"text_encoder.{key}": fresh}, str(trimmed))
    wide = weights[f"text_encoder.{key}"]
    assert wide.shape == fresh.shape
    small, full = ClipTokenizer.from_pretrained(trimmed / "tokenizer"), ClipTokenizer()
    for word in ("ring</w>", "zwx</w>", "hexagons</w>", "<|endoftext|>"):
        if word in small.encoder:
            assert torch.equal(wide[full.encoder[word]], table[small.encoder[word]].float()), word
    untouched = [i for t, i in full.encoder.items() if t not in small.encoder][:50]
    assert torch.equal(wide[untouched], fresh[untouched])


def test_trim_vocab_command(folders, tmp_path):
    import subprocess
    import sys

    from sdstack.train.cli import trim_vocab

    full, _, _ = folders
    lines = tmp_path / "captions.txt"
    lines.write_text("a photo of my zwxdog\nzwxdog on the beach\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(trim_vocab, [str(full), str(out), "--keep", "50", "--text", str(lines)])
    assert r.exit_code == 0, r.output
    assert "49408 ->" in r.output
    tok = ClipTokenizer.from_pretrained(out / "tokenizer")
    assert pieces(tok, "a photo of my zwxdog") == pieces(ClipTokenizer(), "a photo of my zwxdog")
    cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert cfg["vocab_size"] == tok.vocab_size and cfg["eos_token_id"] == tok.eos_token_id
    r = subprocess.run([sys.executable, "-m", "sdstack", "train", "trim-vocab", str(tmp_path), str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model_index.json" in r.stderr + r.stdout
    assert not (tmp_path / "x").exists()
