"""Guided distillation of a conditional teacher (Meng et al., CVPR 2023) as a method of the training loop.

Stage one (`--guidance_iterations` updates): the student is the teacher with a zero-initialised guidance input (for a
UNet2DConditionModel the `time_cond_proj_dim` embedding, fed `e(s - 1)` as `StableDiffusionPipeline` feeds it; a
UNet2DModel has none, so one scale is built into its weights), trained to match the teacher's classifier-free-guided
prediction at s ~ U[s_min, s_max] at all timesteps (`GuidedDistillationLoss`, the teacher's two passes as one batched
forward). Stage two: progressive halvings start_steps/2, ..., end_steps of that student, the teacher side conditioned
on the same s (`ProgressiveDistillationLoss` over `RawOutput(unet, **cond)`). Where the original teacher's x-hat is
clamped (`--teacher_clip_sample`, `clipping.teacher_clip_range`), its classifier-free-guided x-hat is clamped after the
combination, in stage one's targets, the reference samples and its DDIM baselines (`GuidedDenoiser(clip_range=r)`).

What differs between teacher kinds (data, condition, null condition, guidance input, export) is the condition
adapter's (`conditioning.py`): text-to-image students are stock `StableDiffusionPipeline` folders that run ONE UNet
call per step at any guidance scale; class-conditional ones are sampled by `ProgressiveDistillationPipeline`.
"""

import copy
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .clipping import clip_card_row, epsilon_breaks_at_first_step, teacher_clip_range
from .denoiser import Denoiser, GuidedDenoiser
from .grids import student_grid
from .guidance import check_guidance_range
from .guided_distillation import GuidedDistillationLoss, draw_guided_batch, uniform_guidance_scales
from .loss import ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices
from .method import Batch, DistillationMethod, FinishedStudent, LoopContext, Stage, halving_name, stage_budgets
from .pipeline import evaluating
from .parameterization import GUIDED_EPSILON_SWITCH_STEPS, stage_plan
from .progressive import stage_steps
from .scheduler import ProgressiveDistillationScheduler
from .solvers import ddim_trajectory
from .data import GlobalBatchSampler, step_generator
from .training import linear_decay_lr


@torch.no_grad()
def guided_ddim_samples(unet, latents: torch.Tensor, *, scheduler_config, num_steps: int, conditioning, guidance_scale: float,
                        student: bool, clip_range: Optional[float] = None) -> torch.Tensor:
    """Deterministic DDIM on the trailing N-step grid from `latents` on the conditioning's validation inputs: a student
    at s (one call per step; s as its input or built in), or the teacher with classifier-free guidance at s (one
    batched call of 2B per step), its guided x-hat clamped to [-clip_range, clip_range] if given (`GuidedDenoiser`)."""
    if student and clip_range is not None:
        raise ValueError("Students are never clipped: pass clip_range only for the original teacher.")
    batch = latents.shape[0]
    cond = conditioning.validation_cond(batch, latents.device)
    grid = student_grid(dict(scheduler_config), num_steps, "trailing")
    with evaluating(unet):
        denoiser = Denoiser(unet, scheduler_config)
        if student:
            cond.update(conditioning.guidance_cond(guidance_scale, batch, latents.device))
            return ddim_trajectory(denoiser, latents, grid, **cond)[-1]
        return ddim_trajectory(GuidedDenoiser(denoiser, clip_range), latents, grid, guidance_scale=guidance_scale,
                               uncond=conditioning.uncond(cond), **cond)[-1]


class GuidedBatch(Batch):
    """One update: the global batch of training examples of `iteration`, its noise, timesteps and scales."""

    num_updates = 1

    def __init__(self, method: "GuidedDistillation", stage: Stage, iteration: int, teacher, ctx: LoopContext):
        self.method, self.stage, self.iteration, self.teacher, self.ctx = method, stage, iteration, teacher, ctx
        if stage.index == 0 and not method.guided_stage:  # a first halving of the original teacher (s = 1): its DDIM
            self.teacher = method.clipped(teacher)  # steps clamp its x-hat (the guided stage clamps in its loss)

    def loss(self, student, update: int, micro: int) -> torch.Tensor:
        method, ctx, stage, conditioning = self.method, self.ctx, self.stage, self.method.conditioning
        micro_step = method.micro_step(stage, self.iteration, micro, ctx)
        generator = step_generator(ctx.seed, micro_step)
        indices = ctx.rank_slice(torch.tensor(method.sampler.global_indices(micro_step)))
        x0, cond = conditioning.batch(indices, generator=step_generator(ctx.seed, micro_step, stream=1))
        x0, cond = x0.to(ctx.device), {key: value.to(ctx.device) for key, value in cond.items()}
        shape = (ctx.global_batch_size, *x0.shape[1:])
        if stage.index == 0 and method.guided_stage:
            noise, timesteps, scales = draw_guided_batch(
                shape, num_train_timesteps=method.num_train_timesteps, guidance_scale_min=method.guidance_scale_min,
                guidance_scale_max=method.guidance_scale_max, generator=generator)
            scales = ctx.rank_slice(scales)
            student_denoiser = Denoiser(student, method.config, method.guided_prediction_type)
            return method.guided_loss(
                student_denoiser, Denoiser(self.teacher, method.teacher_config), x0,
                ctx.rank_slice(noise).to(ctx.device), ctx.rank_slice(timesteps).to(ctx.device), scales.to(ctx.device),
                cond=cond, uncond=conditioning.uncond(cond),
                student_cond=conditioning.guidance_cond(scales, len(scales), ctx.device))
        noise, grid_indices = draw_noise_and_grid_indices(shape, stage.steps[0], generator)
        scales = uniform_guidance_scales(shape[0], guidance_scale_min=method.guidance_scale_min,
                                         guidance_scale_max=method.guidance_scale_max, generator=generator)
        cond.update(conditioning.guidance_cond(ctx.rank_slice(scales), x0.shape[0], ctx.device))
        return method.loss_fn(RawOutput(student, **cond), RawOutput(self.teacher, **cond), x0,
                              ctx.rank_slice(noise).to(ctx.device), ctx.rank_slice(grid_indices))


class GuidedDistillation(DistillationMethod):
    """Guided distillation (stage one) then progressive halvings of a conditional teacher (`conditioning.py`).

    Args:
        conditioning: the teacher kind's adapter (`TextConditioning`, `ClassConditioning`).
        scheduler_config: the teacher's scheduler config (its schedule and prediction_type).
        guidance_scale_min, guidance_scale_max: the range of s (diffusers' scale) the students are trained for (one
            scale for an adapter without a guidance input); s_max = 1: no guided stage, plain conditional halvings.
        guidance_iterations: updates of stage one; iterations_per_stage: updates per halving, or one per halving in
            order, the last repeating (`method.stage_budgets`).
        start_steps, end_steps: stage one's student steps (= the first halving's teacher) and the last student's.
        prediction_type: the halved students' parameterization, or "auto" (`parameterization.stage_plan`'s rule);
            stage one keeps the teacher's (it starts equal to it), except for an epsilon teacher that
            `epsilon_breaks_at_first_step`: there every student, stage one's too, takes the plan's first one (v for
            "auto"), as an eps student sampled unclipped would break at t = T.
        switch_steps: the step count from which the halved students take `prediction_type`'s final
            parameterization (`stage_plan`); None: for "auto", GUIDED_EPSILON_SWITCH_STEPS (v from 2 steps for an eps
            teacher, measured on the text-to-image demo), else the first halving.
        teacher_clip_sample: "auto", "on" or "off": whether the ORIGINAL teacher's x-hat is clamped
            (`clipping.teacher_clip_range`): its classifier-free-guided x-hat after the combination in stage one's
            targets, its reference samples and DDIM baselines (`GuidedDenoiser`), its DDIM steps in a first halving
            without a guided stage (`ClippedTeacher`); the later stages' teachers are students, never clipped.
    """

    name = "guided"
    budget_flag = "--iterations_per_stage"

    def __init__(self, conditioning, scheduler_config: Mapping, *, guidance_scale_min: float, guidance_scale_max: float,
                 guidance_iterations: int, iterations_per_stage: int, start_steps: int, end_steps: int, prediction_type: str,
                 loss_weighting: str, learning_rate: float, embedding_lr_scale: float = 1.0, teacher_clip_sample: str = "auto",
                 switch_steps: Optional[int] = None):
        check_guidance_range(guidance_scale_min, guidance_scale_max)
        if not conditioning.guidance_input and guidance_scale_min != guidance_scale_max:
            raise ValueError(f"This teacher's UNet has no guidance input: pass one scale (--guidance_scale_min = "
                             f"--guidance_scale_max, e.g. {guidance_scale_max}), which its students then build in.")
        self.halvings = stage_steps(start_steps, end_steps)
        self.conditioning = conditioning
        self.teacher_config = dict(scheduler_config)
        self.teacher_clip_range = teacher_clip_range(self.teacher_config, teacher_clip_sample)
        self.config = dict(scheduler_config)  # the current stage's teacher's
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.guidance_scale_min, self.guidance_scale_max = guidance_scale_min, guidance_scale_max
        self.guided_stage = guidance_scale_max > 1 or conditioning.guidance_input
        self.validation_scale = (guidance_scale_min + guidance_scale_max) / 2
        self.guidance_iterations = guidance_iterations
        self.budgets = stage_budgets(iterations_per_stage, len(self.halvings))
        self.start_steps, self.end_steps = start_steps, end_steps
        # the halved students' parameterizations: the rule of progressive distillation (stage one keeps the teacher's,
        # except where eps breaks at t = T or the teacher is clipped: then the plan's first, v for auto; an unclipped
        # eps student cannot follow a clamped teacher, parameterization.stage_plan)
        breaks, clipped = epsilon_breaks_at_first_step(self.teacher_config), self.teacher_clip_range is not None
        if switch_steps is None and prediction_type == "auto" and not (breaks or clipped):
            switch_steps = GUIDED_EPSILON_SWITCH_STEPS  # eps teachers: v from 2 steps (measured; v/x teachers: no switch)
        self.plan = stage_plan(stage_steps=self.halvings, teacher_prediction_type=self.config["prediction_type"],
                               prediction_type=prediction_type, switch_steps=switch_steps,
                               epsilon_breaks_at_first_step=breaks, teacher_clipped=clipped)
        self.guided_prediction_type = (self.plan[0]["prediction_type"] if breaks or clipped
                                       else self.config["prediction_type"])
        self.loss_weighting, self.peak_learning_rate = loss_weighting, learning_rate
        self.embedding_lr_scale = embedding_lr_scale  # the guided stage's new guidance embedding learns at lr x this
        self.guided_loss = GuidedDistillationLoss(weighting=loss_weighting, teacher_clip_range=self.teacher_clip_range)

    def title(self, teacher: str) -> str:
        return (f"Guided distillation of {teacher}: s in [{self.guidance_scale_min}, {self.guidance_scale_max}], "
                f"{self.start_steps} -> {self.end_steps} steps")

    def stages(self) -> List[Stage]:
        first = [Stage(0, f"guided: s in [{self.guidance_scale_min}, {self.guidance_scale_max}]", self.guidance_iterations,
                       (self.start_steps,))] if self.guided_stage else []
        teacher_type = self.teacher_config["prediction_type"]
        return first + [Stage(len(first) + i, halving_name(entry["steps"], entry["prediction_type"], teacher_type),
                              self.budgets[i], (entry["steps"],)) for i, entry in enumerate(self.plan)]

    def resume_teacher(self, teacher, stage_index: int):
        """The architecture of stage `stage_index`'s teacher: after stage one, the guidance-conditioned student's."""
        if stage_index > 0 and self.guided_stage and self.conditioning.guidance_input:
            return self.conditioning.add_guidance_input(teacher).eval()
        return teacher

    def init_student(self, teacher, stage: Stage):
        """Stage one: the teacher with a zero-initialised guidance input (equal outputs); then a copy of the teacher."""
        if stage.index == 0 and self.guided_stage:
            return self.conditioning.add_guidance_input(teacher).train().requires_grad_(True)
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def micro_step(self, stage: Stage, iteration: int, micro: int, ctx: LoopContext) -> int:
        """The global index of a micro-batch over the whole run (stage one first, then the halvings)."""
        return (self.iterations_before(stage) + iteration) * ctx.gradient_accumulation_steps + micro

    def start_stage(self, stage: Stage, first_iteration: int, ctx: LoopContext) -> None:
        self.sampler = GlobalBatchSampler(len(self.conditioning), ctx.batch_size, ctx.rank, ctx.num_processes, ctx.seed)
        if stage.index > 0 or not self.guided_stage:
            prediction_type = self.plan[stage.index - int(self.guided_stage)]["prediction_type"]
            self.scheduler = ProgressiveDistillationScheduler.from_config(self.config, prediction_type=prediction_type)
            self.scheduler.set_timesteps(stage.steps[0])
            self.loss_fn = ProgressiveDistillationLoss(self.scheduler, self.loss_weighting, self.config["prediction_type"])

    def learning_rate(self, stage: Stage, iteration: int) -> float:
        return linear_decay_lr(iteration, stage.iterations, self.peak_learning_rate)

    def batch(self, stage: Stage, iteration: int, teacher, ctx: LoopContext) -> Batch:
        return GuidedBatch(self, stage, iteration, teacher, ctx)

    def sampler_for(self, config, num_steps: int, student: bool):
        """(unet, latents) -> samples of DDIM at `num_steps` on the validation inputs at the validation scale (the
        original teacher's guided x-hat clamped where `teacher_clip_range` says so)."""
        return partial(guided_ddim_samples, scheduler_config=config, num_steps=num_steps, conditioning=self.conditioning,
                       guidance_scale=self.validation_scale, student=student,
                       clip_range=None if student else self.teacher_clip_range)

    def finish_stage(self, stage: Stage, student) -> Tuple[torch.nn.Module, List[FinishedStudent]]:
        """The student becomes the next teacher; it is saved at its stage's step count."""
        num_steps = stage.steps[0]
        teacher_prediction_type = self.config["prediction_type"]
        if stage.index > 0 or not self.guided_stage:
            self.config = {**self.config, "prediction_type": self.plan[stage.index - int(self.guided_stage)]["prediction_type"]}
        else:
            self.config = {**self.config, "prediction_type": self.guided_prediction_type}
        finished = FinishedStudent(
            num_steps, student, None, sampler=self.sampler_for(self.config, num_steps, student=True),
            saver=partial(self.conditioning.save, scheduler_config=self.teacher_config,
                          guidance_scale_min=self.guidance_scale_min, guidance_scale_max=self.guidance_scale_max),
            save_kwargs=dict(prediction_type=self.config["prediction_type"], teacher_prediction_type=teacher_prediction_type),
        )
        return student, [finished]

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.conditioning.decode(samples)

    def card_training(self, stage: Stage, global_batch: int) -> Dict[str, Any]:
        return {"updates": stage.iterations, "global batch size": global_batch,
                "learning rate": f"{self.peak_learning_rate} (linear decay to 0 per stage)", "loss weighting": self.loss_weighting,
                "guidance scale range": f"[{self.guidance_scale_min}, {self.guidance_scale_max}]",
                "teacher x-hat": clip_card_row(self.teacher_clip_range),
                **({"guidance embedding learning rate": f"{self.embedding_lr_scale:g} x the learning rate (the new, "
                    "zero-initialised `time_embedding.cond_proj`; --guidance_embedding_lr_scale)"}
                   if stage.index == 0 and self.guided_stage and self.conditioning.guidance_input else {})}

    def reference_sampler(self):
        """The teacher with classifier-free guidance at the validation scale, DDIM at `start_steps`."""
        return self.teacher_baseline(self.start_steps)

    def teacher_baseline(self, nfe: int):
        return self.sampler_for(self.teacher_config, nfe, student=False)

    def state(self) -> Dict[str, Any]:
        """The current teacher's prediction type (the last finished student's; as progressive distillation keeps it)."""
        return {"teacher_prediction_type": self.config["prediction_type"], "teacher_clip_range": self.teacher_clip_range}

    def load_state(self, state: Dict[str, Any]) -> None:
        # checkpoints written before 2026-11-26 name the key guided_prediction_type
        prediction_type = state.get("teacher_prediction_type", state.get("guided_prediction_type"))
        self.config = {**self.config, "prediction_type": prediction_type or self.config["prediction_type"]}
