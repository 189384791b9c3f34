"""SFD: Simple and Fast Distillation (Zhou, Chen, Wang, Chen & Lyu, NeurIPS 2024), as a loss object.

Per batch of pure noise z_0 = x_N ~ N(0, I), on a student grid of N steps and a teacher grid that contains it:

1. the teacher's trajectory, no grad, with a multistep solver on the fine grid, read at the student points;
2. the student takes one Euler step per interval (for a VP model exactly a DDIM step z_{n+1} = alpha_{n+1} x-hat
   + sigma_{n+1} eps-hat), optionally the first one analytic (AFS: eps-hat = z, no network call, no update);
3. after each step n the loss d(z_{n+1}^student, z_{n+1}^teacher) (unreduced, per sample) drives ONE optimizer
   update; the student continues from its own output, detached.

The training loop (randomness drawn outside: the noise is a pure function of (seed, update)):

    method = SFDLoss(student_grid, teacher_grid(student_grid, K, config), teacher_solver="dpm_solver_3m", afs=True)
    targets = method.teacher_targets(teacher, noise)          # (N + 1, B, C, H, W), no grad
    z = method.first_state(noise)                             # the analytic first step if afs
    for n in method.trained_steps:
        loss, z = method(student, z, n, targets)              # per-sample loss, z detached
        accelerator.backward(loss.mean()); optimizer.step(); optimizer.zero_grad()

The distance is taken between EDM states z / alpha (space="edm", as the official code, whose sampler state is
x + s n) or between the VP states z (space="vp"). Losses are summed over pixels: L1 (official default), squared
L2, or pseudo-Huber sqrt(||d||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023).

The second stage (1 NFE) is the same object with the stage-one student as the teacher and its own sampler (DDIM,
with its AFS) as the teacher solver on its own grid: `SFDLoss.second_stage`.
"""

import math
from typing import Mapping, Optional, Tuple

import torch

from .grids import Grid, nested_indices
from .solvers import DenoiserFn, check_solver, ddim_trajectory, euler_step, solve

LOSSES = ("l1", "l2", "pseudo_huber")
LOSS_SPACES = ("edm", "vp")


def trajectory_distance(*, student: torch.Tensor, teacher: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    """Per-sample d: l1 sum |a - b|, l2 sum (a - b)^2, pseudo_huber sqrt(sum (a - b)^2 + c^2) - c, c = 0.00054 sqrt(dim)."""
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}: use one of {', '.join(LOSSES)}.")
    diff = (student.float() - teacher.float()).flatten(1)
    if loss == "l1":
        return diff.abs().sum(dim=1)
    if loss == "l2":
        return diff.pow(2).sum(dim=1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.pow(2).sum(dim=1) + c**2).sqrt() - c


def final_sample(z: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The image at the grid's last point: z there if it is the clean sample, else the EDM state z / alpha (no denoising)."""
    return z if grid.sigmas[-1] == 0 else z / grid.alphas[-1]


@torch.no_grad()
def sfd_sample(student: DenoiserFn, grid: Grid, noise: torch.Tensor, *, afs: bool = False, **cond) -> torch.Tensor:
    """The student's sample: one Euler (DDIM) step per grid interval from `noise` (the first one analytic with `afs`)."""
    return final_sample(ddim_trajectory(student, noise, grid, afs=afs, **cond)[-1], grid)


class SFDLoss:
    """Per-step SFD loss (EDM loss pattern: hyperparameters here, `__call__` returns the unreduced per-sample loss).

    Args:
        student_grid: the student's N-step grid (`grids.student_grid`).
        teacher_grid: a grid containing every student point (`grids.teacher_grid(student_grid, K, config)`).
        teacher_solver: one of `solvers.TEACHER_SOLVERS` (official default DPM-Solver++(3M)).
        afs: analytic first step for the student (its NFE is then N - 1).
        loss: "l1" (official), "l2" or "pseudo_huber"; space: "edm" (official, z / alpha) or "vp" (z).
        teacher_afs: the teacher's own first step is analytic (second stage, teacher = an AFS student).
    """

    def __init__(
        self,
        student_grid: Grid,
        teacher_grid: Grid,
        *,
        teacher_solver: str = "dpm_solver_3m",
        afs: bool = True,
        loss: str = "l1",
        space: str = "edm",
        teacher_afs: bool = False,
    ):
        check_solver(teacher_solver, teacher_afs)
        trajectory_distance(student=torch.zeros(1, 1), teacher=torch.zeros(1, 1), loss=loss)  # validate early
        if space not in LOSS_SPACES:
            raise ValueError(f"Unknown loss space {space!r}: use one of {', '.join(LOSS_SPACES)}.")
        if afs and student_grid.num_steps < 2:
            raise ValueError("AFS replaces the first step with an analytic one: a 1-step student needs afs=False.")
        self.student_grid, self.teacher_grid = student_grid, teacher_grid
        self.indices = nested_indices(student_grid, teacher_grid)
        self.teacher_solver, self.teacher_afs = teacher_solver, teacher_afs
        self.afs, self.loss, self.space = afs, loss, space

    @classmethod
    def second_stage(cls, student_grid: Grid, stage_one_grid: Grid, *, stage_one_afs: bool, loss: str = "l1", space: str = "edm"):
        """Stage two: the target is the stage-one student's own DDIM/AFS sample on its grid, from the same noise."""
        return cls(student_grid, stage_one_grid, teacher_solver="ddim", teacher_afs=stage_one_afs, afs=False, loss=loss, space=space)

    @property
    def trained_steps(self) -> range:
        """The student steps that call the network and get an optimizer update (all but an analytic first step)."""
        return range(int(self.afs), self.student_grid.num_steps)

    @torch.no_grad()
    def teacher_targets(self, teacher: DenoiserFn, noise: torch.Tensor, **cond) -> torch.Tensor:
        """z of the teacher's trajectory from `noise` at every student point: shape (N + 1, *noise.shape)."""
        trajectory = solve(self.teacher_solver, teacher, noise, self.teacher_grid, afs=self.teacher_afs, **cond)
        return trajectory[self.indices.to(trajectory.device)]

    @torch.no_grad()
    def first_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The student's state at its first trained step: `noise`, or after the analytic first step with AFS."""
        return euler_step(None, noise, self.student_grid, 0, analytic=True) if self.afs else noise

    def distance(self, z_student: torch.Tensor, z_teacher: torch.Tensor, n: int) -> torch.Tensor:
        """Per-sample d(student, teacher) at student point n, in the loss space (EDM: both divided by alpha_n)."""
        scale = 1.0 / self.student_grid.alphas[n].item() if self.space == "edm" else 1.0
        return trajectory_distance(student=z_student * scale, teacher=z_teacher * scale, loss=self.loss)

    def __call__(
        self, student: DenoiserFn, z: torch.Tensor, n: int, targets: torch.Tensor, **cond
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss of the student's Euler step n -> n + 1 against targets[n + 1], the student's z_{n+1} detached)."""
        if n not in self.trained_steps:
            raise ValueError(f"Step {n} is not trained: use n in method.trained_steps ({list(self.trained_steps)}).")
        z_next = euler_step(student, z, self.student_grid, n, **cond)
        return self.distance(z_next, targets[n + 1], n + 1), z_next.detach()


def check_nfe(nfe: int, *, afs: bool, num_train_timesteps: int, second_stage: bool = False) -> int:
    """The student's step count N = NFE + AFS, or a one-line error for an NFE that cannot be trained."""
    if nfe < 1:
        raise ValueError(f"NFE must be a positive integer, got {nfe}.")
    if afs and nfe == 1 and not second_stage:
        raise ValueError("AFS with NFE 1 leaves no network call to train: use --no-afs, or --second_stage for 1 NFE.")
    num_steps = nfe + int(afs)
    if num_steps > num_train_timesteps:
        raise ValueError(f"NFE {nfe} needs {num_steps} steps, more than the teacher's {num_train_timesteps} timesteps.")
    return num_steps


def student_nfe(grid: Grid, afs: bool) -> int:
    """Network calls of a student sampling `grid` with one Euler step per interval: N - AFS."""
    return grid.num_steps - int(afs)


def step_count_cond(nfe: int, batch_size: int, device=None, conditioned: bool = True) -> Mapping[str, Optional[torch.Tensor]]:
    """The SFD-v student's extra inputs: {"class_labels": NFE for every sample} (empty for an unconditioned student)."""
    if not conditioned:
        return {}
    return {"class_labels": torch.full((batch_size,), int(nfe), dtype=torch.long, device=device)}
