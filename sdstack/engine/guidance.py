"""The model side of sampling: UNet call, classifier-free guidance, per-step prompt schedules.

`build_denoiser(bundle, ...)` returns `denoiser(x, sigma) -> denoised` for the samplers. Conditioning changes
with the step index (prompt editing / alternation); the engine sets `.step` from the sampler callback.
As A1111 does by default, cond and uncond run in one batch when their token lengths match, separately
otherwise.
"""

from __future__ import annotations

import torch

from ..prompts.conditioning import Cond
from ..sampling.denoisers import make_denoiser
from ..sampling.registry import effective_rescale_cfg
from .fastunet import unet_runner


def unet_model_fn(bundle):
    """model_fn(x_in, t, context=..., pooled=..., time_ids=...) -> raw UNet output (eps or v).

    The call goes through the bundle's `UNetRunner` (engine.fastunet): small UNets on a CPU run a traced lean
    forward, the same arithmetic as the model's own; everything else runs the model's forward."""
    runner = unet_runner(bundle)
    runner.refresh()
    dtype = next(bundle.unet.parameters()).dtype

    def model_fn(x, t, *, context, pooled=None, time_ids=None):
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        out = runner(x.to(dtype), t.to(dtype), context.to(dtype), added)
        return out.to(x.dtype)

    return model_fn


def batch_cond_uncond_default(x: torch.Tensor) -> bool:
    """Batch cond+uncond except on CPU with large latents (>= 48x48), where two passes win."""
    return x.device.type != "cpu" or x.shape[-1] * x.shape[-2] < 48 * 48


def pick(schedule: list[tuple[int, Cond]], step: int) -> Cond:
    """A1111's rule: the first entry whose end step >= the current step."""
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[-1][1]


Schedule = list[tuple[int, Cond]]


def _to_v(denoised: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The v-prediction (Salimans & Ho 2022) that gives `denoised` at x = x0 + s * eps (k-diffusion sigmas)."""
    return ((x - denoised) / s - s * denoised) * (s * s + 1).rsqrt()


def rescale_guidance(guided: torch.Tensor, reference: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                     phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, section 3.4) on denoised predictions: in v-space, the guided prediction
    rescaled to the per-image standard deviation of the `reference` (conditional) one, blended by `phi`, back to a
    denoised prediction."""
    s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
    x32 = x.float()
    v_cfg, v_ref = _to_v(guided.float(), x32, s), _to_v(reference.float(), x32, s)
    dims = tuple(range(1, x.ndim))
    v_rescaled = v_cfg * (v_ref.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    v = phi * v_rescaled + (1 - phi) * v_cfg
    return (x32 / (s * s + 1) - s * v * (s * s + 1).rsqrt()).to(guided.dtype)


class CFGDenoiser:
    """denoised = uncond + scale * sum_k w_k (cond_k - uncond), with per-image, per-step conditioning.

    `pos[i]` is image i's list of (weight, schedule) sub-prompts (A1111's composable `AND`; usually one with
    weight 1, the plain CFG case); `neg[i]` is its negative prompt's schedule.
    """

    def __init__(self, bundle, pos: list[list[tuple[float, Schedule]]], neg: list[Schedule],
                 cfg_scale: float, time_ids: torch.Tensor | None = None, rescale: float = 0.0):
        self.inner = make_denoiser(unet_model_fn(bundle), bundle.alphas_cumprod, bundle.prediction_type)
        self.pos, self.neg, self.scale, self.time_ids = pos, neg, float(cfg_scale), time_ids
        # CFG rescale phi (rescale_guidance): the rescale_cfg parameter, -1 resolved for this model; 0 = plain CFG
        self.rescale = effective_rescale_cfg(rescale, self.inner.schedule)
        self.step = 0
        # One batch of 2B (cond + uncond) is best on GPUs; on a few CPU cores two passes of B can be faster at
        # large latents (measured: SD 1.5 at 512px, 2 cores). The result is the same either way.
        self.batch_cond_uncond: bool | None = None  # None = decide per call (batch_cond_uncond_default)
        self._stacked: dict[tuple[int, ...], tuple[list[Cond], torch.Tensor]] = {}

    def _context(self, conds: list[Cond]) -> torch.Tensor:
        """The batch's stacked contexts, the same tensor at every step for the same conds (the UNet runner then
        projects each prompt's keys and values once per run: engine.fastunet.UNetRunner.context_kv)."""
        key = tuple(id(c) for c in conds)
        hit = self._stacked.get(key)
        if hit is None:
            if len(self._stacked) >= 16:  # prompt editing / alternation make a few; never many
                self._stacked.clear()
            hit = self._stacked[key] = (list(conds), torch.stack([c.context for c in conds]))  # conds kept: ids stay theirs
        return hit[1]

    def _run(self, x, sigma, conds: list[Cond]) -> torch.Tensor:
        kw = {"context": self._context(conds)}
        if conds[0].pooled is not None:
            kw["pooled"] = torch.stack([c.pooled for c in conds])
            kw["time_ids"] = self.time_ids.to(x.device).expand(len(conds), -1)
        return self.inner(x, sigma, **kw)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma * x.new_ones([b]) if sigma.ndim == 0 else sigma
        subs = [[(w, pick(s, self.step)) for w, s in parts] for parts in self.pos]
        if any(len(parts) != 1 or parts[0][0] != 1.0 for parts in subs):
            return self._composable(x, sigma, subs)
        pos = [parts[0][1] for parts in subs]
        if self.scale == 1.0:
            return self._run(x, sigma, pos)
        neg = [pick(s, self.step) for s in self.neg]
        lengths = {c.context.shape[0] for c in pos + neg}
        batch = self.batch_cond_uncond if self.batch_cond_uncond is not None else batch_cond_uncond_default(x)
        if len(lengths) == 1 and not batch:
            cond, uncond = self._run(x, sigma, pos), self._run(x, sigma, neg)
        elif len(lengths) == 1:
            out = self._run(torch.cat([x, x]), torch.cat([sigma, sigma]), pos + neg)
            cond, uncond = out[:b], out[b:]
        else:
            cond = torch.cat([self._run(x[i : i + 1], sigma[i : i + 1], [pos[i]]) for i in range(b)])
            uncond = torch.cat([self._run(x[i : i + 1], sigma[i : i + 1], [neg[i]]) for i in range(b)])
        guided = uncond + (cond - uncond) * self.scale
        return rescale_guidance(guided, cond, x, sigma, self.rescale) if self.rescale else guided

    def _composable(self, x, sigma, subs) -> torch.Tensor:
        """A1111's composable diffusion: each AND sub-prompt pulls away from uncond by its weight."""
        b = x.shape[0]
        neg = [pick(s, self.step) for s in self.neg]
        uncond = torch.cat([self._run(x[i : i + 1], sigma[i : i + 1], [neg[i]]) for i in range(b)])
        out = uncond.clone()
        unguided = uncond.clone() if self.rescale else None  # the rescale's reference: the sub-prompts at scale 1
        for i in range(b):
            for weight, cond in subs[i]:
                delta = self._run(x[i : i + 1], sigma[i : i + 1], [cond]) - uncond[i : i + 1]
                out[i : i + 1] += delta * (weight * self.scale)
                if unguided is not None:
                    unguided[i : i + 1] += delta * weight
        return rescale_guidance(out, unguided, x, sigma, self.rescale) if self.rescale else out
