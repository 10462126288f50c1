"""A lean inference forward for diffusers' `UNet2DConditionModel` (SD 1.x / 2.x / SDXL layouts), exact to it.

Small models are bound by per-operation overhead, not arithmetic: the built-in shapes-v1 UNet (6 M parameters,
16x16 latents) spends most of a step in Python module calls and in the fixed cost of each small kernel. This
forward runs the same arithmetic through fewer, larger operations:
  - one matmul for the self-attention's q, k and v (their weights concatenated), one for the cross-attention's k
    and v;
  - one matmul for the time-embedding projections of every resnet (concatenated), once per call;
  - the transformers' 1x1 `proj_in` / `proj_out` convolutions as matmuls on the (batch, pixels, channels) view;
  - no module dispatch, hooks, deprecation checks or dropout in the hot path.
Weights stay the model's own tensors (LoRA merges, optimizer steps and dtype casts are seen at once); the few
concatenated copies are rebuilt when any source tensor changes (its version counter, storage or dtype).

`FastUNet.build(unet)` returns None where the model holds anything this forward does not reproduce exactly (other
block or attention-processor classes, adapters wrapped around layers, forward hooks, attention masks, ...): the
caller then uses the model's own forward. Tests compare both on SD 1.x, 2.x and SDXL layouts.
"""

from __future__ import annotations

import os
import queue
import threading

import torch
import torch.nn.functional as F

_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
_MID = {"UNetMidBlock2DCrossAttn"}
_PROCESSORS = {"AttnProcessor2_0", "AttnProcessor"}


def _plain(module, cls) -> bool:
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


class _Fused:
    """A concatenation of several weight tensors, kept up to date with them.

    When a source changes in place (its version counter: a LoRA merge, an optimizer step) the concatenation is
    rewritten in place too, so traced graphs, which hold this very tensor, see the change without being traced
    again; only a new storage, dtype or shape makes a new tensor (and the runner then drops its traces)."""

    def __init__(self, parts: list[torch.Tensor | None], memory_format=torch.contiguous_format):
        self.parts = parts
        self.memory_format = memory_format
        self.key = None
        self.value = None

    def get(self) -> torch.Tensor | None:
        if self.parts[0] is None:
            return None
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in self.parts)
        if key != self.key:
            with torch.no_grad():
                fresh = torch.cat([p.detach() for p in self.parts], dim=0).contiguous(memory_format=self.memory_format)
                if self.value is not None and self.value.shape == fresh.shape and self.value.dtype == fresh.dtype:
                    self.value.copy_(fresh)
                else:
                    self.value = fresh
            self.key = key
        return self.value


def _conv_ok(conv) -> bool:
    return _plain(conv, torch.nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class _Conv:
    """A Conv2d run with a channels-last copy of its weight (kept up to date like the fused weights).

    On a CPU a small convolution with a channels-last weight takes oneDNN's NHWC kernels, which need no reorder of
    the weight at each call: 4.5% of a shapes-v1 UNet call at one thread (the model's own weights stay as they
    are; the copy costs the convolutions' weights once more in memory, and the fast path only runs small UNets)."""

    def __init__(self, conv):
        self.c = conv
        self.w = _Fused([conv.weight], torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        return F.conv2d(x, self.w.get(), c.bias, c.stride, c.padding, c.dilation, c.groups)


class _Resnet:
    def __init__(self, block):
        self.b = block
        self.conv1, self.conv2 = _Conv(block.conv1), _Conv(block.conv2)
        self.shortcut = _Conv(block.conv_shortcut) if block.conv_shortcut is not None else None
        self.temb_slice = slice(0)  # its columns of the fused time-embedding projection (set by FastUNet)

    @staticmethod
    def supported(block) -> bool:
        from diffusers.models.resnet import ResnetBlock2D

        return (_plain(block, ResnetBlock2D) and block.upsample is None and block.downsample is None
                and block.time_embedding_norm == "default" and not block.skip_time_act
                and isinstance(block.nonlinearity, torch.nn.SiLU) and block.time_emb_proj is not None
                and all(_conv_ok(m) for m in (block.conv1, block.conv2))
                and (block.conv_shortcut is None or _conv_ok(block.conv_shortcut))
                and _plain(block.time_emb_proj, torch.nn.Linear))

    def __call__(self, x: torch.Tensor, temb_all: torch.Tensor) -> torch.Tensor:
        b = self.b
        h = F.silu(F.group_norm(x, b.norm1.num_groups, b.norm1.weight, b.norm1.bias, b.norm1.eps))
        h = self.conv1(h)
        h = h + temb_all[:, self.temb_slice, None, None]
        h = F.silu(F.group_norm(h, b.norm2.num_groups, b.norm2.weight, b.norm2.bias, b.norm2.eps))
        h = self.conv2(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        out = x + h
        if b.output_scale_factor != 1.0:
            out = out / b.output_scale_factor
        return out


class _Attention:
    def __init__(self, attn, self_attention: bool):
        self.a = attn
        self.heads = attn.heads
        self.head_dim = attn.to_q.out_features // attn.heads
        if self_attention:
            self.qkv = _Fused([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        else:
            self.kv = _Fused([attn.to_k.weight, attn.to_v.weight])
        self.self_attention = self_attention

    @staticmethod
    def supported(attn) -> bool:
        from diffusers.models.attention_processor import Attention

        return (_plain(attn, Attention) and type(attn.processor).__name__ in _PROCESSORS
                and attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
                and all(_plain(m, torch.nn.Linear) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))
                and attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
                and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
                and not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.scale_qk
                and not attn.upcast_attention and not attn.upcast_softmax
                and abs(attn.scale - (attn.to_q.out_features // attn.heads) ** -0.5) < 1e-12)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values of `context`, as (batch, heads, tokens, d)."""
        k, v = F.linear(context, self.kv.get()).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, heads * d) -> (batch, heads, tokens, d) with fixed sizes only: a traced graph then holds
        # no shape arithmetic (size/Int nodes), which an interpreter step costs as much as a small kernel
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None,
                 kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a = self.a
        if self.self_attention:
            q, k, v = (self._heads(t) for t in F.linear(x, self.qkv.get()).chunk(3, dim=-1))
        else:
            q = self._heads(F.linear(x, a.to_q.weight))
            k, v = kv if kv is not None else self.project_context(context)
        h = F.scaled_dot_product_attention(q, k, v)
        return F.linear(h.transpose(1, 2).flatten(2), a.to_out[0].weight, a.to_out[0].bias)


class _Transformer:
    """Transformer2DModel on continuous inputs: GroupNorm, proj_in, BasicTransformerBlocks, proj_out, residual."""

    def __init__(self, model):
        self.m = model
        self.blocks = [(blk, _Attention(blk.attn1, True), _Attention(blk.attn2, False) if blk.attn2 else None)
                       for blk in model.transformer_blocks]

    @staticmethod
    def supported(model) -> bool:
        from diffusers.models.attention import BasicTransformerBlock, FeedForward, GELU, GEGLU
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        if not (_plain(model, Transformer2DModel) and model.is_input_continuous and model.norm is not None):
            return False
        proj = torch.nn.Linear if model.use_linear_projection else torch.nn.Conv2d
        if not (_plain(model.proj_in, proj) and _plain(model.proj_out, proj)):
            return False
        if not model.use_linear_projection and (model.proj_in.kernel_size != (1, 1)
                                                or model.proj_out.kernel_size != (1, 1)):
            return False
        for blk in model.transformer_blocks:
            if not (_plain(blk, BasicTransformerBlock) and blk.norm_type == "layer_norm" and blk.pos_embed is None
                    and not blk.only_cross_attention and blk._chunk_size is None
                    and getattr(blk, "fuser", None) is None):
                return False
            if not _Attention.supported(blk.attn1) or (blk.attn2 is not None and not _Attention.supported(blk.attn2)):
                return False
            ff = blk.ff
            if not (_plain(ff, FeedForward) and len(ff.net) in (3, 4)):
                return False
            act, out = ff.net[0], ff.net[2]
            if not (type(act) in (GEGLU, GELU) and _plain(act.proj, torch.nn.Linear) and _plain(out, torch.nn.Linear)):
                return False
            if type(act) is GELU and act.approximate != "none":
                return False
        return True

    def __call__(self, x: torch.Tensor, context: torch.Tensor, kv=None) -> torch.Tensor:
        """`kv`: an iterator over precomputed (keys, values) of the context, one pair per cross-attention, in order
        (FastUNet.context_kv), or None to project the context here."""
        m = self.m
        h = F.group_norm(x, m.norm.num_groups, m.norm.weight, m.norm.bias, m.norm.eps)
        h = h.flatten(2).transpose(1, 2)  # (b, pixels, channels), a view
        w_in = m.proj_in.weight
        h = F.linear(h, w_in if m.use_linear_projection else w_in.flatten(1), m.proj_in.bias)
        for blk, attn1, attn2 in self.blocks:
            n1 = blk.norm1
            h = attn1(F.layer_norm(h, n1.normalized_shape, n1.weight, n1.bias, n1.eps), None) + h
            if attn2 is not None:
                n2 = blk.norm2
                h = attn2(F.layer_norm(h, n2.normalized_shape, n2.weight, n2.bias, n2.eps), context,
                          next(kv) if kv is not None else None) + h
            n3 = blk.norm3
            f = F.layer_norm(h, n3.normalized_shape, n3.weight, n3.bias, n3.eps)
            act, out = blk.ff.net[0], blk.ff.net[2]
            f = F.linear(f, act.proj.weight, act.proj.bias)
            if act.__class__.__name__ == "GEGLU":
                f, gate = f.chunk(2, dim=-1)
                f = f * F.gelu(gate)
            else:
                f = F.gelu(f)
            h = F.linear(f, out.weight, out.bias) + h
        w_out = m.proj_out.weight
        h = F.linear(h, w_out if m.use_linear_projection else w_out.flatten(1), m.proj_out.bias)
        # (b, pixels, channels) back to (b, channels, h, w): a view in channels-last memory, the layout the
        # convolutions work in here (_Conv); with NCHW weights it would make each following convolution copy its
        # weight at every call
        return h.transpose(1, 2).reshape_as(x) + x


class FastUNet:
    """`fast(sample, timestep, context, added_cond_kwargs=None)` -> the UNet's output sample, as
    `unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=...).sample` gives it."""

    def __init__(self, unet):
        self.unet = unet
        resnets = []

        def res(block):
            r = _Resnet(block)
            resnets.append(r)
            return r

        self.down = []
        for blk in unet.down_blocks:
            attns = [_Transformer(a) for a in getattr(blk, "attentions", [])] or [None] * len(blk.resnets)
            self.down.append(([res(r) for r in blk.resnets], attns, [_Conv(d.conv) for d in blk.downsamplers or []]))
        mid = unet.mid_block
        self.mid = (res(mid.resnets[0]), [(_Transformer(a), res(r)) for a, r in zip(mid.attentions, mid.resnets[1:])])
        self.up = []
        for blk in unet.up_blocks:
            attns = [_Transformer(a) for a in getattr(blk, "attentions", [])] or [None] * len(blk.resnets)
            self.up.append(([res(r) for r in blk.resnets], attns, [_Conv(u.conv) for u in blk.upsamplers or []]))
        start = 0
        for r in resnets:
            n = r.b.time_emb_proj.out_features
            r.temb_slice = slice(start, start + n)
            start += n
        projs = [r.b.time_emb_proj for r in resnets]
        self.temb_w = _Fused([p.weight for p in projs])
        self.temb_b = _Fused([p.bias for p in projs])
        in_order = [a for _, attns, _ in self.down for a in attns if a is not None] + [a for a, _ in self.mid[1]]
        in_order += [a for _, attns, _ in self.up for a in attns if a is not None]
        attentions = [a for tr in in_order for _, a1, a2 in tr.blocks for a in (a1, a2) if a is not None]
        self.cross = [a2 for tr in in_order for _, _, a2 in tr.blocks if a2 is not None]  # in the order of a call
        self.conv_in, self.conv_out = _Conv(unet.conv_in), _Conv(unet.conv_out)
        convs = [self.conv_in, self.conv_out] + [c for r in resnets for c in (r.conv1, r.conv2, r.shortcut) if c]
        convs += [c for _, _, cs in self.down + self.up for c in cs]
        self.fused = [self.temb_w, self.temb_b] + [a.qkv if a.self_attention else a.kv for a in attentions]
        self.fused += [c.w for c in convs]

    def context_kv(self, context: torch.Tensor) -> list[torch.Tensor]:
        """Every cross-attention's keys and values of `context`, flat (k0, v0, k1, v1, ...) in call order: they
        depend only on the prompt, so a sampling run computes them once instead of at every step."""
        return [t for a in self.cross for t in a.project_context(context)]

    def sync_fused(self) -> None:
        """Bring every fused weight up to date (in place) with its sources: before a traced call, which reads them."""
        for f in self.fused:
            f.get()

    @classmethod
    def build(cls, unet) -> "FastUNet | None":
        """A FastUNet for `unet`, or None where its layout is not one this forward reproduces exactly."""
        return cls(unet) if cls.supports(unet) else None

    @staticmethod
    def supports(unet, modules: list | None = None) -> bool:
        """Whether this forward reproduces `unet` exactly (layout, attention processors, no adapters or hooks).
        `modules`: `list(unet.modules())` where the caller has it."""
        from diffusers import UNet2DConditionModel

        if not _plain(unet, UNet2DConditionModel):
            return False
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in (unet.modules() if modules is None else modules)):
            return False  # a hook anywhere: the traced graph would skip it
        c = unet.config
        if (c.class_embed_type is not None or c.addition_embed_type not in (None, "text_time")
                or c.time_cond_proj_dim is not None or c.encoder_hid_dim_type is not None
                or c.center_input_sample or unet.time_embed_act is not None
                or c.resnet_time_scale_shift != "default" or unet.conv_act is None
                or unet.conv_norm_out is None):
            return False
        if not isinstance(unet.conv_act, torch.nn.SiLU) or not (_conv_ok(unet.conv_in) and _conv_ok(unet.conv_out)):
            return False
        try:
            for blk in unet.down_blocks:
                name = type(blk).__name__
                if name not in _DOWN or (blk.downsamplers and not all(_downsample_ok(d) for d in blk.downsamplers)):
                    return False
                if not all(_Resnet.supported(r) for r in blk.resnets):
                    return False
                if not all(_Transformer.supported(a) for a in getattr(blk, "attentions", [])):
                    return False
            mid = unet.mid_block
            if type(mid).__name__ not in _MID or not all(_Resnet.supported(r) for r in mid.resnets):
                return False
            if not all(_Transformer.supported(a) for a in mid.attentions):
                return False
            for blk in unet.up_blocks:
                if type(blk).__name__ not in _UP or (blk.upsamplers and not all(_upsample_ok(u) for u in blk.upsamplers)):
                    return False
                if any(getattr(blk, k, None) for k in ("s1", "s2", "b1", "b2")):  # FreeU
                    return False
                if not all(_Resnet.supported(r) for r in blk.resnets):
                    return False
                if not all(_Transformer.supported(a) for a in getattr(blk, "attentions", [])):
                    return False
        except AttributeError:
            return False
        return True

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 added_cond_kwargs: dict | None = None, kv: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`kv`: `context_kv(context)`, precomputed, or None to project the context in each cross-attention."""
        u = self.unet
        kv = iter(list(zip(kv[0::2], kv[1::2]))) if kv else None
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)
        emb = u.time_embedding(t_emb, None)
        if u.config.addition_embed_type is not None:
            emb = emb + u.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
        temb_all = F.linear(F.silu(emb), self.temb_w.get(), self.temb_b.get())

        h = self.conv_in(sample)
        skips = [h]
        for resnets, attns, downs in self.down:
            for r, a in zip(resnets, attns):
                h = r(h, temb_all)
                if a is not None:
                    h = a(h, context, kv)
                skips.append(h)
            if downs:
                for d in downs:
                    h = d(h)
                skips.append(h)

        first, rest = self.mid
        h = first(h, temb_all)
        for a, r in rest:
            h = r(a(h, context, kv), temb_all)

        for resnets, attns, ups in self.up:
            for r, a in zip(resnets, attns):
                h = r(torch.cat([h, skips.pop()], dim=1), temb_all)
                if a is not None:
                    h = a(h, context, kv)
            if ups:
                size = skips[-1].shape[2:] if skips else None
                for up in ups:
                    if size is not None and (size[0] != 2 * h.shape[2] or size[1] != 2 * h.shape[3]):
                        h = F.interpolate(h, size=size, mode="nearest")
                    else:
                        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                    h = up(h)
        n = u.conv_norm_out
        h = F.silu(F.group_norm(h, n.num_groups, n.weight, n.bias, n.eps))
        return self.conv_out(h)


def _downsample_ok(d) -> bool:
    from diffusers.models.downsampling import Downsample2D

    return (_plain(d, Downsample2D) and d.use_conv and d.padding == 1 and d.norm is None and _conv_ok(d.conv))


def _upsample_ok(u) -> bool:
    from diffusers.models.upsampling import Upsample2D

    return (_plain(u, Upsample2D) and u.use_conv and not u.use_conv_transpose and u.norm is None
            and getattr(u, "interpolate", True) and u.name == "conv" and _conv_ok(u.conv))


# ------------------------------------------------------------------------------------------ the runtime wrapper

SMALL_UNET_PARAMS = 50_000_000  # below this a UNet is overhead-bound on a CPU: the fast path pays
MAX_TRACES = 4  # traced graphs per UNet layout (one per input shape and dtype); later shapes run untraced
# (torch.jit keeps every traced function in its global compilation unit for the life of the process, ~10 MB each
# here, so traces are never evicted and re-made: a decoder-training run that cycled through batch sizes grew to
# 13 GB that way)
# calls of one input shape that run untraced before it is traced: a one-off image (20 steps, as `sdstack generate`
# makes one per process) does not pay the ~0.13 s trace (plus first-call costs); a server, a batch or an eval does
# from its 21st step of that shape on
EAGER_CALLS = 20


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def fast_path_enabled() -> bool:
    """SDSTACK_FAST_UNET=0 turns the fast path off (the model's own forward everywhere)."""
    return _env_on("SDSTACK_FAST_UNET")


def _signature(args) -> tuple:
    return tuple((a.shape, a.dtype) for a in args)


class HalfWorkers:
    """Two threads that run the two halves of a batch through a traced UNet at once, each with half of the
    process's intra-op threads.

    Why: a small UNet's operations are too small for intra-op threads to pay: on 2 cores a shapes-v1 call at batch 2
    (cond + uncond) took 23.8 ms with 2 intra-op threads, and its two halves on two threads of one intra-op thread
    each 20.6-21.1 ms (measured together). A traced graph runs without the GIL, so the halves do run in parallel.
    Each worker sets its own thread count once (`_limit_this_thread`)."""

    def __init__(self, threads: int):
        self.each = max(1, threads // 2)
        self.inbox = [queue.Queue(), queue.Queue()]
        ready = threading.Barrier(3)
        for q in self.inbox:
            threading.Thread(target=self._loop, args=(q, ready), daemon=True, name="sdstack-unet-half").start()
        ready.wait()

    def _loop(self, inbox, ready) -> None:
        _limit_this_thread(self.each)
        torch._C._set_graph_executor_optimize(False)  # per thread, as optimized_execution(False) is for the caller
        ready.wait()
        while True:
            fn, args, outbox = inbox.get()
            try:
                with torch.no_grad():
                    outbox.put(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                outbox.put(e)

    def run(self, fn, lo: tuple, hi: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [queue.Queue(), queue.Queue()]
        for inbox, args, out in zip(self.inbox, (lo, hi), outs):
            inbox.put((fn, args, out))
        results = [out.get() for out in outs]
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results[0], results[1]


def _limit_this_thread(n: int) -> None:
    """Run this thread's ATen operations on n intra-op threads without changing other threads' count.

    torch.set_num_threads(n) would also make n ATen's default for threads that start later (a server's job thread
    would then run everything on one thread), and setting that default back from any thread made the workers and
    the caller 1.3-2x slower (measured). So where torch's own OpenMP and MKL libraries are found, only this thread's
    OpenMP and MKL counts are set, after ATen's per-thread set-up (which would overwrite them)."""
    torch.get_num_threads()  # ATen's lazy per-thread set-up, now
    try:
        import ctypes

        lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        ctypes.CDLL(os.path.join(lib, "libgomp.so.1")).omp_set_num_threads(ctypes.c_int(n))
        if torch.backends.mkl.is_available():
            ctypes.CDLL(os.path.join(lib, "libtorch_cpu.so")).MKL_Set_Num_Threads_Local(ctypes.c_int(n))
    except (OSError, AttributeError):  # another build (no bundled libgomp, or MKL not exported): the torch way
        torch.set_num_threads(n)


_HALF_WORKERS: dict[int, HalfWorkers] = {}
_HALF_LOCK = threading.Lock()


def _forget_workers_in_child() -> None:
    """A forked child has none of the parent's threads: it makes its own workers if it needs them."""
    global _HALF_LOCK
    _HALF_WORKERS.clear()
    _HALF_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_in_child)


def half_workers(threads: int) -> HalfWorkers:
    """The process's HalfWorkers for this intra-op thread count (made once per count)."""
    with _HALF_LOCK:
        w = _HALF_WORKERS.get(threads)
        if w is None:
            w = _HALF_WORKERS[threads] = HalfWorkers(threads)
        return w


class UNetRunner:
    """The UNet call of sampling: `runner(x, t, context, added_cond_kwargs)` -> the model output.

    For a small UNet on a CPU it runs `FastUNet`: untraced for the first EAGER_CALLS calls of an input shape and
    dtype, then traced (`torch.jit.trace`, about 0.13 s for shapes-v1) so that each later call runs without
    Python; the traces read the model's own tensors (and fused copies that `refresh()`, called before each sampling
    run, keeps up to date in place), so weights changed in place need no new trace. Anything else (a large model,
    a GPU, gradients on, a layout FastUNet does not reproduce, a failed trace) runs the model's own forward."""

    def __init__(self, unet, enabled: bool | None = None, split: bool | None = None):
        self.unet = unet
        self.enabled = fast_path_enabled() if enabled is None else enabled
        self.fast: FastUNet | None = None
        self.traces: dict = {}
        self.weights_key = None
        self.trace_ok = True
        self.eager_calls = EAGER_CALLS
        self.calls: dict = {}  # input signature -> calls so far (kept across refresh: it measures use)
        # traced calls of an even batch run as two halves on two threads (HalfWorkers); SDSTACK_UNET_SPLIT=0: off
        self.split = _env_on("SDSTACK_UNET_SPLIT") if split is None else split
        self._kv_cache = None  # (context, its version, the weights' versions, FastUNet.context_kv(context))
        self.refresh()

    def refresh(self) -> None:
        """Check the UNet again before a sampling run (engine.guidance calls this; about 2 ms for shapes-v1):
        its layout (adapters injected since, hooks registered) decides between FastUNet and the model's own
        forward. Weights changed in place (a LoRA merge, an optimizer step) need nothing more: traced graphs read
        the model's tensors, and the fused copies are rewritten in place here. A tensor replaced, added or cast
        (new storage, dtype or identity) rebuilds FastUNet and drops the traces."""
        self._kv_cache = None
        modules = list(self.unet.modules())  # one walk for the tensors and the layout check (a third of the time)
        seen, params = set(), []
        for m in modules:
            for p in (*m._parameters.values(), *m._buffers.values()):
                if p is not None and id(p) not in seen:  # a tensor shared by two modules counts once
                    seen.add(id(p))
                    params.append(p)
        small = sum(p.numel() for p in params) < SMALL_UNET_PARAMS
        if not (self.enabled and small and FastUNet.supports(self.unet, modules)):
            self.fast, self.weights_key = None, None
            self.traces.clear()
            return
        key = tuple((id(p), p.data_ptr(), p.dtype, p.shape) for p in params)
        if self.fast is None or key != self.weights_key:
            self.fast, self.weights_key = FastUNet(self.unet), key
            self.traces.clear()
        self.fast.sync_fused()

    def context_kv(self, context: torch.Tensor) -> list[torch.Tensor]:
        """The cross-attentions' keys and values of `context`, computed once per context tensor: the sampler hands
        the same tensor at every step of a run (engine.guidance), so a 20-step image projects its prompts once
        instead of 20 times. Kept while that very tensor, unchanged, comes back with the same weights."""
        weights = tuple(p._version for a in self.fast.cross for p in a.kv.parts)
        cached = self._kv_cache
        if cached is not None and cached[0] is context and cached[1] == context._version and cached[2] == weights:
            return cached[3]
        kv = self.fast.context_kv(context)
        self._kv_cache = (context, context._version, weights, kv)
        return kv

    def usable(self, x: torch.Tensor) -> bool:
        return (self.fast is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not self.unet.training)

    def __call__(self, x, t, context, added_cond_kwargs=None) -> torch.Tensor:
        if not self.usable(x):
            return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs).sample
        t = t.expand(x.shape[0]) if t.ndim else t.reshape(1).expand(x.shape[0])
        kv = self.context_kv(context)
        if not self.trace_ok:
            return self.fast(x, t, context, added_cond_kwargs, kv)
        extra = () if added_cond_kwargs is None else (added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        args = (x, t, context, *extra, *kv)
        sig = _signature(args)
        if sig not in self.traces:
            seen = self.calls[sig] = self.calls.get(sig, 0) + 1
            if seen <= self.eager_calls:
                return self.fast(x, t, context, added_cond_kwargs, kv)
        threads = torch.get_num_threads()
        if self.split and x.shape[0] % 2 == 0 and threads >= 2:
            half = x.shape[0] // 2
            lo, hi = tuple(a[:half] for a in args), tuple(a[half:] for a in args)
            fn = self._traced(_signature(lo), lo, len(extra))
            if fn is not None:
                return torch.cat(half_workers(threads).run(fn, lo, hi))
        fn = self._traced(sig, args, len(extra))
        if fn is None:
            return self.fast(x, t, context, added_cond_kwargs, kv)
        # the graph executor's optimising passes (profiling runs, fusion) cost ~0.3 s in the first two calls and
        # gain nothing measurable here (21.9 against 22.0 ms a shapes-v1 step)
        with torch.jit.optimized_execution(False):
            return fn(*args)

    def _traced(self, sig, args, n_extra: int):
        """The trace for this input signature, made now if missing (None if tracing failed). `args`: x, t,
        context, then `n_extra` added-condition tensors (SDXL), then the context's keys and values."""
        fn = self.traces.get(sig)
        if fn is None and self.trace_ok and len(self.traces) < MAX_TRACES:
            fn = self._trace(args, n_extra)
            if fn is None:
                return None
            self.traces[sig] = fn
        return fn

    def _trace(self, args, n_extra: int):
        import warnings

        fast = self.fast

        def run(x, t, context, *rest):
            extra, kv = rest[:n_extra], list(rest[n_extra:])
            added = None if not extra else {"text_embeds": extra[0], "time_ids": extra[1]}
            return fast(x, t, context, added, kv)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent branches; DeprecationWarning
                with torch.jit.optimized_execution(False):
                    traced = torch.jit.trace(run, args, check_trace=False)
                    traced(*args)  # its first run (plan set-up) here, before any worker threads share it
                    return traced
        except Exception as e:  # noqa: BLE001 - any tracing failure falls back to the untraced fast forward
            import logging

            logging.getLogger(__name__).warning("UNet tracing failed (%s); running it untraced", e)
            self.trace_ok = False
            return None


def unet_runner(bundle) -> UNetRunner:
    """The bundle's UNetRunner, made once and rebuilt when the bundle's UNet object changes."""
    runner = getattr(bundle, "_unet_runner", None)
    if runner is None or runner.unet is not bundle.unet:
        runner = UNetRunner(bundle.unet)
        try:
            bundle._unet_runner = runner
        except AttributeError:  # a bundle type that refuses new attributes: no caching
            pass
    return runner
