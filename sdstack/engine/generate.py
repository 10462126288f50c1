"""txt2img, img2img and hires fix: params -> conditioning -> sampling -> VAE decode -> images + infotext."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from ..errors import UserError
from ..params import LATENT_UPSCALE_MODES, validate
from ..prompts.conditioning import TextConditioner
from ..prompts.parser import get_prompt_schedules, split_and
from ..sampling.denoisers import DiscreteSchedule
from ..sampling.registry import get_sigmas, resolve_sampler
from ..sampling.rng import ImageRNG
from . import images as im
from .guidance import CFGDenoiser
from .infotext import build_image_infotext
from .networks import prepare_extra_networks


class Interrupted(Exception):
    """Raised inside the sampler callback to stop sampling early (interrupt or skip)."""


@dataclass
class Control:
    """Interrupt/skip flags set from another thread; `skip` ends only the current batch."""

    interrupt: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)


@dataclass
class Progress:
    step: int          # steps done in this job so far
    total: int         # total steps of the job
    iteration: int     # batch index (0-based)
    latents: torch.Tensor
    bundle: object

    def preview(self) -> Image.Image:
        return im.latent_preview(self.bundle, self.latents)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    params: object
    interrupted: bool = False


def _resolve_seeds(p) -> tuple[list[int], list[int]]:
    n = p.batch_size * p.n_iter
    seed = p.seed if p.seed != -1 else random.randrange(4294967294)
    sub = p.subseed if p.subseed != -1 else random.randrange(4294967294)
    seeds = [seed + i for i in range(n)] if p.subseed_strength == 0 else [seed] * n
    return seeds, [sub + i for i in range(n)]


@dataclass
class _Job:
    bundle: object
    p: object
    cond: TextConditioner
    control: Control
    on_step: Callable[[Progress], None] | None
    total_steps: int
    done: int = 0
    iteration: int = 0

    def schedules(self, prompt: str, steps: int):
        return [(end, self.cond(text)) for end, text in get_prompt_schedules([prompt], steps)[0]]

    def composed(self, prompt: str, steps: int):
        """The prompt's AND sub-prompts as (weight, schedule) pairs (one pair, weight 1, without AND)."""
        return [(weight, self.schedules(sub, steps)) for sub, weight in split_and(prompt)]

    def sample(self, x, sigmas, rng, pos, neg, time_ids):
        sampler, _ = resolve_sampler(self.p.sampler_name, self.p.scheduler)
        den = CFGDenoiser(self.bundle, pos, neg, self.p.cfg_scale, time_ids, rescale=self.p.rescale_cfg)
        last = {"denoised": x}

        def callback(info):
            last["denoised"] = info["denoised"]
            den.step = info["i"] + 1
            self.done += 1
            if self.on_step:
                self.on_step(Progress(self.done, self.total_steps, self.iteration, info["denoised"], self.bundle))
            if self.control.interrupt.is_set() or self.control.skip.is_set():
                raise Interrupted

        try:
            with torch.no_grad():
                return sampler.fn(den, x, sigmas, extra=None, callback=callback, noise=rng.noise_sampler()), False
        except Interrupted:
            return last["denoised"], True


def _sigmas(bundle, p, steps: int) -> torch.Tensor:
    sampler, scheduler = resolve_sampler(p.sampler_name, p.scheduler)
    return get_sigmas(sampler, scheduler, steps, DiscreteSchedule(bundle.alphas_cumprod)).float()


def _img2img_sigmas(bundle, p, steps: int, strength: float, fixed_steps: bool) -> torch.Tensor:
    """A1111's setup_img2img_steps: the tail of a longer schedule, starting at the strength's noise level."""
    if fixed_steps:
        total, t_enc = int(steps / min(strength, 0.999)), steps - 1
    else:
        total, t_enc = steps, int(min(strength, 0.999) * steps)
    return _sigmas(bundle, p, total)[total - t_enc - 1:]


def _time_ids(bundle, h: int, w: int) -> torch.Tensor | None:
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32) if bundle.family == "sdxl" else None


def _size(bundle, p) -> tuple[int, int]:
    w, h = p.width or bundle.default_size, p.height or bundle.default_size
    f = bundle.vae_scale_factor
    if w % f or h % f:
        raise UserError(f"width and height must be multiples of {f} for this model, got {w}x{h}", field="width")
    return w, h


def _init_latents(bundle, init_images, p, w, h, batch: int) -> torch.Tensor:
    imgs = [im.resize_image(im.open_image(x), p.resize_mode, w, h) for x in init_images]
    imgs = [imgs[i % len(imgs)] for i in range(batch)]
    return im.encode(bundle, torch.cat([im.pil_to_tensor(x) for x in imgs]))


def _hires(job: _Job, latents, seeds, subseeds, w, h, pos_prompt, neg_prompt):
    p, bundle = job.p, job.bundle
    f = bundle.vae_scale_factor
    tw, th = int(w * p.hr_scale) // f * f, int(h * p.hr_scale) // f * f
    mode, antialias = LATENT_UPSCALE_MODES[p.hr_upscaler]
    up = torch.nn.functional.interpolate(latents, size=(th // f, tw // f), mode=mode, antialias=antialias)
    steps = p.hr_second_pass_steps or p.steps
    sigmas = _img2img_sigmas(bundle, p, steps, p.denoising_strength, fixed_steps=True)
    rng = _rng(bundle, p, seeds, subseeds, tw, th)
    x = up + rng.first() * sigmas[0]
    pos = [job.composed(pos_prompt, steps)] * len(seeds)
    neg = [job.schedules(neg_prompt, steps)] * len(seeds)
    return job.sample(x, sigmas, rng, pos, neg, _time_ids(bundle, th, tw)), (tw, th)


def _rng(bundle, p, seeds, subseeds, w, h) -> ImageRNG:
    f = bundle.vae_scale_factor
    return ImageRNG((bundle.latent_channels, h // f, w // f), seeds, subseeds=subseeds,
                    subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                    seed_resize_from_w=p.seed_resize_from_w, device=bundle.device)


def _total_steps(p, img2img: bool) -> int:
    first = int(min(p.denoising_strength, 0.999) * p.steps) + 1 if img2img else p.steps
    second = (p.hr_second_pass_steps or p.steps) if (p.enable_hr and not img2img) else 0
    return (first + second) * p.n_iter


def generate(bundle, params, *, init_images: list | None = None, lora_dir=None, embeddings=None,
             control: Control | None = None, on_step: Callable[[Progress], None] | None = None,
             hash_cache=None) -> GenerationResult:
    """Run a txt2img (or img2img when `init_images` is given) job; returns images with their infotext."""
    p = validate(params)
    control = control or Control()
    w, h = _size(bundle, p)
    seeds, subseeds = _resolve_seeds(p)
    prompt, negative, networks = prepare_extra_networks(p.prompt, p.negative_prompt, lora_dir, hash_cache)
    cond = TextConditioner(bundle, clip_skip=p.clip_skip, embeddings=networks.embeddings(embeddings, bundle))
    img2img = bool(init_images)
    job = _Job(bundle, p, cond, control, on_step, _total_steps(p, img2img))
    out_images, interrupted = [], False
    with networks.applied(bundle):
        for it in range(p.n_iter):
            if control.interrupt.is_set():
                interrupted = True
                break
            control.skip.clear()
            job.iteration = it
            sl = slice(it * p.batch_size, (it + 1) * p.batch_size)
            lat, stopped = _one_batch(job, seeds[sl], subseeds[sl], w, h, prompt, negative, init_images)
            interrupted |= stopped and control.interrupt.is_set()
            out_images += im.tensor_to_pil(im.decode(bundle, lat))
    n = len(out_images)
    infos = [build_image_infotext(bundle, p, seeds[i], subseeds[i], w, h, img2img, networks, cond)
             for i in range(n)]
    return GenerationResult(out_images, seeds[:n], subseeds[:n], infos, p, interrupted)


def _one_batch(job: _Job, seeds, subseeds, w, h, prompt, negative, init_images):
    p, bundle = job.p, job.bundle
    b = len(seeds)
    pos = [job.composed(prompt, p.steps)] * b
    neg = [job.schedules(negative, p.steps)] * b
    rng = _rng(bundle, p, seeds, subseeds, w, h)
    if init_images:
        sigmas = _img2img_sigmas(bundle, p, p.steps, p.denoising_strength, fixed_steps=False)
        x = _init_latents(bundle, init_images, p, w, h, b) + rng.first() * sigmas[0]
    else:
        sigmas = _sigmas(bundle, p, p.steps)
        x = rng.first() * sigmas[0]
    lat, stopped = job.sample(x, sigmas, rng, pos, neg, _time_ids(bundle, h, w))
    if p.enable_hr and not init_images and not stopped:
        (lat, stopped), _ = _hires(job, lat, seeds, subseeds, w, h, prompt, negative)
    return lat, stopped
