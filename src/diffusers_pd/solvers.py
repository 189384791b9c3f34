"""Deterministic solvers of the probability-flow ODE, as small pure functions over a denoiser and a `Grid`.

The denoiser is any callable `denoiser(z, t, alpha=alpha, sigma=sigma, **cond) -> (x_hat, eps_hat)` (a
`Denoiser`, or an analytic function in the tests); the grid gives each point's (t, alpha, sigma) explicitly, so
nothing is derived from scheduler state. Every solver returns the WHOLE trajectory: a tensor of shape
(P, *z.shape) holding z at each of the grid's P points (point 0 is the input).

Notation (papers -> code):

| paper                                   | code                                          |
|-----------------------------------------|-----------------------------------------------|
| z_s, z_t (current, next point)          | `z`, return value                             |
| alpha, sigma (VP)                       | `alpha_s`, `sigma_s`, `alpha_t`, `sigma_t`    |
| lambda = log(alpha / sigma)             | `lambdas` (+inf at the clean sample)          |
| h = lambda_t - lambda_s                 | `h`                                           |
| D_0, D_1, D_2 (x-hat and its differences) | `x_hats` (oldest first), `d1`, `d2`         |
| EDM noise level s = sigma / alpha       | `grid.edm_sigmas`                             |

Solvers: DDIM (= DPM-Solver++(1) = Euler in EDM units), DPM-Solver++(2M) and (3M) (Lu et al. 2022b, data
prediction, with diffusers' `lower_order_final` rule) and Heun (Karras et al. 2022, Algorithm 1 deterministic).
"""

from typing import Callable, List, Tuple

import torch

from .parameterization import ddim_step, x_eps_analytic_first_step

DenoiserFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]

TEACHER_SOLVERS = ("dpm_solver_3m", "dpm_solver_2m", "heun", "ddim")


def euler_step(denoiser: DenoiserFn, z: torch.Tensor, grid, n: int, *, analytic: bool = False, **cond) -> torch.Tensor:
    """z_{n+1} = alpha_{n+1} x-hat + sigma_{n+1} eps-hat at point n (DDIM; with `analytic`, AFS eps-hat = z, no network call)."""
    t, alpha, sigma = grid.point(n)
    if analytic:
        x, eps = x_eps_analytic_first_step(z=z, alpha=alpha, sigma=sigma)
    else:
        x, eps = denoiser(z, t, alpha=alpha, sigma=sigma, **cond)
    return ddim_step(x=x, eps=eps, alpha_s=grid.alphas[n + 1], sigma_s=grid.sigmas[n + 1]).to(z.dtype)


def ddim_trajectory(denoiser: DenoiserFn, z: torch.Tensor, grid, *, afs: bool = False, **cond) -> torch.Tensor:
    """DDIM (eta = 0) through every grid point; with `afs` the first step is the analytic one (one NFE fewer)."""
    trajectory = [z]
    for n in range(grid.num_steps):
        z = euler_step(denoiser, z, grid, n, analytic=afs and n == 0, **cond)
        trajectory.append(z)
    return torch.stack(trajectory)


def dpm_solver_pp_first_order(*, z, x0, alpha_t, sigma_t, sigma_s, h):
    """z_t = (sigma_t / sigma_s) z - alpha_t (e^{-h} - 1) D_0 (DPM-Solver++(1), = DDIM)."""
    return (sigma_t / sigma_s) * z - (alpha_t * torch.expm1(-h)) * x0


def dpm_solver_pp_second_order(*, z, x0, x1, alpha_t, sigma_t, sigma_s, h, h_0):
    """z_t = first-order - alpha_t (e^{-h} - 1) D_1 / 2 with D_1 = (D_0 - D_{-1}) h / h_0 (DPM-Solver++(2M), midpoint)."""
    d1 = (x0 - x1) * (h / h_0)
    first = dpm_solver_pp_first_order(z=z, x0=x0, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s, h=h)
    return first - 0.5 * (alpha_t * torch.expm1(-h)) * d1


def dpm_solver_pp_third_order(*, z, x0, x1, x2, alpha_t, sigma_t, sigma_s, h, h_0, h_1):
    """z_t = first-order + alpha_t ((e^{-h} - 1) / h + 1) D_1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D_2 (DPM-Solver++(3M))."""
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (x0 - x1) / r0, (x1 - x2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi = torch.expm1(-h)
    first = dpm_solver_pp_first_order(z=z, x0=x0, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s, h=h)
    return first + (alpha_t * (phi / h + 1.0)) * d1 - (alpha_t * ((phi + h) / h**2 - 0.5)) * d2


def multistep_orders(num_steps: int, order: int, *, lower_order_final: bool = True, final_to_clean: bool = True) -> List[int]:
    """Order of each step as DPMSolverMultistepScheduler picks it: min(order, n + 1); 1 at a last step to sigma = 0 or,
    with `lower_order_final` and fewer than 15 steps, at the last step and at most 2 at the one before."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}.")
    few_steps = lower_order_final and num_steps < 15
    orders = []
    for n in range(num_steps):
        step_order = min(order, n + 1)
        if n == num_steps - 1 and (final_to_clean or few_steps):
            step_order = 1
        elif n == num_steps - 2 and few_steps:
            step_order = min(step_order, 2)
        orders.append(step_order)
    return orders


def dpm_solver_pp_trajectory(
    denoiser: DenoiserFn, z: torch.Tensor, grid, *, order: int = 3, lower_order_final: bool = True, **cond
) -> torch.Tensor:
    """DPM-Solver++(order M) multistep, data prediction, through every grid point (one network call per step)."""
    lambdas = grid.alphas.log() - grid.sigmas.log()
    orders = multistep_orders(grid.num_steps, order, lower_order_final=lower_order_final, final_to_clean=bool(grid.sigmas[-1] == 0))
    trajectory, x_hats = [z], []
    for n in range(grid.num_steps):
        t, alpha_s, sigma_s = grid.point(n)
        x, _ = denoiser(z, t, alpha=alpha_s, sigma=sigma_s, **cond)
        x_hats = (x_hats + [x])[-3:]
        step = dict(z=z, alpha_t=grid.alphas[n + 1], sigma_t=grid.sigmas[n + 1], sigma_s=sigma_s, h=lambdas[n + 1] - lambdas[n])
        if orders[n] == 1:
            z = dpm_solver_pp_first_order(x0=x, **step)
        elif orders[n] == 2:
            z = dpm_solver_pp_second_order(x0=x, x1=x_hats[-2], h_0=lambdas[n] - lambdas[n - 1], **step)
        else:
            z = dpm_solver_pp_third_order(
                x0=x, x1=x_hats[-2], x2=x_hats[-3], h_0=lambdas[n] - lambdas[n - 1], h_1=lambdas[n - 1] - lambdas[n - 2], **step
            )
        z = z.to(trajectory[0].dtype)
        trajectory.append(z)
    return torch.stack(trajectory)


def heun_trajectory(denoiser: DenoiserFn, z: torch.Tensor, grid, **cond) -> torch.Tensor:
    """EDM Heun in x = z / alpha, s = sigma / alpha: x' = x + (s_next - s) eps, x_next = x + (s_next - s)(eps + eps') / 2
    (Euler on the last step to s = 0); two network calls per step. Needs alpha > 0 at every evaluated point."""
    edm_sigmas = grid.edm_sigmas
    trajectory = [z]
    for n in range(grid.num_steps):
        t, alpha, sigma = grid.point(n)
        alpha_next, ds = grid.alphas[n + 1], edm_sigmas[n + 1] - edm_sigmas[n]
        _, eps = denoiser(z, t, alpha=alpha, sigma=sigma, **cond)
        x = z / alpha
        x_next = x + ds * eps
        if grid.sigmas[n + 1] > 0:
            _, eps_next = denoiser(alpha_next * x_next, grid.timesteps[n + 1], alpha=alpha_next, sigma=grid.sigmas[n + 1], **cond)
            x_next = x + ds * 0.5 * (eps + eps_next)
        z = (alpha_next * x_next).to(trajectory[0].dtype)
        trajectory.append(z)
    return torch.stack(trajectory)


def solve(solver: str, denoiser: DenoiserFn, z: torch.Tensor, grid, *, afs: bool = False, **cond) -> torch.Tensor:
    """The trajectory of `solver` (one of TEACHER_SOLVERS); `afs` (analytic first step) only with "ddim"."""
    check_solver(solver, afs)
    if solver == "ddim":
        return ddim_trajectory(denoiser, z, grid, afs=afs, **cond)
    if solver == "heun":
        return heun_trajectory(denoiser, z, grid, **cond)
    return dpm_solver_pp_trajectory(denoiser, z, grid, order=int(solver[-2]), **cond)


def check_solver(solver: str, afs: bool = False) -> str:
    """Return `solver`, or raise a one-line error for an unknown one or AFS with a solver other than DDIM."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}: use one of {', '.join(TEACHER_SOLVERS)}.")
    if afs and solver != "ddim":
        raise ValueError(f"The analytic first step is a DDIM (Euler) step: use solver 'ddim' with afs, not {solver!r}.")
    return solver


def solver_nfe(solver: str, grid, *, afs: bool = False) -> int:
    """Network calls of `solver` on `grid`: N for DDIM / DPM-Solver++ (N - 1 with AFS), 2N (- 1 if it ends at sigma = 0) for Heun."""
    check_solver(solver, afs)
    if solver == "heun":
        return 2 * grid.num_steps - int(grid.sigmas[-1] == 0)
    return grid.num_steps - int(afs)
