"""Teacher ODE solvers against diffusers' own schedulers, on the schedulers' own grids.

The model is analytic (x-hat = 0.9 tanh(z) + t / 2000, a "sample" prediction that depends on z and t), our
solvers run in float64 on the (t, alpha, sigma) points read off the stock scheduler, and diffusers steps its own
way (float32 inside). Trajectories must agree to 1e-5 at every point.
"""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

from diffusers_pd.grids import Grid, grid_from_stock_scheduler
from diffusers_pd.parameterization import eps_from_x
from diffusers_pd.schedules import alpha_sigma_from_edm_sigma
from diffusers_pd.solvers import (
    ddim_trajectory,
    dpm_solver_pp_trajectory,
    heun_trajectory,
    multistep_orders,
    solve,
    solver_nfe,
)

SCHEDULES = {
    "linear": dict(num_train_timesteps=1000, beta_schedule="linear"),
    "scaled_linear_T999": dict(num_train_timesteps=999, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
GRID_KEYS = {
    "trailing": dict(timestep_spacing="trailing"),
    "karras": dict(use_karras_sigmas=True),
    "lu": dict(use_lu_lambdas=True),
}


def analytic_x(z, t):
    """A data prediction that depends on z and t."""
    return 0.9 * torch.tanh(z) + torch.as_tensor(t, dtype=z.dtype) / 2000


def analytic_denoiser(z, t, *, alpha, sigma, calls=None):
    """(x-hat, eps-hat) of the analytic model at (z, t) with the caller's (alpha, sigma)."""
    if calls is not None:
        calls.append(float(t))
    x = analytic_x(z, t)
    return x, eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma)


def stock_dpm_trajectory(scheduler, noise, num_steps):
    """z at every point of the stock scheduler's own loop, the analytic model called on its integer timesteps."""
    scheduler.set_timesteps(num_steps)
    sample, trajectory = noise.float(), [noise.float()]
    for t in scheduler.timesteps:
        sample = scheduler.step(analytic_x(sample, t.float()), t, sample).prev_sample
        trajectory.append(sample)
    return torch.stack(trajectory).double()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("grid_kind", sorted(GRID_KEYS))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("num_steps", [4, 7, 16])
def test_dpm_solver_pp_matches_diffusers(schedule, grid_kind, order, num_steps):
    config = dict(SCHEDULES[schedule], prediction_type="sample", algorithm_type="dpmsolver++", solver_order=order,
                  final_sigmas_type="zero", lower_order_final=True, **GRID_KEYS[grid_kind])
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(order + num_steps), dtype=torch.float64)
    reference = stock_dpm_trajectory(DPMSolverMultistepScheduler(**config), noise, num_steps)
    grid = grid_from_stock_scheduler(DPMSolverMultistepScheduler(**config), num_steps)
    ours = dpm_solver_pp_trajectory(analytic_denoiser, noise, grid, order=order)
    assert ours.shape == reference.shape == (num_steps + 1, *noise.shape)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    if order == 1:  # DDIM is DPM-Solver++(1)
        torch.testing.assert_close(ddim_trajectory(analytic_denoiser, noise, grid), ours, atol=1e-12, rtol=0)


def test_orders_differ_so_the_comparison_can_fail():
    """On a 7-step grid, 1M, 2M and 3M give clearly different end points (the tolerance above is meaningful)."""
    config = dict(prediction_type="sample", final_sigmas_type="zero", use_karras_sigmas=True)
    grid = grid_from_stock_scheduler(DPMSolverMultistepScheduler(**config), 7)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = [dpm_solver_pp_trajectory(analytic_denoiser, noise, grid, order=k)[-1] for k in (1, 2, 3)]
    assert (ends[0] - ends[1]).abs().max() > 1e-3 and (ends[1] - ends[2]).abs().max() > 1e-4


def test_multistep_orders_follow_diffusers_lower_order_final():
    assert multistep_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert multistep_orders(16, 3)[-3:] == [3, 3, 1]  # >= 15 steps: only the final step to sigma = 0 drops
    assert multistep_orders(16, 3, final_to_clean=False)[-1] == 3
    assert multistep_orders(3, 2, lower_order_final=False) == [1, 2, 1]


@pytest.mark.parametrize("num_steps", [3, 6])
def test_heun_matches_diffusers_heun_discrete(num_steps):
    """Our Heun on (fractional t, exact Karras sigma) points equals HeunDiscreteScheduler (EDM Algorithm 1)."""
    scheduler = HeunDiscreteScheduler(num_train_timesteps=1000, prediction_type="sample", use_karras_sigmas=True)
    scheduler.set_timesteps(num_steps)
    edm_sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]]).double()
    timesteps = torch.cat([scheduler.timesteps[:1], scheduler.timesteps[1::2], torch.tensor([-1.0])]).double()
    assert (timesteps != timesteps.round()).any()  # fractional timesteps reach the model
    alphas, sigmas = alpha_sigma_from_edm_sigma(edm_sigmas)
    grid = Grid(timesteps=timesteps, alphas=alphas, sigmas=sigmas)
    scheduler.sigmas = scheduler.sigmas.double()  # the same points; all of diffusers' Heun arithmetic in float64

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sample, reference = noise / alphas[0], [noise / alphas[0]]
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(analytic_x(model_input, t), t, sample).prev_sample
        if scheduler.state_in_first_order or i == len(scheduler.timesteps) - 1:  # a full step is complete
            reference.append(sample)
    reference = torch.stack(reference)

    calls = []
    ours = heun_trajectory(analytic_denoiser, noise, grid, calls=calls)
    torch.testing.assert_close(ours, reference * alphas.reshape(-1, 1, 1, 1, 1), atol=1e-10, rtol=0)  # in VP units
    assert len(calls) == solver_nfe("heun", grid) == len(scheduler.timesteps) == 2 * num_steps - 1


def test_afs_trajectory_skips_the_first_network_call_and_solve_dispatches():
    grid = grid_from_stock_scheduler(DPMSolverMultistepScheduler(prediction_type="sample", use_karras_sigmas=True), 4)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls = []
    with_afs = solve("ddim", analytic_denoiser, noise, grid, afs=True, calls=calls)
    assert len(calls) == solver_nfe("ddim", grid, afs=True) == 3 and calls[0] == grid.timesteps[1].item()
    torch.testing.assert_close(with_afs[-1], ddim_trajectory(analytic_denoiser, noise, grid, afs=True)[-1])
    assert (with_afs[1] - ddim_trajectory(analytic_denoiser, noise, grid)[1]).abs().max() > 1e-3
    torch.testing.assert_close(solve("dpm_solver_2m", analytic_denoiser, noise, grid), dpm_solver_pp_trajectory(analytic_denoiser, noise, grid, order=2))
    with pytest.raises(ValueError, match="Unknown solver"):
        solve("dpm_solver_4m", analytic_denoiser, noise, grid)
    with pytest.raises(ValueError, match="analytic first step"):
        solve("heun", analytic_denoiser, noise, grid, afs=True)
