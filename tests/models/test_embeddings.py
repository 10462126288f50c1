"""Textual-inversion embeddings: file formats, the embeddings folder, matching names in prompt tokens."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstack.errors import UnsafeCheckpointError, UserError
from sdstack.models.embeddings import (EmbeddingLibrary, embedding_keys, expected_widths, read_embedding,
                                       save_embedding_a1111)
from sdstack.models.tokenizer import ClipTokenizer


def _vec(n, width, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _a1111_pt(path, vec, **extra):
    """The dict A1111's Embedding.save() writes with torch.save."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "internal-name", "step": 500,
            "sd_checkpoint": "a1b2c3d4e5", "sd_checkpoint_name": "v1-5-pruned"}
    data.update(extra)
    torch.save(data, path)
    return path


# ------------------------------------------------------------------------------------------ file formats


def test_a1111_pt(tmp_path):
    vec = _vec(3, 32)
    path = _a1111_pt(tmp_path / "my-style.pt", torch.nn.Parameter(vec.clone()))
    emb = read_embedding(path)
    assert emb.name == "my-style"  # the file stem, not the name stored inside
    assert list(emb.vectors) == [""] and torch.equal(emb.vectors[""], vec)
    assert emb.vectors[""].dtype == torch.float32 and not emb.vectors[""].requires_grad
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (500, "a1b2c3d4e5", "v1-5-pruned")
    assert emb.hash == hashlib.sha256(path.read_bytes()).hexdigest() and emb.shorthash == emb.hash[:12]
    assert (emb.num_vectors, emb.shape) == (3, 32)


def test_a1111_pt_with_parameterdict(tmp_path):
    """Files written by torch 1.11-era A1111 hold a ParameterDict (A1111's safe unpickler allows it too)."""
    vec = _vec(2, 32, seed=1)
    old_style = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    path = _a1111_pt(tmp_path / "old.pt", None, string_to_param=old_style)
    assert torch.equal(read_embedding(path).vectors[""], vec)


def test_safetensors_emb_params_sdxl_and_diffusers(tmp_path):
    v1, vl, vg = _vec(4, 32), _vec(2, 32, 1), _vec(2, 48, 2)
    save_file({"emb_params": v1}, str(tmp_path / "kohya.safetensors"), metadata={"step": "120"})
    save_file({"clip_l": vl, "clip_g": vg}, str(tmp_path / "xl.safetensors"))
    torch.save({"<cat-toy>": _vec(1, 32, 3)[0]}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": _vec(2, 32, 4)}, str(tmp_path / "learned_embeds.safetensors"))
    kohya = read_embedding(tmp_path / "kohya.safetensors")
    assert torch.equal(kohya.vectors[""], v1) and kohya.step == 120
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(xl.vectors["clip_l"], vl) and torch.equal(xl.vectors["clip_g"], vg)
    assert (xl.num_vectors, xl.shape) == (2, 80)
    bin_ = read_embedding(tmp_path / "learned_embeds.bin")
    assert torch.equal(bin_.vectors[""], _vec(1, 32, 3)) and bin_.step is None
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.safetensors").vectors[""], _vec(2, 32, 4))


class _Payload:
    """Unpickling this creates a file: proof that code from the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": _vec(1, 32)}, "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"a": _vec(1, 32), "b": _vec(1, 32)}, tmp_path / "two.bin")
    with pytest.raises(UserError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.bin")
    _a1111_pt(tmp_path / "multi.pt", _vec(1, 32), string_to_param={"*": _vec(1, 32), "x": _vec(1, 32)})
    with pytest.raises(UserError, match="2 terms"):
        read_embedding(tmp_path / "multi.pt")
    with pytest.raises(UserError, match="not found"):
        read_embedding(tmp_path / "missing.pt")


def test_save_embedding_a1111_round_trips(tmp_path):
    vec = _vec(3, 32)
    path = save_embedding_a1111(tmp_path / "out" / "trained.safetensors", "trained", vec, step=42,
                                sd_checkpoint="0123456789", sd_checkpoint_name="tiny")
    with safe_open(str(path), "pt") as f:  # the layout A1111 reads: one tensor under emb_params
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata() == {"name": "trained", "step": "42", "sd_checkpoint": "0123456789",
                                "sd_checkpoint_name": "tiny"}
    emb = read_embedding(path)
    assert torch.equal(emb.vectors[""], vec) and emb.step == 42 and emb.sd_checkpoint_name == "tiny"
    pt = save_embedding_a1111(tmp_path / "trained.pt", "trained", vec, step=7)
    raw = torch.load(pt, weights_only=True)
    assert raw["name"] == "trained" and raw["step"] == 7 and torch.equal(raw["string_to_param"]["*"], vec)
    xl = save_embedding_a1111(tmp_path / "xl.safetensors", "xl", {"clip_l": vec, "clip_g": _vec(3, 48)})
    assert read_embedding(xl).shape == 80
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "trained.pt", "trained.safetensors",
                                                           "xl.safetensors"]  # no temp files left


# ------------------------------------------------------------------------------------------ the folder


@pytest.fixture()
def tok():
    return ClipTokenizer()


def _library_dir(tmp_path):
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    save_embedding_a1111(root / "bad-hands-5.safetensors", "bad-hands-5", _vec(2, 32), step=10)
    save_embedding_a1111(root / "sub" / "bad.safetensors", "bad", _vec(1, 32, 1))
    _a1111_pt(root / "easynegative.pt", _vec(8, 32, 2))
    save_embedding_a1111(root / "wide.safetensors", "wide", _vec(1, 48, 3))
    save_embedding_a1111(root / "xlstyle.safetensors", "xlstyle", {"clip_l": _vec(1, 32), "clip_g": _vec(1, 48)})
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("ignored")
    return root


def test_find_at_multi_token_names_longest_first(tmp_path, tok):
    lib = EmbeddingLibrary(_library_dir(tmp_path), tok, {"": 32})
    assert len(tok.encode("bad-hands-5")) > 1 and len(tok.encode("easynegative")) > 1
    prompt = tok.encode("a photo, bad-hands-5, bad drawing, easynegative")
    found = {}
    i = 0
    while i < len(prompt):
        hit = lib.find_at(prompt, i)
        if hit:
            found[hit[0].name] = (i, hit[1])
            i += hit[1]
        else:
            i += 1
    start = len(tok.encode("a photo,"))
    assert found["bad-hands-5"] == (start, len(tok.encode("bad-hands-5")))
    assert found["bad"] == (start + len(tok.encode("bad-hands-5,")), 1)
    assert found["easynegative"][1] == len(tok.encode("easynegative"))
    assert lib.find_at(prompt, 0) is None
    assert lib.get("easynegative").num_vectors == 8


def test_width_mismatch_is_skipped_with_reason(tmp_path, tok):
    lib = EmbeddingLibrary(_library_dir(tmp_path), tok, {"": 32})
    assert sorted(lib.loaded) == ["bad", "bad-hands-5", "easynegative"]
    assert sorted(lib.skipped) == ["wide", "xlstyle"]
    assert "width 48" in lib.skip_reasons["wide"] and "expects width 32" in lib.skip_reasons["wide"]
    assert "clip_g width 48" in lib.skip_reasons["xlstyle"]
    assert lib.find_at(tok.encode("wide"), 0) is None
    with pytest.raises(UserError, match="unknown embedding 'wide'"):
        lib.get("wide")
    info = lib.api_info()
    assert info["loaded"]["bad-hands-5"] == {"step": 10, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                             "shape": 32, "vectors": 2}
    assert info["loaded"]["easynegative"]["sd_checkpoint_name"] == "v1-5-pruned"
    assert info["skipped"]["xlstyle"]["shape"] == 80 and info["skipped"]["wide"]["shape"] == 48
    xl = EmbeddingLibrary(lib.directory, tok, {"clip_l": 32, "clip_g": 48})
    assert list(xl.loaded) == ["xlstyle"] and "bad" in xl.skipped


def test_expected_widths_from_bundle(tiny_sd1):
    assert embedding_keys(tiny_sd1) == [""] and expected_widths(tiny_sd1) == {"": 32}
    fake_xl = SimpleNamespace(text_encoders=[SimpleNamespace(config=SimpleNamespace(hidden_size=768)),
                                             SimpleNamespace(config=SimpleNamespace(hidden_size=1280))])
    assert expected_widths(fake_xl) == {"clip_l": 768, "clip_g": 1280}
    lib = EmbeddingLibrary("/nonexistent", tiny_sd1)  # a bundle instead of a tokenizer: widths from its encoders
    assert lib.expected == {"": 32} and lib.tokenizer is tiny_sd1.tokenizers[0]
    assert lib.api_info() == {"loaded": {}, "skipped": {}}


def test_refresh_sees_new_changed_and_removed_files(tmp_path, tok):
    root = tmp_path / "emb"
    root.mkdir()
    lib = EmbeddingLibrary(root, tok, {"": 32})
    assert lib.loaded == {}
    save_embedding_a1111(root / "newstyle.safetensors", "newstyle", _vec(1, 32))
    lib.refresh()
    assert list(lib.loaded) == ["newstyle"]
    state = lib._scan
    lib.refresh()
    assert lib._scan is state  # nothing changed: no rescan
    save_embedding_a1111(root / "newstyle.safetensors", "newstyle", _vec(4, 32))
    lib.refresh()
    assert lib.get("newstyle").num_vectors == 4
    (root / "newstyle.safetensors").unlink()
    lib.refresh()
    assert lib.loaded == {}
