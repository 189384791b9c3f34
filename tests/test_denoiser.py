"""`Denoiser`: the schedule at fractional timesteps (as diffusers maps sigma <-> t) and (x-hat, eps-hat) of a UNet."""

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DPMSolverMultistepScheduler

from diffusers_pd.denoiser import Denoiser
from diffusers_pd.schedules import (
    alpha_sigma_at,
    alphas_cumprod_from_config,
    edm_sigma_at,
    edm_sigmas_from_alphas_cumprod,
    timestep_at,
)

CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon")


def test_alpha_sigma_at_integer_timesteps_is_the_table_and_fractional_ones_interpolate_log_sigma():
    denoiser = Denoiser(tiny_unet(), CONFIG)
    abar = alphas_cumprod_from_config(CONFIG)
    integers = torch.tensor([-1, 0, 1, 250, 998, 999])
    alpha, sigma = denoiser.alpha_sigma(integers.double())
    alpha_ref, sigma_ref = alpha_sigma_at(abar, integers)
    assert torch.equal(alpha, alpha_ref) and torch.equal(sigma, sigma_ref)

    t = torch.tensor([0.25, 10.5, 499.9, 998.75], dtype=torch.float64)
    alpha, sigma = denoiser.alpha_sigma(t)
    log_sigmas = np.log(np.sqrt((1 - abar.numpy()) / abar.numpy()))  # numpy float64 reference
    edm = np.exp(np.interp(t.numpy(), np.arange(1000), log_sigmas))
    np.testing.assert_allclose((sigma / alpha).numpy(), edm, rtol=1e-12)
    np.testing.assert_allclose((alpha**2 + sigma**2).numpy(), 1.0, rtol=1e-14)
    with pytest.raises(ValueError, match="must lie in"):
        denoiser.alpha_sigma(torch.tensor([1000.5]))


def test_timestep_at_is_diffusers_sigma_to_t_and_inverts_edm_sigma_at():
    scheduler = DPMSolverMultistepScheduler(**CONFIG)
    table = edm_sigmas_from_alphas_cumprod(alphas_cumprod_from_config(CONFIG))
    sigmas = np.exp(np.random.default_rng(0).uniform(np.log(0.003), np.log(300.0), 64))  # beyond both ends too
    reference = np.array([scheduler._sigma_to_t(s, np.log(table.numpy())) for s in sigmas])
    ours = timestep_at(table, torch.from_numpy(sigmas))
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-9)
    inside = (ours > 0) & (ours < 999)
    np.testing.assert_allclose(edm_sigma_at(table, ours)[inside].numpy(), sigmas[inside.numpy()], rtol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x_eps_reads_the_raw_output_in_its_parameterization(prediction_type):
    unet = tiny_unet().double()
    denoiser = Denoiser(unet, CONFIG, prediction_type=prediction_type)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(612.0)
    x, eps = denoiser(z, t)
    alpha, sigma = denoiser.alpha_sigma(t)
    output = unet(z, torch.full((3,), 612.0)).sample
    torch.testing.assert_close(alpha * x + sigma * eps, z, atol=1e-12, rtol=0)
    expected = {"epsilon": eps, "sample": x, "v_prediction": alpha * eps - sigma * x}[prediction_type]
    torch.testing.assert_close(expected, output, atol=1e-12, rtol=0)


def test_fractional_timesteps_reach_the_unet_as_floats_and_given_alpha_sigma_are_used():
    unet = tiny_unet()
    denoiser = Denoiser(unet, CONFIG)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_frac = denoiser(z, 100.5)[1]
    assert (eps_frac - denoiser(z, 100)[1]).abs().max() > 1e-6 and (eps_frac - denoiser(z, 101)[1]).abs().max() > 1e-6
    torch.testing.assert_close(eps_frac, unet(z, torch.full((2,), 100.5)).sample, atol=1e-6, rtol=0)
    # integer timesteps as floats give exactly what a stock pipeline's long timesteps give
    assert torch.equal(denoiser(z, 100)[1], unet(z, torch.tensor(100)).sample)
    # a caller's (alpha, sigma) is the one used to read the output (Karras: rounded t, exact sigma)
    x_given, eps_given = denoiser(z, 100, alpha=0.6, sigma=0.8)
    torch.testing.assert_close(x_given, (z - 0.8 * eps_given) / 0.6)
    assert torch.equal(eps_given, denoiser(z, 100)[1])


def test_class_labels_are_forwarded():
    unet = tiny_unet(num_class_embeds=4)
    torch.nn.init.normal_(unet.class_embedding.weight)
    denoiser = Denoiser(unet, CONFIG)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x1, _ = denoiser(z, 300, class_labels=torch.tensor([1, 1]))
    x2, _ = denoiser(z, 300, class_labels=torch.tensor([2, 2]))
    assert (x1 - x2).abs().max() > 1e-4


def test_epsilon_prediction_at_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        Denoiser(tiny_unet(), {**CONFIG, "rescale_betas_zero_snr": True})


def test_unet2d_condition_inputs_are_forwarded_and_cast_to_the_unet_dtype():
    from tiny_sd import SD_SCHEDULER, TEXT_DIM, tiny_cond_unet

    unet = tiny_cond_unet(time_cond_proj_dim=8).double()
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    denoiser = Denoiser(unet, SD_SCHEDULER)
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    text, w = torch.randn(2, 16, TEXT_DIM, generator=generator), torch.randn(2, 8, generator=generator)  # float32
    _, eps = denoiser(z, 321, encoder_hidden_states=text, timestep_cond=w)
    expected = unet(z, torch.full((2,), 321.0), encoder_hidden_states=text.double(), timestep_cond=w.double()).sample
    torch.testing.assert_close(eps, expected, atol=1e-12, rtol=0)
    assert (denoiser(z, 321, encoder_hidden_states=text.flip(0), timestep_cond=w)[1] - eps).abs().max() > 1e-4
    assert (denoiser(z, 321, encoder_hidden_states=text, timestep_cond=w.flip(0))[1] - eps).abs().max() > 1e-4
