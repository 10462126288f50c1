"""Textual-inversion embeddings with AUTOMATIC1111's semantics.

File formats read (name = file stem):
- A1111 `.pt`: `{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, width]}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}` (older files hold a ParameterDict; it is allowed, nothing else is);
- `.safetensors` with `emb_params` [n, width] (kohya / A1111-compatible), or `clip_l` + `clip_g` (SDXL);
- diffusers `learned_embeds.bin/.safetensors`: `{"<token>": [width] or [n, width]}`.
Vectors are keyed by text encoder: "" for single-encoder models (SD1/SD2), "clip_l"/"clip_g" for SDXL's two.

In a prompt the embedding's name (tokenized like any text) is replaced by its n vectors (A1111's
EmbeddingDatabase / `find_embedding_at_position`); an embedding whose width does not fit the model's text
encoder is skipped and listed with the reason.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UnsafeCheckpointError, UserError, unknown_name
from .hashing import HashCache
from .io import read_safetensors_metadata
from ..fsio import atomic_path

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    """One textual-inversion embedding; `vectors[key]` is float32 [n, width]."""

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    hash: str | None = None  # sha256 of the file; `TI hashes` shows its first 12 hex
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def shape(self) -> int:
        """A1111's `shape`: the vector width, summed over encoders for SDXL (768 + 1280 = 2048)."""
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    @property
    def shorthash(self) -> str | None:
        return self.hash[:12] if self.hash else None

    def api_info(self) -> dict:
        """One entry of A1111's GET /sdapi/v1/embeddings."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.num_vectors}


# ---------------------------------------------------------------------------------------------- reading


def _load_pickle(p: Path) -> object:
    """torch.load(weights_only=True); A1111's old ParameterDict wrapper is the one extra class allowed."""
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(f"{p}: refused: this pickle needs arbitrary code to load ({first}); "
                                    "convert it to .safetensors with a tool you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{p}: corrupt or unreadable embedding file ({str(e).splitlines()[0][:200]})") from None


def _as_matrix(t: torch.Tensor, where: str) -> torch.Tensor:
    t = t.detach().to(torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise UserError(f"{where}: expected embedding vectors of shape [n, width], got {list(t.shape)}")
    return t.contiguous()


def vectors_from_data(data: object, where: str) -> dict[str, torch.Tensor]:
    """The vectors of a loaded embedding file, keyed "" or clip_l/clip_g (A1111 `create_embedding_from_data`)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: not an embedding file (found {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = dict(getattr(params, "_parameters", params))
        if len(params) != 1:
            raise UserError(f"{where}: embedding file has {len(params)} terms in it; expected one")
        return {"": _as_matrix(next(iter(params.values())), where)}
    if all(k in data for k in SDXL_KEYS):
        vec = {k: _as_matrix(data[k], f"{where} [{k}]") for k in SDXL_KEYS}
        if vec["clip_l"].shape[0] != vec["clip_g"].shape[0]:
            raise UserError(f"{where}: clip_l and clip_g hold different numbers of vectors")
        return vec
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # `emb_params` (kohya/A1111 safetensors) or diffusers {"<token>": tensor}
        return {"": _as_matrix(next(iter(tensors.values())), where)}
    raise UserError(f"{where}: not a textual-inversion embedding (keys: {', '.join(sorted(map(str, data))[:8])})")


def _int_or_none(v) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _str_or_none(v) -> str | None:
    return None if v in (None, "") else str(v)


def read_embedding(path: str | Path, hash_cache: HashCache | None = None) -> Embedding:
    """Read an embedding file (.pt/.bin via the weights-only unpickler, or .safetensors); name = file stem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"embedding file not found: {p}")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data: dict = dict(read_safetensors_metadata(p))
        data.update(load_file(str(p), device="cpu"))
    elif p.suffix.lower() in (".pt", ".bin"):
        data = _load_pickle(p)  # type: ignore[assignment]
    else:
        raise UserError(f"{p}: unsupported embedding file type {p.suffix!r}; use .pt, .bin or .safetensors")
    vectors = vectors_from_data(data, str(p))
    return Embedding(name=p.stem, vectors=vectors, step=_int_or_none(data.get("step")),
                     sd_checkpoint=_str_or_none(data.get("sd_checkpoint")),
                     sd_checkpoint_name=_str_or_none(data.get("sd_checkpoint_name")),
                     hash=(hash_cache or HashCache(None)).sha256(p), path=p)


def embedding_keys(bundle) -> list[str]:
    """The vectors key each of the bundle's text encoders reads: [""] or ["clip_l", "clip_g"] (SDXL)."""
    return list(SDXL_KEYS) if len(bundle.text_encoders) == 2 else [""]


def expected_widths(bundle) -> dict[str, int]:
    """{vectors key: token-embedding width} for the bundle's text encoders."""
    return {k: int(te.config.hidden_size) for k, te in zip(embedding_keys(bundle), bundle.text_encoders)}


# ---------------------------------------------------------------------------------------------- writing


def save_embedding_a1111(path: str | Path, name: str, vectors: torch.Tensor | dict[str, torch.Tensor], *,
                         step: int | None = None, sd_checkpoint: str | None = None,
                         sd_checkpoint_name: str | None = None) -> Path:
    """Write an embedding A1111 loads: `.safetensors` with `emb_params` (or clip_l/clip_g for SDXL) and the
    name/step/checkpoint in the header, or A1111's own `.pt` layout (`string_to_param`). Atomic (temp + rename)."""
    p = Path(path)
    if isinstance(vectors, torch.Tensor):
        vectors = {"": vectors}
    vec = {k: _as_matrix(v, name).cpu() for k, v in vectors.items()}
    if set(vec) not in ({""}, set(SDXL_KEYS)):
        raise ValueError(f"vectors must be one tensor or a dict with keys {SDXL_KEYS}, got {sorted(vec)}")
    info = {"name": name, "step": step, "sd_checkpoint": sd_checkpoint, "sd_checkpoint_name": sd_checkpoint_name}
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            tensors = {"emb_params": vec[""]} if "" in vec else vec
            save_file(tensors, tmp, metadata={k: str(v) for k, v in info.items() if v is not None})
        else:
            payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec[""]}} if "" in vec else dict(vec)
            torch.save({**payload, **info}, tmp)
    return p


# ---------------------------------------------------------------------------------------------- the folder


def _describe_widths(widths: dict[str, int]) -> str:
    return ", ".join(f"{k} width {w}" if k else f"width {w}" for k, w in widths.items())


@dataclass
class _Scan:
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # skipped or unreadable file -> why
    lookup: dict[int, list[tuple[tuple[int, ...], Embedding]]] = field(default_factory=dict)


class EmbeddingsByName:
    """A fixed set of embeddings matched against prompt tokens by name (longest name first): the embeddings
    bundled in a job's LoRAs, or the one a fine-tune is training (its sample images)."""

    def __init__(self, embeddings, tokenizer):
        self.entries = sorted(((tuple(tokenizer.encode(e.name)), e) for e in embeddings), key=lambda x: -len(x[0]))

    def find_at(self, token_ids, offset: int) -> tuple[Embedding, int] | None:
        for ids, emb in self.entries:
            if ids and tuple(int(t) for t in token_ids[offset:offset + len(ids)]) == ids:
                return emb, len(ids)
        return None


class EmbeddingLibrary:
    """The embeddings folder (A1111 `embeddings/`), scanned recursively, matched against prompt tokens.

    `expected` maps each vectors key to the model's width (see `expected_widths`); embeddings that do not
    fit are skipped with a reason. A ModelBundle may be passed instead of a tokenizer: its first tokenizer
    and its text encoders' widths are used. `refresh()` rescans when files were added, removed or changed."""

    def __init__(self, directory: str | Path, tokenizer, expected: dict[str, int] | None = None,
                 hash_cache: HashCache | None = None):
        if hasattr(tokenizer, "text_encoders"):  # a ModelBundle
            expected = expected_widths(tokenizer) if expected is None else expected
            tokenizer = tokenizer.tokenizers[0]
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.expected = dict(expected) if expected is not None else None
        self.hash_cache = hash_cache
        self._scan: _Scan | None = None
        self._signature: tuple | None = None

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.rglob("*")
                      if p.suffix.lower() in EMBEDDING_EXTENSIONS and p.is_file() and p.stat().st_size > 0)

    def refresh(self, force: bool = False) -> None:
        files = self._files()
        signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if force or self._scan is None or signature != self._signature:
            self._scan = self._build(files)
            self._signature = signature

    def _build(self, files: list[Path]) -> _Scan:
        scan = _Scan()
        for p in files:
            try:
                emb = read_embedding(p, self.hash_cache)
            except (UserError, OSError) as e:
                log.warning("embedding %s not loaded: %s", p.name, e)
                scan.reasons[p.stem] = str(e)
                continue
            reason = self._mismatch(emb)
            if reason is None:
                reason = self._register(scan, emb)
            if reason is not None:
                scan.skipped[emb.name] = emb
                scan.reasons[emb.name] = reason
        return scan

    def _mismatch(self, emb: Embedding) -> str | None:
        """Why this embedding does not fit the model (None if it does)."""
        if self.expected is None:
            return None
        got = {k: int(v.shape[-1]) for k, v in emb.vectors.items()}
        if got == self.expected:
            return None
        return (f"vectors do not fit this model: the embedding has {_describe_widths(got)}; "
                f"the model expects {_describe_widths(self.expected)}")

    def _register(self, scan: _Scan, emb: Embedding) -> str | None:
        ids = tuple(self.tokenizer.encode(emb.name))
        if not ids:
            return "its name tokenizes to nothing, so no prompt can refer to it"
        if emb.name in scan.loaded:  # same stem in two folders: the later file wins (A1111 replaces too)
            old = scan.loaded.pop(emb.name)
            for entries in scan.lookup.values():
                entries[:] = [e for e in entries if e[1] is not old]
        scan.loaded[emb.name] = emb
        entries = scan.lookup.setdefault(ids[0], [])
        entries.append((ids, emb))
        entries.sort(key=lambda e: len(e[0]), reverse=True)  # longest name first
        return None

    @property
    def _state(self) -> _Scan:
        if self._scan is None:
            self.refresh()
        return self._scan  # type: ignore[return-value]

    @property
    def loaded(self) -> dict[str, Embedding]:
        return self._state.loaded

    @property
    def skipped(self) -> dict[str, Embedding]:
        return self._state.skipped

    @property
    def skip_reasons(self) -> dict[str, str]:
        return self._state.reasons

    def get(self, name: str) -> Embedding:
        emb = self.loaded.get(name)
        if emb is None:
            raise unknown_name("embedding", name, list(self.loaded), field="embedding")
        return emb

    def find_at(self, token_ids, offset: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at token_ids[offset] (longest match), with how many tokens
        the name takes; the embedding itself occupies `num_vectors` positions."""
        candidates = self._state.lookup.get(int(token_ids[offset]))
        for ids, emb in candidates or ():
            if tuple(int(t) for t in token_ids[offset:offset + len(ids)]) == ids:
                return emb, len(ids)
        return None

    def api_info(self) -> dict:
        """A1111's GET /sdapi/v1/embeddings body."""
        return {"loaded": {n: e.api_info() for n, e in self.loaded.items()},
                "skipped": {n: e.api_info() for n, e in self.skipped.items()}}
