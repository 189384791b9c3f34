"""ProgressiveDistillationScheduler: exact DDIM on any grid, the two-step target, config round trips, errors."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from diffusers_pd import ProgressiveDistillationScheduler, cosine_trained_betas
from diffusers_pd.parameterization import x_eps_from_output
from diffusers_pd.schedules import alphas_cumprod_from_config

LINEAR_1000 = dict(num_train_timesteps=1000, beta_schedule="linear")
COSINE_1024 = dict(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024))
ZERO_SNR = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)


class Float64Teacher:
    """A smooth nonlinear stand-in for a network: output = tanh(W z) * (1 + t / T) + 0.1 z, in float64."""

    def __init__(self, channels=2, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, generator=generator, dtype=torch.float64) / channels**0.5

    def __call__(self, z, t):
        t = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.weight, z)) * (1 + t / 1000) + 0.1 * z


def reference_alpha_sigma(alphas_cumprod, t):
    """(alpha, sigma) at integer timesteps, -1 being the clean sample: written out independently of the package."""
    abar = np.array([1.0 if int(s) < 0 else float(alphas_cumprod[int(s)]) for s in t])
    return torch.tensor(np.sqrt(abar)).reshape(-1, 1, 1, 1), torch.tensor(np.sqrt(1 - abar)).reshape(-1, 1, 1, 1)


def reference_teacher_two_steps(teacher, teacher_type, alphas_cumprod, z, t, t_mid, t_next):
    """z_t'' of two plain DDIM steps, written as z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)."""
    for start, end in [(t, t_mid), (t_mid, t_next)]:
        a, s = reference_alpha_sigma(alphas_cumprod, start)
        a_end, s_end = reference_alpha_sigma(alphas_cumprod, end)
        out = teacher(z, torch.as_tensor(start))
        x = {"epsilon": (z - s * out) / a, "sample": out, "v_prediction": a * z - s * out}[teacher_type]
        z = a_end * x + (s_end / s) * (z - a * x)
    return z


@pytest.mark.parametrize("schedule", [LINEAR_1000, COSINE_1024], ids=["linear1000", "cosine1024"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 16, 256])
@pytest.mark.parametrize(
    "teacher_type,student_type",
    [("epsilon", "v_prediction"), ("v_prediction", "v_prediction"), ("v_prediction", "sample"), ("sample", "epsilon")],
)
def test_one_student_step_lands_on_two_teacher_steps(schedule, num_steps, teacher_type, student_type):
    scheduler = ProgressiveDistillationScheduler(**schedule, prediction_type=student_type)
    scheduler.set_timesteps(num_steps)
    teacher = Float64Teacher()
    generator = torch.Generator().manual_seed(num_steps)
    grid = scheduler.timesteps
    z = torch.randn(len(grid), 2, 3, 3, generator=generator, dtype=torch.float64)  # one sample per grid point

    target = scheduler.distillation_target(teacher, z, grid, teacher_prediction_type=teacher_type)

    # independent reference: the teacher's two DDIM steps on the 2N grid
    stock = DDIMScheduler(num_train_timesteps=schedule["num_train_timesteps"], timestep_spacing="trailing")
    stock.set_timesteps(2 * num_steps)
    teacher_grid = np.append(stock.timesteps.numpy(), -1)
    t_mid, t_next = teacher_grid[1::2], teacher_grid[2::2]
    np.testing.assert_array_equal(teacher_grid[0::2][:num_steps], grid.numpy())
    alphas_cumprod = alphas_cumprod_from_config(schedule).numpy()
    expected = reference_teacher_two_steps(teacher, teacher_type, alphas_cumprod, z, grid.numpy(), t_mid, t_next)

    # ONE student DDIM step with the target as its output
    landed = torch.stack([scheduler.step(target[i : i + 1], grid[i], z[i : i + 1]).prev_sample[0] for i in range(len(grid))])
    rel = (landed - expected).norm() / expected.norm()
    assert rel < 1e-10, rel
    # at the last step the target is the teacher's own x-hat at t' (its second evaluation)
    a, s = reference_alpha_sigma(alphas_cumprod, grid[-1:])
    a_mid, s_mid = reference_alpha_sigma(alphas_cumprod, t_mid[-1:])
    out = teacher(z[-1:], grid[-1:])
    x_first = x_eps_from_output(output=out, z=z[-1:], alpha=a, sigma=s, prediction_type=teacher_type)[0]
    z_mid = a_mid * x_first + (s_mid / s) * (z[-1:] - a * x_first)
    x_mid = x_eps_from_output(output=teacher(z_mid, torch.as_tensor(t_mid[-1:])), z=z_mid, alpha=a_mid, sigma=s_mid, prediction_type=teacher_type)[0]
    x_student = x_eps_from_output(output=target[-1:], z=z[-1:], alpha=a, sigma=s, prediction_type=student_type)[0]
    torch.testing.assert_close(x_student, x_mid, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
def test_step_equals_diffusers_ddim_where_ddim_is_defined(prediction_type, num_steps):
    ours = ProgressiveDistillationScheduler(**LINEAR_1000, prediction_type=prediction_type)
    stock = DDIMScheduler(**LINEAR_1000, prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(num_steps)
    stock.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, stock.timesteps)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    for t in ours.timesteps:
        output = torch.randn(2, 3, 4, 4, generator=generator)
        a, b = ours.step(output, t, sample), stock.step(output, t, sample, eta=0.0)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-5)
        sample = a.prev_sample


def test_step_is_exact_where_ddim_is_wrong():
    """T=1000, N=3: DDIM steps 999 -> 666 -> 333 -> 0 (T // N = 333) but the grid is 999, 666, 332."""
    ours = ProgressiveDistillationScheduler(**LINEAR_1000, prediction_type="sample")
    ours.set_timesteps(3)
    assert ours.timesteps.tolist() == [999, 666, 332]
    assert ours.next_timesteps(ours.timesteps).tolist() == [666, 332, -1]
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    z = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    abar = alphas_cumprod_from_config(LINEAR_1000)
    prev = ours.step(x, 666, z).prev_sample  # with x-prediction the step lands on alpha_s x + sigma_s eps(z)
    eps = (z - abar[666].sqrt() * x) / (1 - abar[666]).sqrt()
    torch.testing.assert_close(prev, abar[332].sqrt() * x + (1 - abar[332]).sqrt() * eps, rtol=1e-12, atol=1e-12)
    # the last step lands on the clean sample exactly
    torch.testing.assert_close(ours.step(x, 332, z).prev_sample, x, rtol=0, atol=1e-15)


def test_add_noise_and_velocity_match_diffusers():
    ours = ProgressiveDistillationScheduler(**LINEAR_1000)
    stock = DDPMScheduler(**LINEAR_1000)
    x, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x, noise, t), stock.add_noise(x, noise, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x, noise, t), stock.get_velocity(x, noise, t), rtol=1e-4, atol=1e-5)
    assert ours.scale_model_input(x, 3) is x and ours.init_noise_sigma == 1.0 and ours.order == 1 and len(ours) == 1000


@pytest.mark.parametrize(
    "source",
    [
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large", prediction_type="epsilon"),
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True, timestep_spacing="leading", steps_offset=1),
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1),
        DPMSolverMultistepScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
        DDPMScheduler(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024), prediction_type="v_prediction"),
    ],
    ids=["ddpm", "ddim-sd", "pndm-sd", "dpm-cos", "ddpm-cosine1024"],
)
def test_from_teacher_config_and_disk_round_trip(source, tmp_path):
    ours = ProgressiveDistillationScheduler.from_config(source.config)
    torch.testing.assert_close(ours.alphas_cumprod, source.alphas_cumprod.double(), rtol=2e-4, atol=1e-7)
    assert ours.config.prediction_type == source.config.prediction_type
    assert ours.config.timestep_spacing == "trailing" and ours.config.clip_sample is False

    ours.save_pretrained(tmp_path)
    loaded = ProgressiveDistillationScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.alphas_cumprod, ours.alphas_cumprod)
    assert loaded.config.prediction_type == ours.config.prediction_type and loaded.config.timestep_spacing == "trailing"

    # a stock DDIMScheduler built from our config samples the same trailing, unclipped grid
    ddim = DDIMScheduler.from_config(loaded.config)
    assert ddim.config.timestep_spacing == "trailing" and ddim.config.clip_sample is False and ddim.config.set_alpha_to_one
    torch.testing.assert_close(ddim.alphas_cumprod.double(), ours.alphas_cumprod, rtol=2e-4, atol=1e-7)
    assert ddim.config.prediction_type == ours.config.prediction_type


def test_zero_terminal_snr_v_student_is_finite_at_the_first_step():
    scheduler = ProgressiveDistillationScheduler(**ZERO_SNR, prediction_type="v_prediction")
    scheduler.set_timesteps(4)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    target = scheduler.distillation_target(Float64Teacher(), z, scheduler.timesteps)
    assert torch.isfinite(target).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="use one of epsilon, sample, v_prediction"):
        ProgressiveDistillationScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="zero terminal SNR.*v_prediction"):
        ProgressiveDistillationScheduler(**ZERO_SNR, prediction_type="epsilon")
    scheduler = ProgressiveDistillationScheduler(**ZERO_SNR, prediction_type="v_prediction")
    scheduler.set_timesteps(2)
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="epsilon-prediction teacher cannot denoise at zero terminal SNR"):
        scheduler.distillation_target(Float64Teacher(), z, scheduler.timesteps, teacher_prediction_type="epsilon")
    small = ProgressiveDistillationScheduler(num_train_timesteps=10)
    small.set_timesteps(6)
    with pytest.raises(ValueError, match="12-step teacher grid.*at most 5 steps"):
        small.distillation_target(Float64Teacher(), z, small.timesteps[:2])
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match=r"Timesteps \[500\] are not on the 4-step grid"):
        scheduler.distillation_target(Float64Teacher(), z, torch.tensor([999, 500]))
    with pytest.raises(ValueError, match="not on the 4-step grid"):
        scheduler.step(z, 998, z)
    with pytest.raises(ValueError, match="trained_betas has 3 entries"):
        ProgressiveDistillationScheduler(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="Call `scheduler.set_timesteps"):
        ProgressiveDistillationScheduler().step(z, 999, z)
