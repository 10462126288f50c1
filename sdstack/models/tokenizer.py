"""CLIP byte-level BPE tokenizer, built offline from the packaged vocabulary.

The vocabulary file is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence), the same one every
SD 1.x/2.x/SDXL text encoder was trained with. Token ids: 49406 = <|startoftext|>, 49407 = <|endoftext|>.
SD 1.x and SDXL's first encoder pad with 49407; OpenCLIP encoders (SD 2.x, SDXL's second) pad with 0.

A model may also come with a smaller vocabulary: the first N of CLIP's merges plus the ones its own captions need
(`ClipTokenizer.trimmed`; the built-in model ships one). Every text still tokenizes (a word the vocabulary lacks
splits into shorter known pieces), the kept words tokenize exactly as in the full vocabulary, and the model's token
table holds only their rows. Such a vocabulary lives in the model folder's `tokenizer/` as vocab.json and
merges.txt, which stock transformers' CLIPTokenizer reads too.
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


Tables = tuple[dict[str, int], dict[tuple[str, str], int]]  # token -> id, merge -> rank


def _build(merges: list[tuple[str, str]]) -> Tables:
    """CLIP's layout: the 256 byte characters, the same with </w>, one token per merge in rank order, then the two
    specials."""
    base = list(_byte_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


@functools.lru_cache(maxsize=1)
def _tables() -> Tables:
    raw = resources.files("sdstack.models").joinpath("vocab/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    return _build([tuple(line.split()) for line in lines])


def _bpe(token: str, ranks) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE of one pre-token: its pieces, and the merges applied (in order)."""
    used = []
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        word = _merge(word, best)
    return word, used


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def _clean(text: str) -> str:
    # As transformers' CLIPTokenizer (what A1111 and diffusers use): whitespace collapsed, lower-cased;
    # no HTML unescaping (OpenAI's original tokenizer unescapes; SD front-ends do not).
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """`encode(text)` -> ids without specials; `__call__(text)` -> [BOS, ids..., EOS, pad...] of max_length.

    `tables`: another vocabulary (token -> id, merge -> rank); None is CLIP's own. `pad_token_id` counts in it."""

    def __init__(self, pad_token_id: int = EOS, model_max_length: int = 77, tables: Tables | None = None):
        self._tables = tables
        enc = self.encoder
        self.bos_token_id = enc["<|startoftext|>"]
        self.eos_token_id = enc["<|endoftext|>"]
        self.vocab_size = len(enc)
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length
        self._cache: dict[str, list[int]] = {}

    @property
    def encoder(self) -> dict[str, int]:
        return (self._tables or _tables())[0]

    @property
    def ranks(self) -> dict[tuple[str, str], int]:
        return (self._tables or _tables())[1]

    @property
    def is_standard(self) -> bool:
        """Whether this is CLIP's full vocabulary (the one every SD 1.x/2.x/SDXL text encoder has)."""
        return self._tables is None

    @property
    def pad_token(self) -> str:
        return self.decoder[self.pad_token_id]

    def merges(self) -> list[tuple[str, str]]:
        """The merges in rank order (`_build` made the rank table in that order)."""
        return list(self.ranks)

    @classmethod
    def from_merges(cls, merges, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> "ClipTokenizer":
        """A vocabulary in CLIP's layout made of these merges (in rank order); the pad token named as a string."""
        merges = [tuple(m) for m in merges]
        if merges == list(_tables()[1]):
            tables = None
        else:
            tables = _build(merges)
        enc = (tables or _tables())[0]
        if pad_token not in enc:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        return cls(pad_token_id=enc[pad_token], model_max_length=model_max_length, tables=tables)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ClipTokenizer":
        """The vocabulary of a transformers tokenizer folder (vocab.json, merges.txt, special_tokens_map.json) in
        CLIP's layout. ValueError when the files are missing, unreadable or not in that layout."""
        d = Path(directory)
        try:
            lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
            special = json.loads((d / "special_tokens_map.json").read_text(encoding="utf-8")) \
                if (d / "special_tokens_map.json").is_file() else {}
            config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")) \
                if (d / "tokenizer_config.json").is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{d}: unreadable tokenizer ({e})") from None
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{d / 'merges.txt'}: a line is not one merge (two tokens)")
        pad = special.get("pad_token", "<|endoftext|>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        tok = cls.from_merges(merges, pad, int(config.get("model_max_length", 77)))
        if tok.encoder != vocab:
            raise ValueError(f"{d}: vocab.json is not CLIP's layout of merges.txt (bytes, merges, specials)")
        return tok

    def trimmed(self, keep: int, texts) -> "ClipTokenizer":
        """A smaller vocabulary: the first `keep` merges and every merge that the words of `texts` use, in their
        order. Those words tokenize exactly as here; any other text still tokenizes, into shorter pieces."""
        order = self.merges()
        wanted = set(order[:keep])
        ranks, b2u = self.ranks, _byte_to_unicode()
        for text in texts:
            for piece in _PATTERN.findall(_clean(text)):
                if piece in ("<|startoftext|>", "<|endoftext|>"):
                    continue
                wanted.update(_bpe("".join(b2u[b] for b in piece.encode("utf-8")), ranks)[1])
        return ClipTokenizer.from_merges([m for m in order if m in wanted], self.pad_token, self.model_max_length)

    def row_index(self, source: "ClipTokenizer") -> list[int]:
        """For each id of this vocabulary, the id of the same token in `source` (to take a token table's rows
        from a model with that vocabulary). KeyError naming a token `source` lacks."""
        src = source.encoder
        missing = [t for t in self.encoder if t not in src]
        if missing:
            raise KeyError(f"{len(missing)} tokens are not in the source vocabulary (e.g. {missing[0]!r})")
        return [src[t] for t, _ in sorted(self.encoder.items(), key=lambda kv: kv[1])]

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        return {i: t for t, i in self.encoder.items()}

    def _bpe(self, token: str) -> list[str]:
        return _bpe(token, self.ranks)[0]

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
        ids = [self.bos_token_id] + self.encode(text)[: n - 2] + [self.eos_token_id]
        return ids + [self.pad_token_id] * (n - len(ids))

    def decode(self, ids: list[int]) -> str:
        u2b = {u: b for b, u in _byte_to_unicode().items()}
        text = "".join(self.decoder[i] for i in ids if i not in (self.bos_token_id, self.eos_token_id))
        return bytearray(u2b[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write vocab.json/merges.txt/configs so stock transformers' CLIPTokenizer reads the same vocabulary."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        enc = self.encoder
        (d / "vocab.json").write_text(json.dumps(enc, ensure_ascii=False), encoding="utf-8")
        merges = self.merges()
        (d / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        pad = self.pad_token
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (d / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
        config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.model_max_length,
                      do_lower_case=True, errors="replace", add_prefix_space=False)
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
