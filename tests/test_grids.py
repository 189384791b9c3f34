"""Student and teacher grids: stock grids as the stock schedulers build them, the paper's grid, nesting."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from diffusers_pd import cosine_trained_betas
from diffusers_pd.export import stock_scheduler_for
from diffusers_pd.grids import nested_indices, student_grid, teacher_grid
from diffusers_pd.schedules import (
    alpha_sigma_at,
    alphas_cumprod_from_config,
    edm_sigma_at,
    edm_sigmas_from_alphas_cumprod,
    trailing_timesteps,
)

SCHEDULES = {
    "linear": dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"),
    "cosine_1024": dict(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024), prediction_type="v_prediction"),
    "scaled_linear_999": dict(num_train_timesteps=999, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon"),
}


def table(config):
    return edm_sigmas_from_alphas_cumprod(alphas_cumprod_from_config(config))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5])
def test_trailing_grid_is_the_pd_students_ddim_grid(schedule, num_steps):
    config = SCHEDULES[schedule]
    grid = student_grid(config, num_steps, "trailing")
    T = config["num_train_timesteps"]
    assert grid.stock_exact and grid.num_steps == num_steps
    assert grid.timesteps[:-1].long().tolist() == trailing_timesteps(T, num_steps).tolist() and grid.timesteps[-1] == -1
    alpha, sigma = alpha_sigma_at(alphas_cumprod_from_config(config), grid.timesteps.long())
    torch.testing.assert_close(grid.alphas, alpha, atol=1e-6, rtol=0)  # the stock scheduler's float32 table
    torch.testing.assert_close(grid.sigmas, sigma, atol=1e-6, rtol=0)
    scheduler, _ = stock_scheduler_for(config, num_steps, "trailing")
    assert isinstance(scheduler, DDIMScheduler if T % num_steps == 0 else DPMSolverMultistepScheduler)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear_999"])  # cosine_1024's abar near 1 is coarse in float32
@pytest.mark.parametrize("num_steps", [1, 2, 3, 5])
def test_karras_grid_is_polynomial_in_sigma_with_rounded_timesteps(schedule, num_steps):
    config = SCHEDULES[schedule]
    grid = student_grid(config, num_steps, "karras")
    sigmas = table(config).numpy()
    rho, ramp = 7.0, np.linspace(0, 1, num_steps)
    expected = (sigmas[-1] ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - sigmas[-1] ** (1 / rho))) ** rho
    np.testing.assert_allclose(grid.edm_sigmas[:-1].numpy(), expected, rtol=2e-4)  # the stock table is float32 (1 - abar near 0)
    assert grid.sigmas[-1] == 0 and grid.timesteps[-1] == -1 and grid.stock_exact
    assert torch.equal(grid.timesteps, grid.timesteps.round())
    # the model timestep is the rounded fractional one, while the step uses the exact sigma
    fractional = np.interp(np.log(expected), np.log(sigmas), np.arange(len(sigmas)))
    np.testing.assert_array_equal(grid.timesteps[:-1].numpy(), np.round(fractional))


@pytest.mark.parametrize("num_steps", [2, 4])
def test_lu_grid_is_uniform_in_log_snr(num_steps):
    config = SCHEDULES["linear"]
    grid = student_grid(config, num_steps, "lu")
    log_sigmas = np.log(grid.edm_sigmas[:-1].numpy())
    sigmas = table(config).numpy()
    np.testing.assert_allclose(log_sigmas, np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), num_steps), atol=2e-4)
    assert grid.sigmas[-1] == 0 and grid.stock_exact


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_sfd_grid_is_the_papers_polynomial_grid_mapped_onto_the_schedule(schedule):
    config = SCHEDULES[schedule]
    grid = student_grid(config, 4, "sfd")
    sigmas = table(config)
    high, low = min(80.0, sigmas.max().item()), max(0.006, sigmas.min().item())
    edm = grid.edm_sigmas
    torch.testing.assert_close(edm[[0, -1]], torch.tensor([high, low], dtype=torch.float64), rtol=1e-12, atol=0)
    roots = edm ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(4), rtol=1e-10, atol=0)  # linear in s^(1/7)
    assert not grid.stock_exact and grid.sigmas[-1] > 0  # no final denoising step
    torch.testing.assert_close(edm_sigma_at(sigmas, grid.timesteps), edm, rtol=1e-10, atol=0)  # t <-> s consistent
    assert (grid.timesteps != grid.timesteps.round()).any()
    if schedule == "cosine_1024":  # the table covers [0.006, 80]: the paper's grid itself
        assert high == 80.0 and low == 0.006


@pytest.mark.parametrize("kind", ["trailing", "karras", "lu", "sfd"])
@pytest.mark.parametrize("steps_per_step", [1, 2, 4])
def test_teacher_grid_contains_every_student_point(kind, steps_per_step):
    config = SCHEDULES["linear"]
    student = student_grid(config, 3, kind)
    fine = teacher_grid(student, steps_per_step, config)
    assert fine.num_steps == 3 * steps_per_step
    assert nested_indices(student, fine).tolist() == [k * steps_per_step for k in range(4)]
    assert (fine.edm_sigmas.diff() < 0).all()  # strictly from noise to clean
    inner = torch.ones(len(fine.timesteps), dtype=torch.bool)
    inner[:: steps_per_step] = False
    sigmas = table(config)
    assert (fine.timesteps[inner] >= 0).all() and (fine.edm_sigmas[inner] >= sigmas.min()).all()
    torch.testing.assert_close(edm_sigma_at(sigmas, fine.timesteps[inner]), fine.edm_sigmas[inner], rtol=1e-10, atol=0)


def test_teacher_grid_inner_points_are_polynomial_or_log_uniform_between_student_points():
    config = SCHEDULES["linear"]
    student = student_grid(config, 2, "karras")
    s_a, s_b = student.edm_sigmas[0], student.edm_sigmas[1]
    fine = teacher_grid(student, 4, config)
    ramp = torch.arange(1, 4, dtype=torch.float64) / 4
    torch.testing.assert_close(fine.edm_sigmas[1:4], (s_a ** (1 / 7) + ramp * (s_b ** (1 / 7) - s_a ** (1 / 7))) ** 7)
    fine_log = teacher_grid(student, 4, config, spacing="log_sigma")
    torch.testing.assert_close(fine_log.edm_sigmas[1:4].log(), s_a.log() + ramp * (s_b.log() - s_a.log()))
    # inside the final interval to the clean sample the points approach the table's smallest noise level
    s_min = table(config).min()
    torch.testing.assert_close(fine.edm_sigmas[5:8], (s_b ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_b ** (1 / 7))) ** 7)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("stage_one_steps", [2, 3, 4, 5, 6])
def test_second_stage_one_step_grid_is_nested_in_the_stage_one_grid(schedule, stage_one_steps):
    # The stock scheduler gives the first point's alpha / sigma a last-bit difference that depends on the step count
    # (seen on the cosine T = 1024 schedule at 3, 5 and 6 steps): the same point must still be found.
    for kind in ("trailing", "karras", "lu", "sfd"):
        stage_one = student_grid(SCHEDULES[schedule], stage_one_steps, kind)
        one = student_grid(SCHEDULES[schedule], 1, kind)
        assert nested_indices(one, stage_one).tolist() == [0, stage_one_steps]


def test_bad_input():
    config = SCHEDULES["linear"]
    with pytest.raises(ValueError, match="Unknown grid"):
        student_grid(config, 2, "uniform")
    with pytest.raises(ValueError, match="between 1 and"):
        student_grid(config, 0, "karras")
    with pytest.raises(ValueError, match=">= 1"):
        teacher_grid(student_grid(config, 2), 0, config)
    with pytest.raises(ValueError, match="not on the teacher grid"):
        nested_indices(student_grid(config, 3, "karras"), student_grid(config, 6, "karras"))
    assert stock_scheduler_for(config, 4, "sfd")[1] is False
