"""Full-size SD 1.5 architecture (random weights): one 512x512 step end to end. Slow: `pytest -m slow`."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_sd15_architecture_one_step_512():
    from sdstack.engine.generate import generate
    from sdstack.models.tiny import full_size_random_bundle
    from sdstack.params import make_params

    b = full_size_random_bundle("sd1")
    assert sum(p.numel() for p in b.unet.parameters()) == 859_520_964  # SD 1.5 UNet parameter count
    assert b.vae_scale_factor == 8 and b.default_size == 512
    r = generate(b, make_params(prompt="a photo of a cat", steps=1, seed=1, sampler_name="Euler"))
    img = np.asarray(r.images[0])
    assert img.shape == (512, 512, 3) and img.std() > 0


def test_sd15_single_file_round_trip(tmp_path):
    import torch

    from sdstack.models.loader import load_model
    from sdstack.models.single_file import write_single_file
    from sdstack.models.tiny import full_size_random_bundle

    b = full_size_random_bundle("sd1")
    path = write_single_file(b, tmp_path / "sd15.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        unet_keys = [k for k in f.keys() if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == 686  # v1-5-pruned-emaonly's UNet tensor count (derived in tests/models)
    back = load_model(path)
    for x, y in ((b.unet, back.unet), (b.vae, back.vae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
