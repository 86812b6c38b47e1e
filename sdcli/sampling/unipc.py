"""UniPC: the unified predictor-corrector multistep sampler, over a VE denoiser.

Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models" (arXiv:2302.04867), in its data-prediction form, step for step as diffusers' ``UniPCMultistepScheduler``
(``predict_x0=True``) computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import SdcliError
from .samplers import Step, half_log_snr

SOLVER_TYPES = ("bh1", "bh2")


def sample_unipc(model: Callable[[np.ndarray, float], np.ndarray], x: np.ndarray, sigmas: Sequence[float], *,
                 noise_sampler: Callable | None = None, order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 alphas: Sequence[float] | None = None) -> Iterator[Step]:
    """UniPC-p (Zhao et al. 2023): a UniP-p predictor from the last ``order`` denoised estimates, and a UniC
    corrector that refines each prediction with the denoised estimate at the predicted point.

    With lambda = -log(sigma) and h = lambda_next - lambda, the step is the exponential integrator of DPM-Solver++
    plus B(h) times a weighted sum of divided differences of earlier denoised estimates::

        x_next = sigma_next / sigma * x - expm1(-h) * denoised - B(h) * sum_k rho_k * D_k

    B(h) is -h ("bh1") or expm1(-h) ("bh2"); D_k = (denoised_k - denoised) / r_k for an earlier estimate at
    lambda_k, r_k = (lambda_k - lambda) / h; the weights rho solve the order conditions of the paper (a
    Vandermonde system in r_k), except that a single difference always gets rho = 1/2, as in diffusers.

    Matches diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``, ``solver_p=None``) after the change of
    variables x_vp = x / sqrt(1 + sigma^2): its VP alpha_t cancels from every term, and its lambda = log(alpha_t /
    sigma_t) is -log(sigma) here. The corrector needs the model at the new point, so, as in diffusers, step i
    first evaluates the model at the latents step i - 1 predicted, corrects those latents with it (UniC), then
    predicts from the corrected latents (UniP) reusing the same evaluation: the model is called once per step
    and the last prediction is never corrected. Each ``Step.x`` is the prediction, what diffusers' ``step()``
    returns as ``prev_sample``; ``Step.denoised`` is the model's estimate at the step's start.

    - ``order``: the order p of UniP-p (diffusers' ``solver_order``, which recommends 2 for guided sampling and
      3 for unconditional). The first steps warm up with orders 1, 2, ...; the UniC-p corrector after a UniP-p
      step adds the new estimate as one more difference, for an order of accuracy p + 1.
    - ``solver_type``: the paper's B1(h) = h ("bh1") or B2(h) = e^h - 1 ("bh2", the default), here evaluated at
      -h (data prediction); diffusers recommends "bh1" for unconditional sampling in under 10 steps.
    - ``lower_order_final``: the last steps use order at most the number of steps left (diffusers applies this
      at every step count, not only below 15 as its docstring says).
    - ``disable_corrector``: indices of steps whose prediction is not corrected (diffusers' list of the same
      name; it helps against guidance-scale artefacts at large guidance).

    - ``alphas`` (N + 1,): the signal scales of latents written x = alpha x0 + sigma eps, for another
      parametrisation than VE (None: alpha = 1). Then lambda = log(alpha / sigma) and every term that
      ``denoised`` enters is multiplied by alpha_next, as in the paper (Zhao et al. 2023, eq. 5-8 with alpha_t);
      flow matching passes alpha = 1 - sigma (``flow.sample_flow_unipc``).

    A step to sigma_next = 0 (lambda = +inf, h = +inf) lands on ``denoised`` exactly; it is always first order,
    since a divided difference there has r_k = 0. (There diffusers returns non-finite latents with "bh1", whose
    B(h) = -h is infinite, and with ``lower_order_final=False``, which keeps the higher order.) UniPC is
    deterministic: ``noise_sampler`` is accepted for the common sampler signature and unused.
    """
    if not isinstance(order, int) or order < 1:
        raise SdcliError(f"UniPC order must be a positive integer, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise SdcliError(f"unknown UniPC solver type {solver_type!r}; choose one of: {', '.join(SOLVER_TYPES)}")
    sigmas = [float(sigma) for sigma in sigmas]
    alphas = [1.0] * len(sigmas) if alphas is None else [float(alpha) for alpha in alphas]
    lambdas = [half_log_snr(alpha, sigma) for alpha, sigma in zip(alphas, sigmas)]
    steps = len(sigmas) - 1
    history: list[np.ndarray] = []  # denoised estimates of the last `order` steps, newest last
    x_last = x  # the latents the previous prediction started from
    last_order = 0  # the order of the previous prediction (0: none yet)

    def update(x, i, target, denoised, nodes):
        """x at sigmas[target] from x and denoised at sigmas[i], with divided differences to the nodes [(index,
        estimate)]: UniP when the nodes are earlier estimates, UniC when the new estimate (index target) is
        the last node."""
        sigma, sigma_next, alpha_next = sigmas[i], sigmas[target], alphas[target]
        h = lambdas[target] - lambdas[i]
        h_phi_1 = math.expm1(-h)  # e^{-h} - 1 = (sigma_next / alpha_next) / (sigma / alpha) - 1
        b_h = -h if solver_type == "bh1" else h_phi_1
        x_next = sigma_next / sigma * x - (alpha_next * h_phi_1) * denoised
        if not nodes:
            return x_next
        # r = 1 for the new estimate by definition (h / h, also where h is infinite: a step from alpha = 0)
        rks = [1.0 if k == target else (lambdas[k] - lambdas[i]) / h for k, _ in nodes]
        if len(nodes) == 1:
            rhos = [0.5]
        else:
            # Order conditions sum_k rho_k r_k^(n-1) = b_n = n! h_phi_n / B(h), n = 1 .. K, where
            # h_phi_n = (-h) phi_{n+1}(-h) follows phi_{n+1}(z) = (phi_n(z) - 1/n!) / z, phi_1(z) = expm1(z) / z.
            b, h_phi_n, factorial = [], h_phi_1 / -h - 1, 1
            for n in range(1, len(nodes) + 1):
                b.append(h_phi_n * factorial / b_h)
                factorial *= n + 1
                h_phi_n = h_phi_n / -h - 1 / factorial
            vandermonde = np.vander(rks, increasing=True).T  # (K, K): row n holds r_k^n
            rhos = [float(rho) for rho in np.linalg.solve(vandermonde, b)]
        residual = sum(rho * (estimate - denoised) / rk for rho, rk, (_, estimate) in zip(rhos, rks, nodes))
        return x_next - (alpha_next * b_h) * residual

    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if last_order and i - 1 not in disable_corrector:
            # UniC: redo step i - 1 with the new estimate as one more node (r = 1).
            earlier = [(i - 1 - k, history[-1 - k]) for k in range(1, last_order)]
            x = update(x_last, i - 1, i, history[-1], earlier + [(i, denoised)]).astype(x.dtype, copy=False)
        history = (history + [denoised])[-order:]
        step_order = min(order, i + 1, steps - i if lower_order_final else order)
        if sigma_next == 0:
            step_order = 1
        x_last, last_order = x, step_order
        # UniP-p: the exponential integrator plus the differences to the p - 1 previous estimates.
        earlier = [(i - k, history[-1 - k]) for k in range(1, step_order)]
        x = update(x, i, i + 1, denoised, earlier).astype(x.dtype, copy=False)
        replaced = yield Step(index=i, sigma=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
        if replaced is not None:
            x = replaced
