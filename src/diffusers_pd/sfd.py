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

Conditional teachers (a Stable Diffusion pipeline, a class-conditional UNet2DModel; `conditioning.py`): each trajectory
gets a condition drawn from the data's captions or labels, and the teacher's trajectory and the student's steps are
both conditioned on it at guidance scale s = 1 (the plain conditional prediction, no unconditional pass in training),
as the paper distils Stable Diffusion; classifier-free guidance is applied at sampling, at any s, two predictions per
step as one batched forward (`sfd_student_samples(..., guidance_scale=s, uncond=...)`). A clipped teacher
(`--teacher_clip_sample`) has its conditional x-hat clamped in its solver as an unconditional one's (`ClippedTeacher`
passes the condition through; at s = 1 that is the guided x-hat diffusers would clamp).
"""

import copy
import math
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .clipping import EPSILON_MIN_ALPHA, clip_card_row, teacher_clip_range
from .denoiser import Denoiser, GuidedDenoiser
from .grids import Grid, nested_indices, student_grid, teacher_grid
from .method import Batch, DistillationMethod, FinishedStudent, LoopContext, Stage
from .pipeline import ddim_samples, evaluating
from .scheduler import ProgressiveDistillationScheduler
from .solvers import DenoiserFn, check_solver, ddim_trajectory, euler_step, solve
from .step_embedding import add_step_embedding, fold_step_embedding
from .data import step_generator
from .training import step_decay_lr

LOSSES = ("l1", "l2", "pseudo_huber")
LOSS_SPACES = ("edm", "vp")

# `grid="auto"`: the setting that measured best on the Fashion-MNIST benchmark (README, issue 11) for the smallest
# NFE asked: from 4 NFE up the lu grid with AFS and K = 4 (FID 35.48 vs 38.32 trailing); below, trailing without AFS
# (2 NFE: 60.65 vs 144.72 for lu, whose last call sits at sigma_min and has nothing left to do) and K = 32: trailing's
# first interval runs from sigma 22,026 to 1, where K = 8 targets sit 0.043 from the teacher and the student learns
# no closer (2 NFE, 256 iterations: FID 37.48 at K = 32 against 48.43 at K = 8, and 46.08 at K = 8 with 4x the
# trajectories, i.e. more compute than K = 32).
AUTO_LU_MIN_NFE = 4
AUTO_SETTINGS = {"lu": dict(grid="lu", afs=True, teacher_steps_per_step=4),
                 "trailing": dict(grid="trailing", afs=False, teacher_steps_per_step=32)}


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


def check_first_call(grid: Grid, afs: bool, scheduler_config: Mapping, *, clipped: bool) -> None:
    """Refuse an epsilon student of a clipped teacher whose first network call is at alpha < EPSILON_MIN_ALPHA: stock
    schedulers sample it unclipped, and x-hat = (z - sigma eps) / alpha there multiplies its eps error by > 1,000."""
    alpha = float(grid.alphas[1 if afs else 0])
    if clipped and scheduler_config.get("prediction_type") == "epsilon" and alpha < EPSILON_MIN_ALPHA:
        raise ValueError(
            f"This epsilon teacher's {grid.kind} grid starts at alpha {alpha:.2g}: its eps student, sampled unclipped, "
            f"would break at its first call (x-hat multiplies eps errors by {1 / alpha:,.0f}); keep --afs (the first "
            "step analytic) or pass --grid sfd.")


def auto_setting(nfes, *, clipped_eps: bool = False) -> Dict[str, Any]:
    """`grid="auto"`: lu, AFS, K = 4 if min(nfes) >= AUTO_LU_MIN_NFE, else trailing, no AFS, K = 32 (AFS kept where
    `clipped_eps`: a clipped eps teacher's student cannot make its first call at t = T, `check_first_call`)."""
    setting = dict(AUTO_SETTINGS["lu" if min(nfes) >= AUTO_LU_MIN_NFE else "trailing"])
    if clipped_eps and min(nfes) > 1:
        setting["afs"] = True
    return setting


def resolve_setting(nfes, *, grid: str = "auto", afs: Optional[bool] = None, teacher_steps_per_step: Optional[int] = None,
                    clipped_eps: bool = False) -> Dict[str, Any]:
    """The concrete (grid, afs, K): `auto_setting` fills what `grid="auto"` leaves open; an explicit grid keeps the
    paper's AFS and K = 4 unless given."""
    base = auto_setting(nfes, clipped_eps=clipped_eps) if grid == "auto" else dict(grid=grid, afs=True, teacher_steps_per_step=4)
    given = dict(afs=afs, teacher_steps_per_step=teacher_steps_per_step)
    return {**base, **{key: value for key, value in given.items() if value is not None}}


def student_nfe(grid: Grid, afs: bool) -> int:
    """Network calls of a student sampling `grid` with one Euler step per interval: N - AFS."""
    return grid.num_steps - int(afs)


def step_count_cond(nfe: int, batch_size: int, device=None, conditioned: bool = True) -> Mapping[str, Optional[torch.Tensor]]:
    """The SFD-v student's extra inputs: {"class_labels": NFE for every sample} (empty for an unconditioned student)."""
    if not conditioned:
        return {}
    return {"class_labels": torch.full((batch_size,), int(nfe), dtype=torch.long, device=device)}


def trajectory_end(z: torch.Tensor, grid: Grid, solver: str, denoiser: DenoiserFn, *, afs: bool = False, **cond) -> torch.Tensor:
    """The image at the end of `solver`'s trajectory from `z` on `grid` (`final_sample` of its last state)."""
    return final_sample(solve(solver, denoiser, z, grid, afs=afs, **cond)[-1], grid)


@torch.no_grad()
def solver_samples(unet, latents: torch.Tensor, *, scheduler_config, solver: str, grid: Grid, **cond) -> torch.Tensor:
    """Samples of `unet` from `latents` with a teacher `solver` on `grid` (the SFD runs' reference); `cond`: its inputs."""
    with evaluating(unet):
        return trajectory_end(latents, grid, solver, Denoiser(unet, scheduler_config), **cond)


@torch.no_grad()
def sfd_student_samples(unet, latents: torch.Tensor, *, scheduler_config, num_steps: int, grid: str = "trailing",
                        afs: bool = False, guidance_scale: float = 1.0, uncond: Optional[Mapping] = None,
                        **cond) -> torch.Tensor:
    """A saved SFD student's samples: one Euler (DDIM) step per interval of its N-step `grid`, the first analytic with
    `afs`; conditioned on `cond`, with classifier-free guidance at `guidance_scale` > 1 (as diffusers: none at s <= 1)
    against the null condition `uncond`, both predictions from one batched forward per step (`GuidedDenoiser`)."""
    with evaluating(unet):
        denoiser = Denoiser(unet, scheduler_config)
        if guidance_scale > 1:
            denoiser, cond = GuidedDenoiser(denoiser), {**cond, "guidance_scale": guidance_scale, "uncond": uncond}
        return sfd_sample(denoiser, student_grid(scheduler_config, num_steps, grid), latents, afs=afs, **cond)


@torch.no_grad()
def on_validation_conditions(unet, latents: torch.Tensor, *, sampler: Callable, conditioning) -> torch.Tensor:
    """`sampler(unet, latents, **cond)` on the conditioning's fixed validation conditions, at s = 1 (no guidance)."""
    return sampler(unet, latents, **conditioning.validation_cond(latents.shape[0], latents.device))


class SFDBatch(Batch):
    """One iteration of SFD: a global batch of teacher trajectories from pure noise and the student's steps along them.

    The step count (SFD-v), the noise and (conditional teachers) each trajectory's condition are pure functions of
    (seed, stage, iteration); each process takes its rows. Update u trains the student's step `trained_steps[u]` from
    where its previous step left it (detached); teacher and student see the same condition, at s = 1.
    """

    def __init__(self, method: "SimpleFastDistillation", stage: Stage, iteration: int, teacher, ctx: LoopContext):
        generator = step_generator(ctx.seed, iteration, stream=stage.index)
        self.nfe = method.draw_nfe(stage, generator)
        noise = torch.randn((ctx.global_batch_size, *method.sample_shape), generator=generator)
        self.noise = ctx.rank_slice(noise).to(ctx.device)
        self.data_cond = method.trajectory_cond(generator, ctx)
        self.method = method
        self.teacher = method.clipped(teacher) if stage.index == 0 else teacher  # the original teacher is stage one's
        self.loss_fn = method.loss_for(stage, self.nfe)
        self.cond = method.student_cond(stage, self.nfe, self.noise.shape[0], ctx.device)
        self.steps = list(self.loss_fn.trained_steps)
        self.num_updates = len(self.steps)
        self.targets = self.z = None

    def loss(self, student, update: int, micro: int) -> torch.Tensor:
        """Per-sample loss of the student's step `trained_steps[update]` (the teacher's trajectory drawn at update 0)."""
        if update == 0:
            self.targets = self.loss_fn.teacher_targets(self.method.denoiser(self.teacher), self.noise, **self.data_cond)
            self.z = self.loss_fn.first_state(self.noise)
        loss, self.z = self.loss_fn(self.method.denoiser(student), self.z, self.steps[update], self.targets,
                                    **self.data_cond, **self.cond)
        return loss


class SimpleFastDistillation(DistillationMethod):
    """SFD (and SFD-v for several NFEs, and the optional 1-NFE second stage) as a method of the training loop.

    Args:
        scheduler_config: the teacher's scheduler config; the students keep its schedule and prediction_type.
        sample_shape: (channels, height, width) of the teacher's samples.
        nfes: the students' network calls per sample; several = SFD-v (one model conditioned on the NFE).
        iterations: stage one's budget in global batches of teacher trajectories.
        afs: analytic first step (student steps N = NFE + 1); None: the grid's setting (`resolve_setting`).
        teacher_solver, teacher_steps_per_step: the teacher's solver and its K sub-steps per student step (None: the
            grid's setting).
        loss: trajectory distance (`LOSSES`); grid: the students' grid kind (`grids.GRID_KINDS`), or "auto": the
            measured best setting for the smallest NFE (`auto_setting`; resolved here, so the students and the
            summary name the concrete grid).
        learning_rate: Adam's learning rate, x 0.1 at half of each stage's budget (as the official code).
        second_stage: add a 1-NFE stage whose teacher is stage one's largest-NFE student with its own sampler.
        second_stage_iterations, second_stage_learning_rate: its budget and learning rate.
        conditioning: a conditional teacher's adapter (`TextConditioning`, `ClassConditioning`): each trajectory is
            conditioned on a caption or label drawn from its data, at s = 1; its students are saved as that adapter
            saves them (a stock StableDiffusionPipeline; a class-conditional DDPMPipeline folder) and sampled with
            classifier-free guidance at any s. None: an unconditional teacher.
        teacher_clip_sample: "auto", "on" or "off": whether the original teacher's x-hat is clamped in its solver
            steps (`clipping.teacher_clip_range`, as progressive distillation's DDIM steps); students never are.
    """

    name = "sfd"
    budget_flag = "--num_trajectories"
    unit = "trajectories"

    def __init__(self, scheduler_config: Mapping, sample_shape, *, nfes, iterations: int, afs: Optional[bool] = None,
                 teacher_solver: str = "dpm_solver_3m", teacher_steps_per_step: Optional[int] = None, loss: str = "l1",
                 grid: str = "auto", learning_rate: float = 5e-5, second_stage: bool = False,
                 second_stage_iterations: Optional[int] = None, second_stage_learning_rate: float = 5e-4, conditioning=None,
                 teacher_clip_sample: str = "auto"):
        self.config = self.teacher_config = dict(scheduler_config)  # every stage's teacher shares its schedule
        self.teacher_clip_range = teacher_clip_range(self.config, teacher_clip_sample)
        self.sample_shape = tuple(sample_shape)
        self.conditioning = conditioning
        self.nfes = sorted(set(int(nfe) for nfe in nfes))
        if not self.nfes or len(self.nfes) != len(list(nfes)):
            raise ValueError(f"--nfe {' '.join(map(str, nfes))}: pass one or more distinct step counts, e.g. --nfe 4 or --nfe 2 3 4 5.")
        clipped_eps = self.teacher_clip_range is not None and self.config.get("prediction_type") == "epsilon"
        setting = resolve_setting(self.nfes, grid=grid, afs=afs, teacher_steps_per_step=teacher_steps_per_step,
                                  clipped_eps=clipped_eps)
        grid, afs, teacher_steps_per_step = setting["grid"], setting["afs"], setting["teacher_steps_per_step"]
        if teacher_steps_per_step < 1:
            raise ValueError(f"--teacher_steps_per_step {teacher_steps_per_step}: K must be at least 1.")
        if second_stage and self.nfes == [1]:
            raise ValueError("--second_stage distils stage one's student into 1 NFE: stage one needs --nfe 2 or more.")
        if second_stage and 1 in self.nfes:
            raise ValueError("--second_stage makes the 1-NFE student: drop 1 from --nfe.")
        self.afs, self.teacher_solver, self.teacher_steps_per_step = afs, teacher_solver, teacher_steps_per_step
        self.loss, self.grid_kind = loss, grid
        self.iterations, self.peak_learning_rate = iterations, learning_rate
        self.second_stage = second_stage
        self.second_stage_iterations = second_stage_iterations or iterations
        self.second_stage_learning_rate = second_stage_learning_rate
        # every grid and loss now: a bad NFE, grid or schedule fails before any work
        T = int(self.config["num_train_timesteps"])
        self.losses = {}
        for nfe in self.nfes:
            grid_n = student_grid(self.config, check_nfe(nfe, afs=afs, num_train_timesteps=T), grid)
            fine = teacher_grid(grid_n, teacher_steps_per_step, self.config)
            self.losses[nfe] = SFDLoss(grid_n, fine, teacher_solver=teacher_solver, afs=afs, loss=loss)
            check_first_call(grid_n, afs, self.config, clipped=self.teacher_clip_range is not None)
        if second_stage:
            top = self.losses[self.nfes[-1]]
            self.second_loss = SFDLoss.second_stage(student_grid(self.config, 1, grid), top.student_grid,
                                                    stage_one_afs=afs, loss=loss)
        self.scheduler = ProgressiveDistillationScheduler.from_config(self.config)  # its parameterization fits its schedule

    @property
    def conditioned(self) -> bool:
        """SFD-v: one stage-one student for several NFEs, told the NFE through its class-embedding slot."""
        return len(self.nfes) > 1

    def title(self, teacher: str) -> str:
        kind = "SFD-v" if self.conditioned else "SFD"
        second = " + second stage (1 NFE)" if self.second_stage else ""
        condition = "" if self.conditioning is None else f" (conditional, {self.conditioning.key}, distilled at s = 1)"
        return f"{kind} of {teacher}{condition}: {', '.join(map(str, self.nfes))} NFE{second}"

    def stages(self) -> List[Stage]:
        name = f"{'SFD-v' if self.conditioned else 'SFD'}: {', '.join(map(str, self.nfes))} NFE"
        stages = [Stage(0, name, self.iterations, tuple(self.nfes))]
        if self.second_stage:
            stages.append(Stage(1, f"second stage: {self.nfes[-1]} -> 1 NFE", self.second_stage_iterations, (1,)))
        return stages

    def init_student(self, teacher, stage: Stage):
        """A copy of the teacher; for SFD-v with a zero-initialised step-count embedding (equal outputs)."""
        if stage.index == 0 and self.conditioned:
            return add_step_embedding(teacher, max(self.nfes)).train().requires_grad_(True)
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def denoiser(self, unet) -> Denoiser:
        """D(z, t, cond) of a teacher or student (all share the teacher's schedule and prediction_type)."""
        return Denoiser(unet, self.config)

    def draw_nfe(self, stage: Stage, generator: torch.Generator) -> int:
        """The NFE of one batch: uniform over the stage's step counts (one draw even for a single one)."""
        return stage.steps[int(torch.randint(len(stage.steps), (1,), generator=generator))]

    def loss_for(self, stage: Stage, nfe: int) -> SFDLoss:
        """The stage's `SFDLoss` for `nfe`."""
        return self.second_loss if stage.index == 1 else self.losses[nfe]

    def trajectory_cond(self, generator: torch.Generator, ctx: LoopContext) -> Dict[str, torch.Tensor]:
        """Each trajectory's condition, drawn uniformly from the data (captions, with `--proportion_empty_prompts`
        dropped to the empty prompt; labels), this process's rows; {} for an unconditional teacher."""
        if self.conditioning is None:
            return {}
        indices = torch.randint(len(self.conditioning), (ctx.global_batch_size,), generator=generator)
        _, cond = self.conditioning.batch(indices, generator=generator)
        return {key: ctx.rank_slice(value).to(ctx.device) for key, value in cond.items()}

    def student_cond(self, stage: Stage, nfe: int, batch_size: int, device) -> Mapping:
        """The student's extra inputs: the NFE label for an SFD-v student, nothing otherwise."""
        return step_count_cond(nfe, batch_size, device, conditioned=stage.index == 0 and self.conditioned)

    def learning_rate(self, stage: Stage, iteration: int) -> float:
        base = self.second_stage_learning_rate if stage.index == 1 else self.peak_learning_rate
        return step_decay_lr(iteration, stage.iterations, base)

    def batch(self, stage: Stage, iteration: int, teacher, ctx: LoopContext) -> Batch:
        return SFDBatch(self, stage, iteration, teacher, ctx)

    def validated(self, sampler: Callable) -> Callable:
        """`sampler` on the conditioning's validation conditions (s = 1) for a conditional teacher, else as it is."""
        if self.conditioning is None:
            return sampler
        return partial(on_validation_conditions, sampler=sampler, conditioning=self.conditioning)

    def finished(self, nfe: int, unet, loss_fn: SFDLoss, afs: bool, **metadata) -> FinishedStudent:
        """A student of `nfe` network calls on `loss_fn`'s grid, with the sampler it was trained for; a conditional
        teacher's students are saved by its adapter (`conditioning.save`)."""
        num_steps = loss_fn.student_grid.num_steps
        sampler = partial(sfd_student_samples, scheduler_config=self.config, num_steps=num_steps, grid=self.grid_kind, afs=afs)
        save_kwargs = dict(method="sfd", grid=self.grid_kind, nfe=nfe, afs=afs, loss=self.loss,
                           teacher_prediction_type=self.config["prediction_type"], **metadata)
        saver = None
        if self.conditioning is not None:
            saver = partial(self.conditioning.save, scheduler_config=self.config)
            save_kwargs.update(prediction_type=self.config["prediction_type"], distilled_guidance_scale=1.0)
        return FinishedStudent(nfe, unet, self.scheduler, num_inference_steps=num_steps, sampler=self.validated(sampler),
                               save_kwargs=save_kwargs, saver=saver)

    def finish_stage(self, stage: Stage, student) -> Tuple[torch.nn.Module, List[FinishedStudent]]:
        """Stage one: a student per NFE (SFD-v: its embedding folded in); the largest is the second stage's teacher."""
        if stage.index == 1:
            return student, [self.finished(1, student, self.second_loss, False, teacher_solver="ddim (stage-one student)",
                                           second_stage=True)]
        done = [self.finished(nfe, fold_step_embedding(student, nfe) if self.conditioned else student, self.losses[nfe],
                              self.afs, teacher_solver=self.teacher_solver, teacher_steps_per_step=self.teacher_steps_per_step,
                              sfd_v=list(self.nfes) if self.conditioned else None)
                for nfe in self.nfes]
        return done[-1].unet, done

    def card_training(self, stage: Stage, global_batch: int) -> Dict[str, Any]:
        lr = self.second_stage_learning_rate if stage.index == 1 else self.peak_learning_rate
        return {"teacher trajectories": stage.iterations * global_batch, "global batch size": global_batch,
                "learning rate": f"{lr} (x 0.1 at half of the budget)", "loss": self.loss,
                "teacher solver": f"{self.teacher_solver}, K = {self.teacher_steps_per_step}" if stage.index == 0 else
                "stage-one student, its own sampler",
                **({"teacher x-hat": clip_card_row(self.teacher_clip_range)} if stage.index == 0 else {}),
                **({} if self.conditioning is None else {"condition": f"{self.conditioning.key} from the data, at s = 1"})}

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return samples if self.conditioning is None else self.conditioning.decode(samples)

    def reference_sampler(self):
        """The teacher's solver on the fine grid of the largest-NFE student: that student's training target (a
        conditional teacher: on the validation conditions, at s = 1)."""
        return self.teacher_sampler(partial(solver_samples, scheduler_config=self.config, solver=self.teacher_solver,
                                            grid=self.losses[self.nfes[-1]].teacher_grid))

    def teacher_baseline(self, nfe: int):
        return self.teacher_sampler(partial(ddim_samples, scheduler_config=self.config, num_steps=nfe))

    def state(self) -> Dict[str, Any]:
        """The teacher's clamp (a resume with another `--teacher_clip_sample` is refused)."""
        return {"teacher_clip_range": self.teacher_clip_range}

    def teacher_sampler(self, sampler: Callable) -> Callable:
        """`sampler(unet, latents, **cond)` run on the original teacher as its solver sees it (`clipped`), on the
        validation conditions of a conditional teacher (`validated`)."""
        return self.validated(lambda unet, latents, **cond: sampler(self.clipped(unet), latents, **cond))
