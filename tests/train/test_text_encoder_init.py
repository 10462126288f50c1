"""The text encoder's token-embedding init: with CLIP's own (std 0.02) every word comes out of a fresh encoder
almost the same; `text_encoder.token_embedding_std` gives each word its own direction from step 0."""

import torch
import torch.nn.functional as F

from sdstack.models.tokenizer import ClipTokenizer
from sdstack.train.config import Text2ImageConfig
from sdstack.train.text2image import PAD, build_text_encoder

CAPTIONS = ["a red circle", "a red square"]  # the shape word is token 3 (after <start>, "a", "red")


def _shape_word_cosine(std: float) -> tuple[float, torch.Tensor]:
    cfg = Text2ImageConfig()
    cfg.text_encoder.token_embedding_std = std
    torch.manual_seed(0)
    te = build_text_encoder(cfg).eval()
    tok = ClipTokenizer(pad_token_id=PAD)
    ids = torch.tensor([tok(c) for c in CAPTIONS])
    with torch.no_grad():
        h = te(input_ids=ids).last_hidden_state[:, 3]
    return float(F.cosine_similarity(h[0], h[1], dim=0)), te.get_input_embeddings().weight.detach()


def test_default_keeps_clip_init_and_words_look_alike():
    cos, emb = _shape_word_cosine(0.0)
    assert abs(float(emb.std()) - 0.02) < 0.002  # transformers' CLIP init: normal(0, 0.02)
    assert cos > 0.85


def test_larger_embedding_std_separates_the_words():
    cos, emb = _shape_word_cosine(1.0)
    assert abs(float(emb.std()) - 1.0) < 0.01
    assert cos < 0.5
