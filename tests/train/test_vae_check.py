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


def test_concept_round_trip_is_the_ceiling_of_fine_tuning():
    from sdstack.train.vae_check import concept_round_trip

    source, exact = concept_round_trip(FakeVAE(1), "outline", n=22)
    assert source >= 0.95 and exact == source  # the oracle reads the renders, and an exact codec keeps them
    _, blocky = concept_round_trip(FakeVAE(8), "outline", n=22)
    assert blocky <= source - 0.3  # 8x8 blocks smear a 2 px band away in most images
    source_ring, exact_ring = concept_round_trip(FakeVAE(1), "ring", n=22)
    assert exact_ring == source_ring >= 0.95


def test_check_vae_cli_reports_concepts_and_refuses_unknown_ones(tiny_vae_dir, capsys):
    from .conftest import cli

    assert cli("train", "check-vae", tiny_vae_dir, "--resolution", "32", "--per-suite", "1", "--concept", "outline",
               "--min-score", "0") == 0
    out = capsys.readouterr().out
    assert "concept outline" in out and "of 88 images" in out
    assert cli("train", "check-vae", tiny_vae_dir, "--concept", "moon") == 2
    err = capsys.readouterr().err.strip()
    assert "moon" in err and len(err.splitlines()) == 1
