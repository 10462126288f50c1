"""UniPC (Zhao et al. 2023, arXiv 2302.04867) over a sigma schedule, in data (x0) prediction.

The update is the B(h) form of UniP-p / UniC-p written in the VE/EDM parametrisation: with
``lambda = -log(sigma)`` and ``h = lambda_t - lambda_s`` the first-order part is
``x_t = (sigma_t / sigma_s) * x_s - expm1(-h) * m_s`` (DPM-Solver++(1), i.e. DDIM), and the higher-order
parts use the differences ``D1_k = (m_k - m_s) / r_k`` of earlier x0 predictions ``m``. This is the same
arithmetic as the VP form ``x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h}-1) m_s - ...`` divided by alpha_t.

Schedule of orders (as in the UniPC reference code and diffusers' UniPCMultistepScheduler): the order of
step i is ``min(order, i + 1)`` (warm-up), and with ``lower_order_final`` also ``min(., steps - i)``. The
corrector UniC runs at every step that evaluates the model (all but the last), reusing that evaluation,
so the cost stays one model call per step. The step to sigma=0 is always the first-order one (the x0
prediction); a higher-order step there is undefined (h is infinite).
"""

from __future__ import annotations

import math

import torch

from .common import prepare_sampling, report_step

__all__ = ["sample_unipc"]

VARIANTS = ("bh1", "bh2")


def _b_vector(hh: float, order: int, b_h: float) -> list[float]:
    """Right-hand side b_i = i! * phi_{i+1}(hh) * hh / B(h), i = 1..order (the UniPC order conditions)."""
    b, factorial = [], 1
    h_phi_k = math.expm1(hh) / hh - 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b


def _solve(rks: list[float], b: list[float], size: int) -> list[float]:
    """Solve R[:size, :size] rho = b[:size] with R[i][k] = rks[k] ** i (a small Vandermonde system)."""
    mat = torch.tensor([[rk**i for rk in rks[:size]] for i in range(size)], dtype=torch.float64)
    return torch.linalg.solve(mat, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def _terms(history, lam_t: float, order: int, variant: str):
    """Shared pieces of UniP/UniC from base point history[-1] to lambda_t, using ``order`` points."""
    lam_0, m0 = history[-1]
    h = lam_t - lam_0
    rks, d1s = [], []
    for k in range(1, order):
        lam_k, m_k = history[-(k + 1)]
        rk = (lam_k - lam_0) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    hh = -h  # data prediction
    b_h = hh if variant == "bh1" else math.expm1(hh)
    return h, rks, d1s, b_h, _b_vector(hh, order, b_h)


def _weighted(rhos: list[float], tensors: list[torch.Tensor]):
    out = 0
    for rho, t in zip(rhos, tensors):
        out = out + rho * t
    return out


def _predict(x, history, lam_t: float, order: int, variant: str):
    """UniP-order: from x at history[-1] to lambda_t."""
    h, rks, d1s, b_h, b = _terms(history, lam_t, order, variant)
    m0 = history[-1][1]
    x_t = math.exp(-h) * x - math.expm1(-h) * m0
    if order == 1:
        return x_t
    rhos = [0.5] if order == 2 else _solve(rks, b, order - 1)
    return x_t - b_h * _weighted(rhos, d1s)


def _correct(x_prev, history, lam_t: float, model_t, order: int, variant: str):
    """UniC-order: redo the step from x_prev (at history[-1]) to lambda_t using model_t, the x0
    prediction evaluated at the predicted point."""
    h, rks, d1s, b_h, b = _terms(history, lam_t, order, variant)
    m0 = history[-1][1]
    rhos = [0.5] if order == 1 else _solve(rks, b, order)
    x_t = math.exp(-h) * x_prev - math.expm1(-h) * m0
    return x_t - b_h * (_weighted(rhos[:-1], d1s) + rhos[-1] * (model_t - m0))


def _check_options(order: int, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"UniPC order must be an integer >= 1, got {order!r}")


@torch.no_grad()
def sample_unipc(
    denoiser, x, sigmas, *, extra=None, callback=None, noise=None, order=3, variant="bh1", lower_order_final=True
):
    """UniPC multistep predictor-corrector, B(h) variants, data prediction (Zhao et al. 2023, arXiv 2302.04867)."""
    _check_options(order, variant)
    sigmas, sig, s_in, extra = prepare_sampling(x, sigmas, extra)
    steps = len(sig) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0 prediction), newest last
    x_prev, prev_order = None, 0
    for i in range(steps):
        lam = -math.log(sig[i])
        denoised = denoiser(x, sigmas[i] * s_in, **extra)
        if x_prev is not None:
            x = _correct(x_prev, history, lam, denoised, prev_order, variant)
        history = (history + [(lam, denoised)])[-order:]
        report_step(callback, i, x, sigmas[i], denoised)
        step_order = min(order, len(history), steps - i if lower_order_final else order)
        x_prev, prev_order = x, step_order
        if sig[i + 1] == 0:
            x = denoised
        else:
            x = _predict(x, history, -math.log(sig[i + 1]), step_order, variant)
    return x
