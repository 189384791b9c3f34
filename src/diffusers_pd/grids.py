"""Sampling grids as explicit (model timestep, alpha, sigma) points, for students and for teacher solvers.

A `Grid` lists its points in SAMPLING order: point 0 is the noisiest (where the noise x_N enters), point P - 1
the last. A grid of N steps has N + 1 points. Timestep -1 with (alpha, sigma) = (1, 0) is the clean sample (a
final denoising step lands there); timesteps may be fractional (the `Denoiser` interpolates the schedule).

Student grids (`student_grid`):

* "trailing", "karras", "lu": the grids that a STOCK diffusers scheduler builds from the teacher's config alone
  (`export.stock_scheduler_for`, the same function the student's export uses). Their points are read off that
  scheduler object, so a student trained on them samples exactly in plain diffusers (`stock_exact=True`).
* "sfd": the paper's grid (Zhou et al. 2024, official code): EDM noise levels polynomial with rho = 7 from
  sigma_max = 80 to sigma_min = 0.006, clipped to the teacher's table, mapped to fractional timesteps, and no
  final denoising step (`stock_exact=False`; sample with `sfd.sfd_sample`).

Teacher grids (`teacher_grid`): K sub-steps per student step, containing every student point exactly; the K - 1
points inside a student interval are polynomial in the EDM noise level s = sigma / alpha (linear in s^(1/rho),
rho = 7, as the official code's fine polynomial grid) or uniform in log s (= uniform in log-SNR), at fractional
timesteps. Inside a final interval to the clean sample they approach the table's smallest noise level instead
of 0, so that the teacher is only ever evaluated at noise levels it was trained on.
"""

import math
from dataclasses import dataclass, replace
from typing import Mapping, Tuple

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from .export import stock_scheduler_for
from .schedules import (
    alpha_sigma_from_edm_sigma,
    alphas_cumprod_from_config,
    edm_sigmas_from_alphas_cumprod,
    timestep_at,
)

GRID_KINDS = ("trailing", "karras", "lu", "sfd")
FINE_SPACINGS = ("polynomial", "log_sigma")


@dataclass(frozen=True)
class Grid:
    """Points (t_n, alpha_n, sigma_n), n = 0 .. P - 1, in sampling order; float64 1-D tensors.

    Args:
        timesteps: the network's timestep at each point (-1: the clean sample, never evaluated).
        alphas, sigmas: the VP pair a step uses at each point (alpha^2 + sigma^2 = 1).
        kind: which construction made it (`GRID_KINDS`, or "teacher").
        stock_exact: whether a stock diffusers scheduler samples exactly this grid.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor
    kind: str = "custom"
    stock_exact: bool = False

    @property
    def num_steps(self) -> int:
        """Number of steps N (= points - 1)."""
        return len(self.timesteps) - 1

    @property
    def edm_sigmas(self) -> torch.Tensor:
        """s_n = sigma_n / alpha_n, the EDM noise level of each point."""
        return self.sigmas / self.alphas

    def point(self, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_n, alpha_n, sigma_n) as 0-d float64 tensors."""
        return self.timesteps[n], self.alphas[n], self.sigmas[n]

    def subgrid(self, indices) -> "Grid":
        """The grid of the points at `indices` (in order)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, timesteps=self.timesteps[indices], alphas=self.alphas[indices], sigmas=self.sigmas[indices])


def grid_from_stock_scheduler(scheduler, num_steps: int, kind: str = "custom", stock_exact: bool = True) -> Grid:
    """The exact (t, alpha, sigma) points that a stock DDIMScheduler / DPMSolverMultistepScheduler steps through."""
    scheduler.set_timesteps(num_steps)
    timesteps = torch.cat([scheduler.timesteps.to(torch.float64), torch.tensor([-1.0], dtype=torch.float64)])
    if isinstance(scheduler, DDIMScheduler):
        abar = scheduler.alphas_cumprod.to(torch.float64)[scheduler.timesteps.long()]
        abar = torch.cat([abar, scheduler.final_alpha_cumprod.to(torch.float64).reshape(1)])
        alphas, sigmas = abar.sqrt(), (1.0 - abar).sqrt()
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        alphas, sigmas = alpha_sigma_from_edm_sigma(scheduler.sigmas.to(torch.float64))
    else:
        raise TypeError(f"Cannot read a grid off {type(scheduler).__name__}: use DDIMScheduler or DPMSolverMultistepScheduler.")
    if sigmas[-1] != 0:
        raise ValueError(f"{type(scheduler).__name__} does not end on the clean sample: use final_sigmas_type='zero'.")
    return Grid(timesteps=timesteps, alphas=alphas, sigmas=sigmas, kind=kind, stock_exact=stock_exact)


def polynomial_edm_sigmas(*, sigma_max: float, sigma_min: float, num_points: int, rho: float = 7.0) -> torch.Tensor:
    """s_i = (s_max^(1/rho) + i / (P - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0 .. P - 1 (EDM Eq. 5)."""
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def grid_from_edm_sigmas(edm_sigmas, edm_sigma_table, kind: str = "custom") -> Grid:
    """Points at noise levels s_n: t_n = t(s_n) (log-s interpolation on the table, -1 where s_n = 0), exact (alpha, sigma) of s_n."""
    edm_sigmas = torch.as_tensor(edm_sigmas, dtype=torch.float64)
    timesteps = torch.where(edm_sigmas == 0, torch.tensor(-1.0, dtype=torch.float64), timestep_at(edm_sigma_table, edm_sigmas))
    alphas, sigmas = alpha_sigma_from_edm_sigma(edm_sigmas)
    return Grid(timesteps=timesteps, alphas=alphas, sigmas=sigmas, kind=kind, stock_exact=False)


def sfd_grid(config: Mapping, num_steps: int, *, sigma_max: float = 80.0, sigma_min: float = 0.006, rho: float = 7.0) -> Grid:
    """The paper's N-step grid: s polynomial (rho) from min(sigma_max, s_T) to max(sigma_min, s_1), no final denoising step."""
    table = edm_sigmas_from_alphas_cumprod(alphas_cumprod_from_config(config))
    finite = table[torch.isfinite(table)]
    high, low = min(sigma_max, finite.max().item()), max(sigma_min, finite.min().item())
    if not 0 < low < high:
        raise ValueError(f"Cannot map sigma range [{sigma_min}, {sigma_max}] onto this schedule (noise levels {low:.3g}..{high:.3g}).")
    edm_sigmas = polynomial_edm_sigmas(sigma_max=high, sigma_min=low, num_points=num_steps + 1, rho=rho)
    return grid_from_edm_sigmas(edm_sigmas, table, kind="sfd")


def student_grid(config: Mapping, num_steps: int, kind: str = "trailing", **sfd_kwargs) -> Grid:
    """The N-step student grid of `kind` for the schedule in `config` (stock kinds read off the export's stock scheduler)."""
    if kind not in GRID_KINDS:
        raise ValueError(f"Unknown grid {kind!r}: use one of {', '.join(GRID_KINDS)}.")
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={num_train_timesteps}.")
    if kind == "sfd":
        return sfd_grid(config, num_steps, **sfd_kwargs)
    scheduler, exact = stock_scheduler_for(config, num_steps, kind)
    return grid_from_stock_scheduler(scheduler, num_steps, kind=kind, stock_exact=exact)


def interval_edm_sigmas(*, sigma_start: float, sigma_end: float, num_substeps: int, spacing: str, rho: float = 7.0) -> torch.Tensor:
    """The K - 1 inner noise levels of [s_a, s_b]: linear in s^(1/rho) ("polynomial") or in log s ("log_sigma")."""
    ramp = torch.arange(1, num_substeps, dtype=torch.float64) / num_substeps
    if spacing == "polynomial":
        return (sigma_start ** (1 / rho) + ramp * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
    return torch.exp(math.log(sigma_start) + ramp * (math.log(sigma_end) - math.log(sigma_start)))


def teacher_grid(
    grid: Grid, steps_per_step: int, config: Mapping, *, spacing: str = "polynomial", rho: float = 7.0
) -> Grid:
    """The teacher's fine grid: K = `steps_per_step` sub-steps per student step; point k K is student point k."""
    if steps_per_step < 1:
        raise ValueError(f"steps_per_step (K) must be >= 1, got {steps_per_step}.")
    if spacing not in FINE_SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}: use one of {', '.join(FINE_SPACINGS)}.")
    table = edm_sigmas_from_alphas_cumprod(alphas_cumprod_from_config(config))
    finite = table[torch.isfinite(table)]
    low, high = finite.min().item(), finite.max().item()
    parts = []
    for n in range(grid.num_steps):
        parts.append(grid.subgrid([n]))
        # inner points between the student's noise levels, clipped to the table's finite range
        start, end = (grid.edm_sigmas[n].clamp(low, high).item(), grid.edm_sigmas[n + 1].clamp(low, high).item())
        inner = interval_edm_sigmas(sigma_start=start, sigma_end=end, num_substeps=steps_per_step, spacing=spacing, rho=rho)
        parts.append(grid_from_edm_sigmas(inner, table))
    parts.append(grid.subgrid([grid.num_steps]))
    return Grid(
        timesteps=torch.cat([part.timesteps for part in parts]),
        alphas=torch.cat([part.alphas for part in parts]),
        sigmas=torch.cat([part.sigmas for part in parts]),
        kind="teacher",
        stock_exact=False,
    )


def nested_indices(student: Grid, teacher: Grid) -> torch.Tensor:
    """Index in `teacher` of every student point (same t; alpha, sigma equal to 1e-6 relative); one clear error if a point is missing.

    alpha / sigma are compared up to rounding: a stock scheduler gives the same timestep last-bit different values at
    different step counts (the stage-one grid vs the second stage's 1-step grid).
    """
    indices = []
    for n in range(len(student.timesteps)):
        match = ((teacher.timesteps == student.timesteps[n])
                 & torch.isclose(teacher.sigmas, student.sigmas[n], rtol=1e-6, atol=0.0)
                 & torch.isclose(teacher.alphas, student.alphas[n], rtol=1e-6, atol=0.0))
        if not match.any():
            raise ValueError(
                f"Student point {n} (t={student.timesteps[n].item():.4g}, sigma={student.sigmas[n].item():.4g}) is not on the "
                "teacher grid: build the teacher grid with teacher_grid(student_grid, K, config)."
            )
        indices.append(int(match.nonzero()[0]))
    indices = torch.tensor(indices)
    if (indices.diff() <= 0).any():
        raise ValueError("The student points are not in the teacher grid's order: both must run from noise to clean.")
    return indices
