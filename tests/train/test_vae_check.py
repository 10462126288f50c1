"""The autoencoder check: an exact round trip scores 100%, a destructive one does not."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sdstack.train.vae_check import oracle_round_trip


class FakeVAE(torch.nn.Module):
    """encode(x).latent_dist.mean = x (optionally pooled), decode(z).sample = z (upsampled back)."""

    def __init__(self, pool: int = 1):
        super().__init__()
        self.pool = pool
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=F.avg_pool2d(x, self.pool)))

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(z, scale_factor=self.pool, mode="nearest"))


def test_exact_round_trip_scores_everything():
    scores = oracle_round_trip(FakeVAE(1), per_suite=3)
    assert set(scores) == {"single", "heldout", "two-objects", "counting", "position"}
    assert all(v == 1.0 for v in scores.values())


def test_blocky_round_trip_loses_shapes():
    scores = oracle_round_trip(FakeVAE(8), per_suite=3)
    assert min(scores.values()) < 1.0
