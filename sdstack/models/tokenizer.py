"""CLIP byte-level BPE tokenizer, built offline from the packaged vocabulary.

The vocabulary file is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence), the same one every
SD 1.x/2.x/SDXL text encoder was trained with. Token ids: 49406 = <|startoftext|>, 49407 = <|endoftext|>.
SD 1.x and SDXL's first encoder pad with 49407; OpenCLIP encoders (SD 2.x, SDXL's second) pad with 0.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

import regex

BOS, EOS = 49406, 49407
VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    raw = resources.files("sdstack.models").joinpath("vocab/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(_byte_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


def _clean(text: str) -> str:
    # As transformers' CLIPTokenizer (what A1111 and diffusers use): whitespace collapsed, lower-cased;
    # no HTML unescaping (OpenAI's original tokenizer unescapes; SD front-ends do not).
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """`encode(text)` -> ids without specials; `__call__(text)` -> [BOS, ids..., EOS, pad...] of max_length."""

    bos_token_id = BOS
    eos_token_id = EOS
    vocab_size = VOCAB_SIZE

    def __init__(self, pad_token_id: int = EOS, model_max_length: int = 77):
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self._cache: dict[str, list[int]] = {}

    @property
    def encoder(self) -> dict[str, int]:
        return _tables()[0]

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        return {i: t for t, i in self.encoder.items()}

    def _bpe(self, token: str) -> list[str]:
        ranks = _tables()[1]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        enc, b2u = self.encoder, _byte_to_unicode()
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            cached = self._cache.get(piece)
            if cached is None:
                mapped = "".join(b2u[b] for b in piece.encode("utf-8"))
                cached = [enc[t] for t in self._bpe(mapped)]
                if len(self._cache) < 100_000:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def __call__(self, text: str, max_length: int | None = None) -> list[int]:
        n = max_length or self.model_max_length
        ids = [BOS] + self.encode(text)[: n - 2] + [EOS]
        return ids + [self.pad_token_id] * (n - len(ids))

    def decode(self, ids: list[int]) -> str:
        u2b = {u: b for b, u in _byte_to_unicode().items()}
        text = "".join(self.decoder[i] for i in ids if i not in (BOS, EOS))
        return bytearray(u2b[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write vocab.json/merges.txt/configs so stock transformers' CLIPTokenizer reads the same vocabulary."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        enc, ranks = _tables()
        (d / "vocab.json").write_text(json.dumps(enc, ensure_ascii=False), encoding="utf-8")
        merges = sorted(ranks, key=ranks.get)
        (d / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        pad = self.decoder[self.pad_token_id]
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (d / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
        config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.model_max_length,
                      do_lower_case=True, errors="replace", add_prefix_space=False)
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
