"""Noise schedules as (alpha_t, sigma_t, log-SNR) and the student's sampling grid.

Two sources of a schedule:

* a diffusers scheduler config, as Hub teachers ship it (`linear`, `scaled_linear`,
  `squaredcos_cap_v2`, `sigmoid`, `trained_betas`, `rescale_betas_zero_snr`, any
  `num_train_timesteps`): `alphas_cumprod_from_config`;
* the paper's continuous cosine log-SNR schedule, clipped to [logsnr_min, logsnr_max], sampled on a
  discrete table of `num_train_timesteps` points so that a stock diffusers scheduler reproduces it
  through `trained_betas`: `cosine_trained_betas`.

Timestep index -1 stands for the clean sample (alpha = 1, sigma = 0), where the last step lands.
"""

import math
from typing import Any, List, Mapping, Tuple

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0  # the paper's clipping of the cosine log-SNR schedule


def cosine_logsnr(t, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
    """lambda(t) = -2 log(tan(a t + b)), the cosine schedule with lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
    t = torch.as_tensor(t, dtype=torch.float64)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def alpha_sigma_from_logsnr(logsnr) -> Tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def betas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """beta_i = 1 - abar_i / abar_{i-1}, with abar_{-1} = 1."""
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def cosine_trained_betas(
    num_train_timesteps: int = 1024, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> List[float]:
    """`trained_betas` whose table is abar_i = sigmoid(lambda((i + 1) / T)) of the cosine log-SNR schedule."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alphas_cumprod = torch.sigmoid(cosine_logsnr(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max))
    return betas_from_alphas_cumprod(alphas_cumprod).tolist()


def _cosine_alpha_bar_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the Nichol & Dhariwal cosine abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), capped at max_beta."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last one is 0 and the first unchanged (Lin et al. 2023, Algorithm 1)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * (first / (first - last))) ** 2


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The float64 betas that a diffusers scheduler builds from `config` (before any zero-SNR rescale)."""
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float64)
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries but num_train_timesteps is {num_train_timesteps}: make them match."
            )
        return betas
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start, beta_end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_alpha_bar_betas(num_train_timesteps)
    if beta_schedule == "sigmoid":
        ramp = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
        return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    raise ValueError(
        f"Unsupported beta_schedule {beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)} or pass trained_betas."
    )


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """abar_i = prod_{j <= i} (1 - beta_j) in float64, as diffusers' schedulers define it from `config`."""
    alphas_cumprod = torch.cumprod(1.0 - betas_from_config(config), dim=0)
    if config.get("rescale_betas_zero_snr", False):
        alphas_cumprod = rescale_zero_terminal_snr_alphas_cumprod(alphas_cumprod)
    return alphas_cumprod


def alpha_sigma_at(alphas_cumprod, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) per timestep; timestep -1 is the clean sample (1, 0)."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.long, device=alphas_cumprod.device)
    padded = torch.cat([alphas_cumprod, alphas_cumprod.new_ones(1)])  # index -1 -> 1.0
    abar = padded[timesteps]
    return abar.sqrt(), (1.0 - abar).clamp(min=0.0).sqrt()


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """t_k = round(T - k T / N) - 1 for k < N: diffusers' "trailing" grid, first step at T - 1, exact for any N."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_steps} must be between 1 and num_train_timesteps={num_train_timesteps}."
        )
    # T - k * (T / N) is bit-identical to diffusers' np.arange(T, 0, -T / N) and never has N + 1 entries.
    grid = np.round(num_train_timesteps - np.arange(num_steps) * (num_train_timesteps / num_steps))
    return grid.astype(np.int64) - 1


# ---------------------------------------------------------------------------------------------------------------
# EDM noise levels and fractional timesteps. A VP point (alpha, sigma) has the EDM noise level s = sigma / alpha =
# sqrt((1 - abar) / abar); diffusers' Karras / log-SNR grids and Heun work in s, and map s <-> t by linear
# interpolation of log s on the integer table (`_sigma_to_t`). We use that same interpolation both ways.


def edm_sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """s_i = sqrt((1 - abar_i) / abar_i), the EDM noise level of each table entry (inf where abar_i = 0)."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def alpha_sigma_from_edm_sigma(edm_sigma) -> Tuple[torch.Tensor, torch.Tensor]:
    """alpha = 1 / sqrt(1 + s^2), sigma = 1 / sqrt(1 + 1 / s^2): the VP pair of noise level s (s = 0 clean, inf noise)."""
    edm_sigma = torch.as_tensor(edm_sigma, dtype=torch.float64)
    return (1.0 + edm_sigma**2).rsqrt(), (1.0 + edm_sigma**-2).rsqrt()


def edm_sigma_at(edm_sigma_table, timesteps) -> torch.Tensor:
    """s(t) = exp((1 - w) log s_i + w log s_{i+1}) for i = floor(t), w = t - i; the table value at integer t, 0 at t = -1."""
    table = torch.as_tensor(edm_sigma_table, dtype=torch.float64)
    timesteps = torch.as_tensor(timesteps, dtype=torch.float64)
    if ((timesteps < 0) & (timesteps != -1)).any() or (timesteps > len(table) - 1).any():
        raise ValueError(f"Timesteps must lie in [0, {len(table) - 1}] (or be -1, the clean sample); got {timesteps.tolist()}.")
    index = timesteps.clamp(0, len(table) - 2).floor().long()
    weight = timesteps.clamp(min=0) - index
    log_table = table.log()
    interpolated = ((1 - weight) * log_table[index] + weight * log_table[index + 1]).exp()
    exact = table[timesteps.clamp(min=0).round().long()]
    sigma = torch.where(timesteps == timesteps.round(), exact, interpolated)
    return torch.where(timesteps == -1, torch.zeros_like(sigma), sigma)


def timestep_at(edm_sigma_table, edm_sigma) -> torch.Tensor:
    """t(s) = i + (log s_i - log s) / (log s_i - log s_{i+1}) on the bracketing entries, clipped to [0, T - 1]: diffusers' `_sigma_to_t`."""
    log_table = torch.as_tensor(edm_sigma_table, dtype=torch.float64).log()
    log_sigma = torch.as_tensor(edm_sigma, dtype=torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_table) - 2)
    weight = ((log_table[low] - log_sigma.reshape(-1)) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return (low + weight).reshape(log_sigma.shape)


def broadcast_like(like: torch.Tensor, *values, dtype=None) -> Tuple[torch.Tensor, ...]:
    """Each value (a number, or one per sample) as a (batch, 1, ..., 1) tensor on `like`'s device in `dtype` (default:
    `like`'s dtype promoted to at least float32), to broadcast against `like`."""
    dtype = dtype or torch.promote_types(like.dtype, torch.float32)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return tuple(torch.as_tensor(value, dtype=dtype, device=like.device).reshape(shape) for value in values)


def alpha_sigma_interpolated(alphas_cumprod, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at any, possibly fractional, timestep: `alpha_sigma_at` at integers, log-s interpolation between."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.float64)
    alpha_exact, sigma_exact = alpha_sigma_at(alphas_cumprod, timesteps.clamp(min=-1).round().long())
    alpha, sigma = alpha_sigma_from_edm_sigma(edm_sigma_at(edm_sigmas_from_alphas_cumprod(alphas_cumprod), timesteps))
    integer = timesteps == timesteps.round()
    return torch.where(integer, alpha_exact, alpha), torch.where(integer, sigma_exact, sigma)
