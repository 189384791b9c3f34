"""Pure math of the variance-preserving diffusion z_t = alpha_t x + sigma_t eps (Salimans & Ho 2022).

Notation (paper -> code):

| paper            | code        |
|------------------|-------------|
| z_t              | `z`         |
| x, x-hat         | `x`         |
| epsilon          | `eps`       |
| v                | `v`         |
| alpha_t, sigma_t | `alpha`, `sigma` (broadcastable tensors, alpha^2 + sigma^2 = 1) |
| alpha_s, sigma_s | `alpha_s`, `sigma_s` (the point the DDIM step lands on)      |

Every function is keyword-only and works on any dtype (the tests run them in float64).
`prediction_type` strings follow diffusers: ``"epsilon"``, ``"sample"``, ``"v_prediction"``.
"""

from typing import Tuple

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "constant")


def check_prediction_type(prediction_type: str) -> str:
    """Return `prediction_type` or raise a one-line error listing the valid ones."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}.")
    return prediction_type


def x_from_eps(*, z, eps, alpha, sigma):
    """x = (z - sigma * eps) / alpha."""
    return (z - sigma * eps) / alpha


def eps_from_x(*, z, x, alpha, sigma):
    """eps = (z - alpha * x) / sigma."""
    return (z - alpha * x) / sigma


def x_from_v(*, z, v, alpha, sigma):
    """x = alpha * z - sigma * v."""
    return alpha * z - sigma * v


def eps_from_v(*, z, v, alpha, sigma):
    """eps = sigma * z + alpha * v."""
    return sigma * z + alpha * v


def v_from_x_eps(*, x, eps, alpha, sigma):
    """v = alpha * eps - sigma * x."""
    return alpha * eps - sigma * x


def x_from_both(*, z, x_pred, eps_pred, alpha, sigma):
    """x = sigma^2 * x_pred + alpha * (z - sigma * eps_pred), the paper's merge of a two-headed output."""
    return sigma**2 * x_pred + alpha * (z - sigma * eps_pred)


def x_eps_from_output(*, output, z, alpha, sigma, prediction_type: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x-hat, eps-hat) of a raw network output in `prediction_type`."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x_from_eps(z=z, eps=output, alpha=alpha, sigma=sigma), output
    if prediction_type == "sample":
        return output, eps_from_x(z=z, x=output, alpha=alpha, sigma=sigma)
    return x_from_v(z=z, v=output, alpha=alpha, sigma=sigma), eps_from_v(z=z, v=output, alpha=alpha, sigma=sigma)


def output_from_x(*, x, z, alpha, sigma, prediction_type: str):
    """The network output in `prediction_type` that corresponds to x-hat at (z, alpha, sigma)."""
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return x
    eps = eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma)
    if prediction_type == "epsilon":
        return eps
    return v_from_x_eps(x=x, eps=eps, alpha=alpha, sigma=sigma)


def ddim_step(*, x, eps, alpha_s, sigma_s):
    """z_s = alpha_s * x + sigma_s * eps, the deterministic DDIM update (eta = 0) to time s."""
    return alpha_s * x + sigma_s * eps


def ddim_noise_std(*, alpha_t, sigma_t, alpha_s, sigma_s, eta):
    """sigma_t(eta) = eta * (sigma_s / sigma_t) * sqrt(1 - alpha_t^2 / alpha_s^2), eq. 16 of DDIM (Song et al. 2021)."""
    return eta * (sigma_s / sigma_t) * (1 - alpha_t**2 / alpha_s**2) ** 0.5


def ddim_stochastic_step(*, x, eps, noise, alpha_s, sigma_s, std):
    """z_s = alpha_s * x + sqrt(sigma_s^2 - std^2) * eps + std * noise, eq. 12 of DDIM with std = sigma_t(eta)."""
    return alpha_s * x + torch.clamp(sigma_s**2 - std**2, min=0.0) ** 0.5 * eps + std * noise


def x_eps_analytic_first_step(*, z, alpha, sigma):
    """AFS (Zhou et al. 2024): eps-hat = z, hence x-hat = (z - sigma z) / alpha = alpha z / (1 + sigma) (finite at alpha = 0)."""
    return alpha * z / (1.0 + sigma), z


def x_from_ddim_endpoints(*, z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t): the x that DDIM maps z_t to z_s with."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def snr(*, alpha, sigma):
    """SNR = alpha^2 / sigma^2."""
    return alpha**2 / sigma**2


def loss_weight(*, alpha, sigma, weighting: str):
    """Weight w(lambda) of the x-space MSE: truncated_snr max(SNR, 1), snr_plus_one SNR + 1, snr SNR, constant 1."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}.")
    ratio = snr(alpha=alpha, sigma=sigma)
    if weighting == "truncated_snr":
        return torch.clamp(ratio, min=1.0)
    if weighting == "snr_plus_one":
        return ratio + 1.0
    if weighting == "snr":
        return ratio
    return torch.ones_like(ratio)
