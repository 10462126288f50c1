"""A1111 prompt text -> conditioning tensors (weighted 75-token chunks, emphasis, clip skip, embeddings).

Semantics follow AUTOMATIC1111's FrozenCLIPEmbedderWithCustomWords: the prompt is split into weighted
fragments, tokenised, packed into chunks of 75 tokens (BREAK starts a new chunk; a chunk that fills up moves
the words after its last comma, if that comma is within 20 tokens of the end, into the next chunk), each chunk
is wrapped as [BOS] + 75 + [EOS], padded with EOS (OpenCLIP: pad id after the first EOS), encoded separately,
and the chunk outputs are concatenated. "Original" emphasis multiplies each token's vector by its weight and
restores the chunk's original mean.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .parser import parse_prompt_attention

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, object]] = field(default_factory=list)  # (offset in tokens, Embedding)


@dataclass
class Cond:
    """Conditioning of one prompt: context [n_chunks*77, D]; pooled [D2] for SDXL."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


def _comma_id(tokenizer) -> int:
    return tokenizer.encoder.get(",</w>", 267)


class _Packer:
    """Packs weighted tokens into chunks of CHUNK tokens (A1111's tokenize_line)."""

    def __init__(self, comma: int, eos: int):
        self.comma, self.eos = comma, eos
        self.chunks: list[Chunk] = []
        self.chunk = Chunk()
        self.last_comma = -1

    def next_chunk(self) -> None:
        c = self.chunk
        pad = CHUNK - len(c.tokens)
        c.tokens += [self.eos] * pad
        c.weights += [1.0] * pad
        self.chunks.append(c)
        self.chunk, self.last_comma = Chunk(), -1

    def _backtrack(self) -> None:
        c = self.chunk
        cut = self.last_comma + 1
        moved_t, moved_w = c.tokens[cut:], c.weights[cut:]
        c.tokens, c.weights = c.tokens[:cut], c.weights[:cut]
        self.next_chunk()
        self.chunk.tokens, self.chunk.weights = moved_t, moved_w

    def add(self, tokens: list[int], weight: float, embeddings=None) -> None:
        pos = 0
        while pos < len(tokens):
            tok, c = tokens[pos], self.chunk
            if tok == self.comma:
                self.last_comma = len(c.tokens)
            elif len(c.tokens) == CHUNK and self.last_comma != -1 and len(c.tokens) - self.last_comma <= COMMA_BACKTRACK:
                self._backtrack()
            if len(self.chunk.tokens) == CHUNK:
                self.next_chunk()
            hit = embeddings.find_at(tokens, pos) if embeddings is not None else None
            if hit is None:
                self.chunk.tokens.append(tok)
                self.chunk.weights.append(weight)
                pos += 1
                continue
            emb, n_name = hit
            n_vec = emb.num_vectors
            if len(self.chunk.tokens) + n_vec > CHUNK:
                self.next_chunk()
            self.chunk.fixes.append((len(self.chunk.tokens), emb))
            self.chunk.tokens += [0] * n_vec
            self.chunk.weights += [weight] * n_vec
            pos += n_name

    def finish(self) -> list[Chunk]:
        if self.chunk.tokens or not self.chunks:
            self.next_chunk()
        return self.chunks


def tokenize_prompt(text: str, tokenizer, embeddings=None) -> tuple[list[Chunk], int]:
    """Prompt -> chunks of 75 weighted tokens (no BOS/EOS yet) and the prompt's token count."""
    packer = _Packer(_comma_id(tokenizer), tokenizer.eos_token_id)
    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == -1:
            packer.next_chunk()
            continue
        packer.add(tokenizer.encode(fragment), weight, embeddings)
    chunks = packer.finish()
    count = sum(len(c.tokens) for c in chunks[:-1]) + len(chunks[-1].tokens)
    return chunks, count


def _embedding_vectors(emb, encoder_index: int, n_encoders: int) -> torch.Tensor:
    vectors = emb.vectors
    if n_encoders == 2:
        return vectors["clip_l" if encoder_index == 0 else "clip_g"]
    return next(iter(vectors.values()))


SHARED_ENTRIES = 32  # encodings kept per model across jobs (the negative prompt, a prompt rendered again)
_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()
_OWN_HOOKS = "transformers.utils.output_capturing"  # transformers' hooks that record hidden states, read-only


def _foreign_hooks(m: torch.nn.Module) -> bool:
    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return any(getattr(h, "__module__", None) != _OWN_HOOKS for h in hooks)


def _encoders_state(encoders) -> tuple | None:
    """What an encoding depends on besides its tokens: every text-encoder tensor's storage, version, dtype and
    device. None where an encoding must not be reused: an encoder in training mode (dropout), a forward hook (other
    than transformers' own output-capturing ones), or a module from outside transformers and torch (a PEFT adapter,
    which can be switched off without any tensor changing)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return None
    state = []
    for enc in encoders:
        if enc.training:
            return None
        for m in enc.modules():
            if _foreign_hooks(m) or not type(m).__module__.startswith(("transformers.", "torch.")):
                return None
        tensors = list(enc.parameters()) + list(enc.buffers())
        state.append((id(enc), tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)))
    return tuple(state)


class TextConditioner:
    """Encodes prompts for one model; caches per text. `clip_skip` applies to SD 1.x/2.x as in A1111.

    Encodings are also kept across jobs, per model (the last SHARED_ENTRIES; A1111 keeps the last prompt's and
    negative prompt's): the same tokens, weights, clip skip and emphasis through unchanged text-encoder weights
    give the same tensors, so a job whose negative prompt (or prompt) was encoded before does not encode it again.
    Prompts with textual-inversion embeddings are always encoded anew."""

    def __init__(self, bundle, clip_skip: int = 1, embeddings=None, emphasis: str = "Original"):
        self.bundle = bundle
        self.clip_skip = max(1, int(clip_skip))
        self.embeddings = embeddings
        self.emphasis = emphasis
        self._cache: dict[str, Cond] = {}
        self.used_embeddings: dict[str, object] = {}

    @torch.no_grad()
    def __call__(self, text: str) -> Cond:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def _encode(self, text: str) -> Cond:
        b = self.bundle
        chunks, _ = tokenize_prompt(text, b.tokenizers[0], self.embeddings)
        for c in chunks:
            for _, emb in c.fixes:
                self.used_embeddings[emb.name] = emb
        key = self._shared_key(chunks)
        shared = None
        if key is not None:
            with _SHARED_LOCK:
                shared = _SHARED.setdefault(b.text_encoders[0], OrderedDict())
                hit = shared.get(key)
                if hit is not None:
                    shared.move_to_end(key)
                    return hit
        cond = self._encode_chunks(chunks)
        if shared is not None:
            with _SHARED_LOCK:
                shared[key] = cond
                while len(shared) > SHARED_ENTRIES:
                    shared.popitem(last=False)
        return cond

    def _shared_key(self, chunks: list[Chunk]) -> tuple | None:
        if any(c.fixes for c in chunks):
            return None
        state = _encoders_state(self.bundle.text_encoders)
        if state is None:
            return None
        tokens = tuple((tuple(c.tokens), tuple(c.weights)) for c in chunks)
        return (self.bundle.family, self.clip_skip, self.emphasis, tokens, state)

    def _encode_chunks(self, chunks: list[Chunk]) -> Cond:
        b = self.bundle
        per_chunk, pooled = [], None
        for i, chunk in enumerate(chunks):
            outs = [self._encode_chunk(chunk, k) for k in range(len(b.text_encoders))]
            z = torch.cat([o[0] for o in outs], dim=-1)
            per_chunk.append(self._emphasis(z, chunk))
            if i == 0 and b.family == "sdxl":
                pooled = outs[-1][1]
        return Cond(context=torch.cat(per_chunk, dim=0), pooled=pooled)

    def _emphasis(self, z: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        if self.emphasis in ("None", "Ignore"):
            return z
        w = torch.tensor([1.0] + chunk.weights + [1.0], dtype=z.dtype, device=z.device).unsqueeze(-1)
        if self.emphasis == "No norm":
            return z * w
        before = z.mean()
        z = z * w
        after = z.mean()
        return z * (before / after) if after != 0 else z

    def _encode_chunk(self, chunk: Chunk, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.bundle
        enc, tok = b.text_encoders[k], b.tokenizers[k]
        ids = [tok.bos_token_id] + chunk.tokens + [tok.eos_token_id]
        if tok.pad_token_id != tok.eos_token_id:
            first_eos = ids.index(tok.eos_token_id)
            ids = ids[: first_eos + 1] + [tok.pad_token_id] * (len(ids) - first_eos - 1)
        device = b.device
        input_ids = torch.tensor([ids], device=device)
        hook = None
        if chunk.fixes:
            fixes = [(off + 1, _embedding_vectors(e, k, len(b.text_encoders))) for off, e in chunk.fixes]
            hook = enc.get_input_embeddings().register_forward_hook(_replace_rows(fixes))
        try:
            out = enc(input_ids=input_ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        if b.family == "sdxl":
            z = out.hidden_states[-2]
            pooled = out.text_embeds[0] if k == 1 else None
        else:
            z = final_layer_norm(enc)(out.hidden_states[-self.clip_skip])
            pooled = None
        return z[0], pooled


def final_layer_norm(encoder) -> torch.nn.Module:
    """The encoder's final LayerNorm (transformers 5 dropped the `text_model` wrapper)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _replace_rows(fixes):
    def hook(module, inputs, output):
        output = output.clone()
        for offset, vectors in fixes:
            n = min(vectors.shape[0], output.shape[1] - offset)
            output[0, offset : offset + n] = vectors[:n].to(output.dtype)
        return output

    return hook
