"""The sampler registry: A1111 names and name resolution, "Automatic" sigmas, and every registered sampler
run the same way on a problem whose exact answer is known."""

from __future__ import annotations

import diffusers
import pytest
import torch

from sdstack.errors import UserError
from sdstack.sampling import schedules
from sdstack.sampling.denoisers import DiscreteSchedule, make_denoiser
from sdstack.sampling.registry import SAMPLERS, get_sigmas, resolve_sampler, schedule_label
from sdstack.sampling.rng import generator, generator_noise, randn
from sdstack.sampling.schedules import SCHEDULERS

A1111_NAMES = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS", "Heun", "DPM2",
               "DPM2 a", "DDIM", "UniPC", "LCM"]


@pytest.fixture(scope="module")
def sd_schedule() -> DiscreteSchedule:
    return DiscreteSchedule(diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear").alphas_cumprod)


def test_keys_are_a1111_ui_names_in_a1111_order():
    assert list(SAMPLERS) == A1111_NAMES


def test_a1111_options():
    """Default schedules, discard flags and aliases as A1111 v1.10 declares them."""
    defaults = {n: s.default_scheduler for n, s in SAMPLERS.items()}
    assert defaults["DPM++ 2M"] == "karras" and defaults["DPM++ SDE"] == "karras"
    assert defaults["DPM++ 2M SDE"] == "exponential" and defaults["DPM++ 2S a"] == "karras"
    assert defaults["DPM2"] == defaults["DPM2 a"] == "karras"
    assert defaults["Euler"] is defaults["Euler a"] is defaults["LMS"] is defaults["Heun"] is None
    assert {n for n, s in SAMPLERS.items() if s.discard_next_to_last_sigma} == {"DPM2", "DPM2 a"}
    assert {n for n, s in SAMPLERS.items() if s.brownian} == {"DPM++ SDE", "DPM++ 2M SDE"}
    assert {n for n, s in SAMPLERS.items() if s.second_order} == {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a"}
    assert {n for n, s in SAMPLERS.items() if s.uses_noise} == {
        "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "DPM2 a", "LCM"}
    assert SAMPLERS["Euler a"].aliases == ("k_euler_a", "k_euler_ancestral")
    assert SAMPLERS["DDIM"].aliases == ("ddim",) and SAMPLERS["LCM"].aliases == ("k_lcm",)


@pytest.mark.parametrize("name,scheduler,want", [
    ("Euler a", None, ("Euler a", "Automatic")),
    ("euler A", "karras", ("Euler a", "Karras")),
    ("k_dpmpp_2m", None, ("DPM++ 2M", "Automatic")),
    ("k_euler_ancestral", "Exponential", ("Euler a", "Exponential")),
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Automatic")),   # karras is DPM++ 2M's default -> Automatic
    ("DPM++ 2M Karras", "Exponential", ("DPM++ 2M", "Automatic")),  # the name's suffix wins
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Automatic")),
    ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
    ("DPM++ 2M", "karras", ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M", "Uniform", ("DPM++ 2M", "Uniform")),
    ("LMS Karras", None, ("LMS", "Karras")),
    ("Euler SGMUniform", None, ("Euler", "SGM Uniform")),
    ("k_dpm_2_a_ka", None, ("DPM2 a", "Automatic")),
    ("DDIM", None, ("DDIM", "Automatic")),
    ("ddim", "sgm_uniform", ("DDIM", "SGM Uniform")),
    (None, None, ("DPM++ 2M", "Automatic")),
])
def test_resolve_sampler(name, scheduler, want):
    sampler, sched = resolve_sampler(name, scheduler)
    assert (sampler.name, sched.label) == want


def test_unknown_names_are_user_errors_listing_valid_ones():
    with pytest.raises(UserError) as err:
        resolve_sampler("Euler b")
    assert "Euler b" in str(err.value) and "'DPM++ 2M'" in str(err.value) and err.value.field == "sampler_name"
    with pytest.raises(UserError, match="Karras"):
        resolve_sampler("Euler", "Karas")


@pytest.mark.parametrize("name,scheduler,label", [
    ("DPM++ 2M", None, "Karras"), ("DPM++ 2M SDE", None, "Exponential"), ("Euler", None, "Automatic"),
    ("Euler", "karras", "Karras"), ("DPM2", "Uniform", "Uniform"), ("DDIM", None, "DDIM"),
])
def test_schedule_label_is_the_resolved_one(name, scheduler, label):
    assert schedule_label(*resolve_sampler(name, scheduler)) == label
    assert schedule_label(name, scheduler) == label


def test_automatic_uses_the_sampler_default_or_the_model_uniform(sd_schedule):
    auto = SCHEDULERS["automatic"]
    lo, hi = sd_schedule.sigma_min, sd_schedule.sigma_max
    torch.testing.assert_close(get_sigmas(SAMPLERS["DPM++ 2M"], auto, 12, sd_schedule), schedules.karras(12, lo, hi))
    torch.testing.assert_close(get_sigmas(SAMPLERS["Euler"], auto, 12, sd_schedule),
                               schedules.uniform(12, lo, hi, schedule=sd_schedule))
    torch.testing.assert_close(get_sigmas(SAMPLERS["Euler"], SCHEDULERS["exponential"], 12, sd_schedule),
                               schedules.exponential(12, lo, hi))
    torch.testing.assert_close(get_sigmas(SAMPLERS["DDIM"], auto, 20, sd_schedule),
                               schedules.ddim(20, lo, hi, schedule=sd_schedule))


def test_dpm2_discards_the_next_to_last_sigma(sd_schedule):
    """A1111: DPM2 builds steps+1 sigmas and drops the one before the final 0 -> still `steps` steps."""
    got = get_sigmas(SAMPLERS["DPM2"], SCHEDULERS["automatic"], 10, sd_schedule)
    full = schedules.karras(11, sd_schedule.sigma_min, sd_schedule.sigma_max)
    assert len(got) == 11
    torch.testing.assert_close(got, torch.cat([full[:-2], full[-1:]]))


def test_steps_must_be_positive(sd_schedule):
    with pytest.raises(UserError):
        get_sigmas(SAMPLERS["Euler"], SCHEDULERS["automatic"], 0, sd_schedule)


# --- every registered sampler, called the same way ------------------------------------------------------

X0 = torch.tensor([0.7, -1.2, 0.3, 2.0]).view(1, 4, 1, 1).expand(2, 4, 2, 2).contiguous()


def point_mass_model(schedule: DiscreteSchedule, prediction: str):
    """The exact network for data that is the single point X0: eps = (x - X0) / sigma on the unscaled x, or
    the matching v = alpha eps - sigma_vp X0 (alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma alpha)."""

    def model(x_in, t):
        s = schedule.t_to_sigma(t).view(-1, 1, 1, 1)
        alpha = (1 + s**2).rsqrt()
        eps = (x_in / alpha - X0) / s
        return eps if prediction == "epsilon" else alpha * eps - s * alpha * X0

    return model


def _fn_or_skip(info):
    try:
        return info.fn
    except ModuleNotFoundError as exc:  # the DPM++ / UniPC modules are written separately
        pytest.skip(f"{info.name}: {exc}")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_sampler_lands_on_a_point_mass(name, prediction, sd_schedule):
    """The ideal denoiser of a one-point data set returns X0 everywhere, so every sampler, deterministic or
    not, must end exactly at X0; eps- and v-models built for that point must agree. The only error is the
    sigma -> t -> sigma round trip inside the adapter. Tolerance 1e-4 absolute."""
    info = SAMPLERS[name]
    fn = _fn_or_skip(info)
    den = make_denoiser(point_mass_model(sd_schedule, prediction), sd_schedule.alphas_cumprod, prediction)
    sigmas = get_sigmas(info, SCHEDULERS["automatic"], 6, sd_schedule)
    x = randn(X0.shape, generator(3)) * sigmas[0]
    steps = []
    out = fn(den, x, sigmas, extra=None, callback=steps.append, noise=generator_noise(generator(4)))
    assert out.shape == X0.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, X0, atol=1e-4, rtol=0)
    assert [s["i"] for s in steps] == list(range(len(sigmas) - 1))


@pytest.fixture(scope="module")
def zsnr_schedule() -> DiscreteSchedule:
    """A zero-terminal-SNR schedule as diffusers builds it (rescale_betas_zero_snr: alpha_bar_T clamped to 2**-24)."""
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             rescale_betas_zero_snr=True)
    return DiscreteSchedule(sched.alphas_cumprod)


def test_automatic_on_a_zero_terminal_snr_model_spaces_timesteps_evenly(sd_schedule, zsnr_schedule):
    """Lin et al. 2023 (section 3.3): zero-SNR models sample on evenly spaced trailing timesteps; Karras'
    rho-spacing from a last sigma of ~4096 would spend the steps where nothing is decided."""
    assert zsnr_schedule.sigma_max > 4000 and sd_schedule.sigma_max < 15
    for name in ("DPM++ 2M", "Euler", "Euler a", "DPM++ 2M SDE", "DPM2"):
        sampler, auto = resolve_sampler(name, "Automatic")
        sgm = get_sigmas(sampler, SCHEDULERS["sgm_uniform"], 20, zsnr_schedule)
        torch.testing.assert_close(get_sigmas(sampler, auto, 20, zsnr_schedule), sgm)
        assert schedule_label(name, "Automatic", zsnr_schedule) == "SGM Uniform"
    # the steps are even in timestep: the first is the last training timestep (999), then 50 apart
    sampler, auto = resolve_sampler("DPM++ 2M", "Automatic")
    t = zsnr_schedule.sigma_to_t(get_sigmas(sampler, auto, 20, zsnr_schedule)[:-1])
    torch.testing.assert_close(t, torch.linspace(999, 0, 21)[:-1], atol=1e-2, rtol=0)
    # an ordinary model keeps A1111's defaults; a named schedule runs as named; DDIM keeps its own timesteps
    torch.testing.assert_close(get_sigmas(sampler, auto, 20, sd_schedule),
                               get_sigmas(sampler, SCHEDULERS["karras"], 20, sd_schedule))
    assert schedule_label("DPM++ 2M", "Automatic", sd_schedule) == "Karras"
    assert schedule_label("Euler", "Automatic", sd_schedule) == "Automatic"
    karras = get_sigmas(sampler, SCHEDULERS["karras"], 20, zsnr_schedule)
    assert float(karras[1]) > 2 * float(get_sigmas(sampler, auto, 20, zsnr_schedule)[1])  # really different
    ddim, ddim_auto = resolve_sampler("DDIM", "Automatic")
    torch.testing.assert_close(get_sigmas(ddim, ddim_auto, 20, zsnr_schedule),
                               get_sigmas(ddim, SCHEDULERS[ddim.default_scheduler], 20, zsnr_schedule))


def test_cfg_rescale_matches_diffusers_guidance_rescale():
    """rescale_guidance on denoised predictions equals diffusers' rescale_noise_cfg on the v-predictions (Lin et al.
    2023, section 3.4), mapped to denoised with the v-parameterisation (Salimans & Ho 2022)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from sdstack.engine.guidance import rescale_guidance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g) * 5
    sigma = torch.tensor([4096.0, 3.0, 0.1])
    s = sigma.view(-1, 1, 1, 1)
    v_cond, v_uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 1.5

    def denoised(v):  # x0 from v at x = x0 + sigma * eps
        return x / (s**2 + 1) - s * v / (s**2 + 1).sqrt()

    scale = 7.0
    v_cfg = v_uncond + scale * (v_cond - v_uncond)
    for phi in (0.0, 0.7, 1.0):
        want = denoised(rescale_noise_cfg(v_cfg, v_cond, guidance_rescale=phi))
        got = rescale_guidance(denoised(v_cfg), denoised(v_cond), x, sigma, phi)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (rescale_guidance(denoised(v_cfg), denoised(v_cond), x, sigma, 0.7) - denoised(v_cfg)).abs().max() > 0.1


def test_rescale_cfg_automatic_is_the_papers_on_zero_snr_models_only(sd_schedule, zsnr_schedule):
    from sdstack.params import make_params
    from sdstack.sampling.registry import effective_rescale_cfg

    assert make_params().rescale_cfg == -1  # automatic by default
    assert effective_rescale_cfg(-1, zsnr_schedule) == 0.7  # Lin et al. 2023: phi = 0.7
    assert effective_rescale_cfg(-1, sd_schedule) == 0.0  # A1111 has no rescale: SD models run as there
    assert effective_rescale_cfg(0.0, zsnr_schedule) == 0.0 and effective_rescale_cfg(0.3, sd_schedule) == 0.3
    with pytest.raises(UserError, match="rescale_cfg"):
        make_params(rescale_cfg=1.5)
