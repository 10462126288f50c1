"""All random draws of sdstack: the only module that calls `torch.randn`.

`ImageRNG` follows AUTOMATIC1111's `modules/rng.py` (v1.10) with its "RNG source: CPU" setting: one CPU
`torch.Generator` per image, seeded with that image's seed, so an image is the same whether it is drawn
alone or in a batch; variation seeds mix in a second draw with A1111's `slerp`; "resize seed from W x H"
draws the noise at the old latent size and pastes it, centred, into full-size noise from the same seed.
Noise is always drawn on the CPU, then moved to the target device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LATENT_FACTOR = 8  # pixels per latent cell, as A1111 hard-codes it for the seed-resize shape

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`."""
    return torch.Generator("cpu").manual_seed(int(seed))


def randn(shape: Sequence[int], gen: torch.Generator, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` drawn from `gen` (on the generator's device), moved to `device`."""
    out = torch.randn(tuple(shape), generator=gen, device=gen.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise shaped like `x` (same device and dtype), drawn from `gen`."""
    return randn(x.shape, gen, device=x.device, dtype=x.dtype)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation exactly as A1111's `rng.slerp` (variation seeds).

    Vectors are taken along dim 1 (for a (C, H, W) latent: over H, per channel and column). When the mean
    cosine exceeds 0.9995 it falls back to `low * val + high * (1 - val)`, the reverse of the main formula's
    weighting; A1111 does that and we keep it so variation seeds reproduce.
    """
    low_dir = low / low.norm(dim=1, keepdim=True)
    high_dir = high / high.norm(dim=1, keepdim=True)
    cos = (low_dir * high_dir).sum(1)
    if cos.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    w_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return w_low * low + w_high * high


def _paste_centred(small: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Paste `small` (C, h, w) into the centre of `full` (C, H, W), cropping it where it is larger."""
    out = full.clone()
    dx = (full.shape[2] - small.shape[2]) // 2
    dy = (full.shape[1] - small.shape[1]) // 2
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


class ImageRNG:
    """Per-image noise for one batch: `first()` is the initial noise, `next()` later noise (ancestral/SDE)."""

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = -1,
        seed_resize_from_w: int = -1,
        device: str | torch.device = "cpu",
        eta_noise_seed_delta: int = 0,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.generators = [generator(s) for s in self.seeds]
        self._first_done = False

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The shape the seed's noise is drawn at: the latent shape, or the "resize seed from" one."""
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // LATENT_FACTOR, self.seed_resize_from_w // LATENT_FACTOR)

    def _subnoise(self, i: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        if self.subseeds is None or self.subseed_strength == 0:
            return None
        subseed = self.subseeds[i] if i < len(self.subseeds) else 0
        return randn(shape, generator(subseed))

    def _first_one(self, i: int) -> torch.Tensor:
        shape = self.noise_shape
        subnoise = self._subnoise(i, shape)
        full = randn(self.shape, self.generators[i])  # always the image generator's first draw
        noise = full if shape == self.shape else randn(shape, generator(self.seeds[i]))
        if subnoise is not None:
            noise = slerp(self.subseed_strength, noise, subnoise)
        if shape != self.shape:
            noise = _paste_centred(noise, full)
        return noise

    def first(self) -> torch.Tensor:
        """Initial noise [B, *shape], float32 on `device`. Later `next()` calls continue each generator."""
        xs = [self._first_one(i) for i in range(len(self.seeds))]
        if self.eta_noise_seed_delta:
            self.generators = [generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        self._first_done = True
        return torch.stack(xs).to(self.device)

    def next(self) -> torch.Tensor:
        """The next noise [B, *shape], each image's from its own generator (the first call is `first()`)."""
        if not self._first_done:
            return self.first()
        return torch.stack([randn(self.shape, g) for g in self.generators]).to(self.device)

    def noise_sampler(self) -> NoiseFn:
        """Adapter for samplers: `noise(x)` -> the next noise, shaped like `x` (device and dtype of x)."""

        def noise(x: torch.Tensor) -> torch.Tensor:
            expected = (len(self.seeds), *self.shape)
            if tuple(x.shape) != expected:
                raise ValueError(f"noise requested for shape {tuple(x.shape)}; this ImageRNG draws {expected}")
            return self.next().to(device=x.device, dtype=x.dtype)

        return noise


def generator_noise(gen: torch.Generator) -> NoiseFn:
    """A sampler noise callable drawing the whole batch from one generator (tests, training)."""
    return lambda x: randn_like(x, gen)
