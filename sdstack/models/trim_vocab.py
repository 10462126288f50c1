"""Trim a model's text-encoder vocabulary to the tokens it can use (`sdstack train trim-vocab`).

A model trained from scratch on its own captions (the built-in shapes-v1) learns rows of its token table only for
the tokens those captions use; the other 49,000 of CLIP's 49,408 rows keep their random initialisation and take
most of the file (12.6 MB of shapes-v1's 33.7 MB in fp16). Trimming keeps CLIP's first `keep` merges (the common
English words and word pieces) plus every merge the given texts need, in CLIP's order, and the rows of those tokens:

- every kept word tokenizes to the same tokens as before, so the text encoder's output for such a text is the same,
  bit for bit (its token ids change; the rows move with them);
- any other text still tokenizes, into shorter pieces the vocabulary has (no unknown token);
- the folder stays a diffusers folder: stock transformers' CLIPTokenizer reads the smaller vocab.json/merges.txt,
  the text encoder's config states the new vocab_size and special-token ids.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .tokenizer import ClipTokenizer

TOKEN_TABLES = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")  # transformers 4 / 5


def world_texts(samples: int = 20000) -> list[str]:
    """The shapes world's texts: `samples` random training captions (every kind, every split), the eval suites'
    prompts, the concept prompts and captions (ring, crescent, outline) with the usual triggers, and every synonym
    the caption templates know."""
    from ..data import captions as cap
    from ..data.shapes import random_spec
    from ..eval.concepts import CONCEPTS, concept_prompts
    from ..eval.suites import SUITE_NAMES, get_suite

    rng = random.Random(0)
    texts = [cap.render_caption(random_spec(rng, split=rng.choice(("train", "heldout"))), rng) for _ in range(samples)]
    texts += [p.text for name in SUITE_NAMES for p in get_suite(name)]
    for concept in CONCEPTS:
        for token in ("sks", "zwx"):
            texts += [p.prompt for p in concept_prompts(concept, token)]
    words = [*cap.COLOURS, *cap.SHAPES, *cap.SIZES, *cap.PLACES, *cap.RELATIONS, *cap.PREFIXES]
    for table in (cap.COLOUR_WORDS, cap.SIZE_WORDS, cap.COUNT_WORDS, cap.PLACE_WORDS, cap.RELATION_WORDS):
        words += [w for options in table.values() for w in options]
    words += [w for options in cap.SHAPE_WORDS.values() for pair in options for w in pair]
    words += [b.format("a") for b in cap.BACKGROUND_WORDS] + ["there is", "there are", "an", "and", ", and"]
    words += ["ring", "rings", "crescent", "crescents", "outline", "outlined", "style", "sks", "zwx"]
    return texts + words


def trim_model_vocabulary(source: str | Path, dest: str | Path, *, keep: int = 10000, texts=()) -> dict:
    """Write `source` (a diffusers folder with one CLIP text encoder) to `dest` with its vocabulary trimmed to CLIP's
    first `keep` merges plus those `texts` need. Returns counts; the texts' tokens are checked to be unchanged."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(source), Path(dest)
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src}: not a diffusers model folder (no model_index.json)")
    if (src / "text_encoder_2").exists():
        raise UserError(f"{src}: two text encoders (SDXL); trimming is for one-encoder models")
    files = sorted((src / "text_encoder").glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{src / 'text_encoder'}: expected one .safetensors weight file, found {len(files)}")
    if keep < 0:
        raise UserError("--keep must be 0 or more", field="keep")
    state = load_file(files[0])
    key = next((k for k in TOKEN_TABLES if k in state), None)
    if key is None:
        raise UserError(f"{files[0]}: no token table ({' or '.join(TOKEN_TABLES)})")
    table = state[key]
    try:  # CLIP's own vocabulary or an already trimmed one, with the folder's pad token
        old = ClipTokenizer.from_pretrained(src / "tokenizer")
    except ValueError as e:
        raise UserError(str(e)) from None
    if old.vocab_size != table.shape[0]:
        raise UserError(f"{src / 'tokenizer'}: {old.vocab_size} tokens, but the text encoder has {table.shape[0]}")
    texts = list(texts)
    new = old.trimmed(keep, texts)
    rows = new.row_index(old)
    for t in texts:  # the promise: a kept text tokenizes to the same tokens
        if [old.decoder[i] for i in old.encode(t)] != [new.decoder[i] for i in new.encode(t)]:
            raise RuntimeError(f"trimming changed the tokens of {t!r}")  # a bug, not a user error
    state[key] = table[torch.tensor(rows)].contiguous()
    config = json.loads((src / "text_encoder" / "config.json").read_text())
    config.update(vocab_size=new.vocab_size, bos_token_id=new.bos_token_id, eos_token_id=new.eos_token_id,
                  pad_token_id=new.pad_token_id)

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("tokenizer"))
    save_file(state, tmp / "text_encoder" / files[0].name, metadata={"format": "pt"})
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    new.save_pretrained(tmp / "tokenizer")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return {"tokens_before": old.vocab_size, "tokens_after": new.vocab_size, "texts": len(texts),
            "bytes_before": table.numel() * table.element_size(),
            "bytes_after": state[key].numel() * table.element_size()}
