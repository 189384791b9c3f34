"""Schedules against diffusers' own schedulers and closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_pd.schedules import (
    alpha_sigma_at,
    alpha_sigma_from_logsnr,
    alphas_cumprod_from_config,
    cosine_logsnr,
    cosine_trained_betas,
    trailing_timesteps,
)

CONFIGS = [
    dict(num_train_timesteps=1000, beta_schedule="linear"),
    dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=1000, beta_schedule="sigmoid"),
    dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(num_train_timesteps=50, beta_schedule="linear", beta_start=0.001, beta_end=0.2),
    dict(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.get("beta_schedule", "trained") + str(c["num_train_timesteps"]))
def test_alphas_cumprod_match_diffusers(config):
    ours = alphas_cumprod_from_config(config)
    theirs = DDPMScheduler(**config).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=1e-7)
    if config.get("rescale_betas_zero_snr"):
        assert ours[-1] == 0


def test_cosine_logsnr_is_clipped_cosine():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    logsnr = cosine_logsnr(t)
    assert abs(logsnr[0] - 20) < 1e-9 and abs(logsnr[-1] + 20) < 1e-9
    assert torch.all(logsnr[1:] < logsnr[:-1])
    alpha, sigma = alpha_sigma_from_logsnr(logsnr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-15)
    # with (almost) unclipped bounds it is alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    alpha, sigma = alpha_sigma_from_logsnr(cosine_logsnr(t[1:-1], logsnr_min=-60, logsnr_max=60))
    torch.testing.assert_close(alpha, torch.cos(math.pi / 2 * t[1:-1]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sigma, torch.sin(math.pi / 2 * t[1:-1]), rtol=1e-10, atol=1e-10)


def test_cosine_table_is_what_a_stock_scheduler_uses():
    betas = cosine_trained_betas(1024)
    stock = DDIMScheduler(num_train_timesteps=1024, trained_betas=betas)
    expected = torch.sigmoid(cosine_logsnr(torch.arange(1, 1025, dtype=torch.float64) / 1024))
    torch.testing.assert_close(stock.alphas_cumprod.double(), expected, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(alphas_cumprod_from_config({"num_train_timesteps": 1024, "trained_betas": betas}), expected, rtol=1e-12, atol=0)


def test_alpha_sigma_at_clean_sample():
    alphas_cumprod = alphas_cumprod_from_config({})
    alpha, sigma = alpha_sigma_at(alphas_cumprod, [-1, 0, 999])
    assert alpha[0] == 1 and sigma[0] == 0
    torch.testing.assert_close(alpha[1:] ** 2 + sigma[1:] ** 2, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("num_train_timesteps", [1000, 1024, 999, 50])
def test_trailing_grid_matches_diffusers_and_nests(num_train_timesteps):
    stock = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    for num_steps in [1, 2, 3, 4, 7, 16, 25, num_train_timesteps // 2]:
        grid = trailing_timesteps(num_train_timesteps, num_steps)
        stock.set_timesteps(num_steps)
        np.testing.assert_array_equal(grid, stock.timesteps.numpy())
        assert grid[0] == num_train_timesteps - 1 and len(grid) == num_steps and np.all(np.diff(grid) < 0)
        # the student's grid is every other point of the teacher's 2N grid
        np.testing.assert_array_equal(trailing_timesteps(num_train_timesteps, 2 * num_steps)[::2], grid)


def test_trailing_grid_rejects_too_many_steps():
    with pytest.raises(ValueError, match="between 1 and num_train_timesteps=10"):
        trailing_timesteps(10, 11)
