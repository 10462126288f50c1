"""Golden end-to-end check: sdstack's txt2img equals stock diffusers' StableDiffusionPipeline on the same tiny
weights, prompt, seed and scheduler (diffusers is the independent reference)."""

import numpy as np
import pytest
import torch

from sdstack.engine.generate import generate
from sdstack.models.tiny import save_diffusers_folder, tiny_bundle
from sdstack.params import make_params


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(tiny_bundle("sd1"), tmp_path_factory.mktemp("m") / "tiny")


def diffusers_image(folder, scheduler_cls, steps, seed, **sched_kw):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **sched_kw)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red star on a blue background", num_inference_steps=steps, guidance_scale=7.0, height=64,
               width=64, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def ours(folder, sampler, steps, seed):
    from sdstack.models.loader import load_model

    bundle = load_model(folder)
    r = generate(bundle, make_params(prompt="a red star on a blue background", sampler_name=sampler, steps=steps,
                                     seed=seed, cfg_scale=7.0))
    return np.asarray(r.images[0], dtype=np.float64) / 255.0


@pytest.mark.parametrize("sampler,sched,kw", [
    ("Euler", "EulerDiscreteScheduler", {}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++",
                                                         "solver_order": 2, "final_sigmas_type": "zero"}),
])
def test_txt2img_matches_diffusers_pipeline(folder, sampler, sched, kw):
    import diffusers

    theirs = diffusers_image(folder, getattr(diffusers, sched), 8, 1234, **kw)
    mine = ours(folder, sampler, 8, 1234)
    # Same noise (CPU generator, same draw order), same math; the only differences are diffusers'
    # sigma interpolation (linear vs our log-linear at fractional timesteps) and float32 rounding, so a
    # tolerance of 2/255 per pixel covers them while any real mistake (CFG order, scaling, noise) is far larger.
    assert np.abs(theirs - mine).max() <= 2 / 255 + 1e-9
