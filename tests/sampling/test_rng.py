"""ImageRNG and slerp: A1111's seed semantics (CPU source), checked against direct generator draws."""

from __future__ import annotations

import math

import pytest
import torch

from sdstack.sampling.rng import ImageRNG, generator_noise, slerp

SHAPE = (4, 6, 5)


def reference_draws(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    """Independent reference: a fresh CPU torch.Generator seeded with `seed`, drawn `count` times."""
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def test_batch_equals_images_drawn_separately():
    batch = ImageRNG(SHAPE, [1234, 1235])
    first, second = batch.first(), batch.next()
    for i, seed in enumerate([1234, 1235]):
        alone = ImageRNG(SHAPE, [seed])
        assert torch.equal(first[i], alone.first()[0])
        assert torch.equal(second[i], alone.next()[0])


def test_first_and_next_are_the_seeds_generator_draws():
    """first() is each seed's first draw, next() continues the same generator."""
    rng = ImageRNG(SHAPE, [7, 99])
    draws = [reference_draws(7, 3), reference_draws(99, 3)]
    for k, out in enumerate([rng.first(), rng.next(), rng.next()]):
        assert out.shape == (2, *SHAPE) and out.dtype == torch.float32
        assert torch.equal(out[0], draws[0][k]) and torch.equal(out[1], draws[1][k])


def test_next_before_first_returns_first():
    assert torch.equal(ImageRNG(SHAPE, [3]).next(), ImageRNG(SHAPE, [3]).first())


def test_identical_seeds_give_bit_identical_noise():
    out = ImageRNG(SHAPE, [42, 42]).first()
    assert torch.equal(out[0], out[1])
    assert torch.equal(ImageRNG(SHAPE, [42]).first(), ImageRNG(SHAPE, [42]).first())
    assert not torch.equal(ImageRNG(SHAPE, [42]).first(), ImageRNG(SHAPE, [43]).first())


def test_eta_noise_seed_delta_reseeds_after_first():
    """A1111 ENSD: after the initial noise the generators restart from seed + delta."""
    rng = ImageRNG(SHAPE, [10], eta_noise_seed_delta=31337)
    assert torch.equal(rng.first()[0], reference_draws(10, 1)[0])
    assert torch.equal(rng.next()[0], reference_draws(10 + 31337, 1)[0])


def test_slerp_endpoints():
    low, high = reference_draws(1, 2)
    torch.testing.assert_close(slerp(0.0, low, high), low, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(1.0, low, high), high, atol=1e-5, rtol=0)


def test_slerp_hand_computed_on_2_vectors():
    """Rows [1,0] and [0,1] are 90 degrees apart: slerp(v) = sin((1-v) pi/2) low + sin(v pi/2) high.
    Norms are taken along dim 1, so un-normalised rows keep their lengths as weights."""
    low = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    high = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    c = math.cos(math.pi / 6)  # v = 1/3: sin(pi/3) and sin(pi/6)
    want = torch.tensor([[c, 0.5], [2 * c, 1.5]])
    torch.testing.assert_close(slerp(1 / 3, low, high), want, atol=1e-6, rtol=0)


def test_slerp_parallel_fallback_is_reversed_like_a1111():
    """Mean cosine > 0.9995: A1111 returns low * val + high * (1 - val), weights swapped on purpose."""
    low = torch.tensor([[1.0, 0.0]])
    high = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(slerp(0.25, low, high), torch.tensor([[0.25 + 1.5, 0.0]]))


def test_variation_seed_is_slerp_of_seed_and_subseed_noise():
    rng = ImageRNG(SHAPE, [5, 6], subseeds=[50], subseed_strength=0.3)
    out = rng.first()
    want0 = slerp(0.3, reference_draws(5, 1)[0], reference_draws(50, 1)[0])
    want1 = slerp(0.3, reference_draws(6, 1)[0], reference_draws(0, 1)[0])  # missing subseed -> 0, as A1111
    torch.testing.assert_close(out[0], want0, atol=0, rtol=0)
    torch.testing.assert_close(out[1], want1, atol=0, rtol=0)
    assert torch.equal(rng.next()[0], reference_draws(5, 2)[1])  # later noise ignores the variation seed


def test_zero_strength_ignores_subseed():
    assert torch.equal(ImageRNG(SHAPE, [5], subseeds=[50]).first(), ImageRNG(SHAPE, [5]).first())


def test_seed_resize_pastes_small_noise_centred():
    """Resize from 16x24 px (latent 2x3) into a 6x5 latent: the seed's noise at 2x3 is pasted at rows 2:4,
    cols 1:4 of the full-size first draw of the same seed."""
    rng = ImageRNG(SHAPE, [9], seed_resize_from_h=16, seed_resize_from_w=24)
    out = rng.first()[0]
    small = reference_draws(9, 1, (4, 2, 3))[0]
    full = reference_draws(9, 2)
    want = full[0].clone()
    want[:, 2:4, 1:4] = small
    assert torch.equal(out, want)
    assert torch.equal(rng.next()[0], full[1])


def test_seed_resize_crops_larger_noise():
    """From 80x64 px (latent 10x8) into 6x5. A1111's offsets use floor division: dy = (6-10)//2 = -2,
    dx = (5-8)//2 = -2, so rows 2:8 and only columns 2:6 (4 of them) are pasted at [0:6, 0:4]; the last
    column keeps the full-size draw. We keep that arithmetic so resized seeds reproduce."""
    out = ImageRNG(SHAPE, [9], seed_resize_from_h=80, seed_resize_from_w=64).first()[0]
    big = reference_draws(9, 1, (4, 10, 8))[0]
    want = reference_draws(9, 1)[0].clone()
    want[:, 0:6, 0:4] = big[:, 2:8, 2:6]
    assert torch.equal(out, want)


def test_noise_sampler_adapter():
    rng = ImageRNG(SHAPE, [1, 2])
    noise = rng.noise_sampler()
    x = torch.zeros((2, *SHAPE), dtype=torch.float64)
    first = noise(x)
    assert first.dtype == torch.float64 and first.shape == x.shape
    torch.testing.assert_close(first[1].float(), reference_draws(2, 1)[0])
    with pytest.raises(ValueError, match="shape"):
        noise(torch.zeros((3, *SHAPE)))


def test_generator_noise_is_reproducible():
    x = torch.zeros(2, 3)
    a = generator_noise(torch.Generator().manual_seed(4))(x)
    b = generator_noise(torch.Generator().manual_seed(4))(x)
    assert torch.equal(a, b) and a.shape == x.shape
