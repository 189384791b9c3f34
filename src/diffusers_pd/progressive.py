"""Progressive distillation (Salimans & Ho, ICLR 2022) as a method of the training loop (see `method.py`).

Stages halve the student's steps: start/2, start/4, ..., end. In each, the student starts as a copy of the teacher
and every update regresses its one-step DDIM x-hat on the teacher's two-step target (Algorithm 2,
`ProgressiveDistillationLoss`); the finished student becomes the next stage's teacher. Which parameterization each
student predicts, and whether a conversion stage comes first, is `parameterization.stage_plan`'s rule.
"""

import copy
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch

from .clipping import (clip_card_row, clipped_teacher, epsilon_breaks_at_first_step, switch_clip_note, switch_clip_range,
                       teacher_clip_range)
from .loss import ParameterizationConversionLoss, ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices
from .method import Batch, DistillationMethod, FinishedStudent, LoopContext, Stage, halving_name, stage_budgets
from .parameterization import stage_plan, student_learning_rate, student_loss_weighting
from .pipeline import ddim_samples
from .scheduler import ProgressiveDistillationScheduler
from .data import GlobalBatchSampler, random_flips, step_generator
from .training import linear_decay_lr


def stage_steps(start_steps: int, end_steps: int) -> List[int]:
    """Student step counts of each stage: start/2, start/4, ..., end; one clear error if that is not a halving chain."""
    for name, value in (("start_steps", start_steps), ("end_steps", end_steps)):
        if value < 1:
            raise ValueError(f"--{name} {value} is not a step count: pass 1 or more.")
    ratio = start_steps // end_steps
    if start_steps <= end_steps or start_steps % end_steps or ratio & (ratio - 1):
        raise ValueError(
            f"--start_steps {start_steps} must be a power-of-two multiple (>= 2x) of --end_steps {end_steps}, e.g. 1024 and 4."
        )
    steps = [start_steps // 2]
    while steps[-1] > end_steps:
        steps.append(steps[-1] // 2)
    return steps


class ProgressiveBatch(Batch):
    """One update of progressive distillation: the global batch of images, noise and grid points of `iteration`."""

    num_updates = 1

    def __init__(self, method: "ProgressiveDistillation", stage: Stage, iteration: int, teacher, ctx: LoopContext):
        self.method, self.stage, self.iteration, self.ctx = method, stage, iteration, ctx
        self.teacher = method.stage_teacher(teacher, stage)

    def loss(self, student, update: int, micro: int) -> torch.Tensor:
        """Per-sample Algorithm 2 loss on micro-batch `micro`; every random draw is a function of (seed, micro-step)."""
        method, ctx = self.method, self.ctx
        generator = step_generator(ctx.seed, method.micro_step(self.stage, self.iteration, micro, ctx))
        noise, grid_indices = draw_noise_and_grid_indices((ctx.global_batch_size, *method.sample_shape), self.stage.steps[0], generator)
        flips = torch.rand(ctx.global_batch_size, generator=generator) < 0.5
        images = next(method.batches)["pixel_values"].to(ctx.device)
        if method.random_flip:
            images = random_flips(images, ctx.rank_slice(flips))
        return method.loss_fn(RawOutput(student), RawOutput(self.teacher), images,
                              ctx.rank_slice(noise).to(ctx.device), ctx.rank_slice(grid_indices))


class ProgressiveDistillation(DistillationMethod):
    """Algorithm 2 of Salimans & Ho (2022), stage by stage from `start_steps` down to `end_steps`.

    Args:
        scheduler_config: the teacher's scheduler config (its schedule and prediction_type).
        dataset: a map-style data set yielding `pixel_values` (the teacher's training data).
        sample_shape: (channels, height, width) of the teacher's samples.
        start_steps, end_steps: the teacher's sampling steps and the last student's.
        iterations_per_stage: updates per stage (the paper's K), or one per stage in order, the last repeating
            (`method.stage_budgets`; a conversion stage counts as a stage).
        prediction_type: the students' parameterization, or "auto" (`parameterization.stage_plan`'s rule).
        switch_steps, conversion_stage: where the parameterization switches, and whether a conversion stage at the
            teacher's own steps comes first (`stage_plan`).
        loss_weighting: `"truncated_snr"`, `"snr_plus_one"`, `"snr"`, or `"auto"` (`student_loss_weighting`: the eps-MSE for
            an epsilon student, truncated_snr otherwise).
        learning_rate: peak learning rate, decaying linearly to 0 over each stage.
        scale_lr_with_steps: an N-step epsilon or sample (x) student's peak is learning_rate x min(1, 4 / N) (`student_learning_rate`).
        teacher_clip_sample: "auto", "on" or "off": whether the original teacher's x-hat is clamped in its DDIM steps
            (`clipping.teacher_clip_range`; auto: as its scheduler config's clip_sample says, for eps teachers that
            break at t = T); auto on another clip_sample eps teacher (the Hub DDPM shape) clamps the teacher of the
            halving where its students leave eps instead (`clipping.switch_clip_range`; the original teacher if that
            is the first stage).
    """

    name = "progressive"
    budget_flag = "--iterations_per_stage"

    def __init__(self, scheduler_config: Dict[str, Any], dataset, sample_shape, *, start_steps: int, end_steps: int,
                 iterations_per_stage: int, prediction_type: str, loss_weighting: str, learning_rate: float,
                 random_flip: bool = False, dataloader_num_workers: int = 0, switch_steps: Optional[int] = None,
                 conversion_stage: bool = False, scale_lr_with_steps: bool = True, teacher_clip_sample: str = "auto"):
        self.teacher_config = dict(scheduler_config)  # the ORIGINAL teacher's, for the fidelity references
        self.teacher_clip_range = teacher_clip_range(self.teacher_config, teacher_clip_sample)
        self.scheduler_config = dict(scheduler_config)  # the current stage's teacher's
        self.teacher_prediction_type = self.scheduler_config["prediction_type"]
        self.plan = stage_plan(stage_steps=stage_steps(start_steps, end_steps), teacher_prediction_type=self.teacher_prediction_type,
                               prediction_type=prediction_type, switch_steps=switch_steps, conversion_stage=conversion_stage,
                               epsilon_breaks_at_first_step=epsilon_breaks_at_first_step(self.teacher_config),
                               teacher_clipped=self.teacher_clip_range is not None)
        # the Hub DDPM shape under auto: eps students follow the unclamped teacher (every stage below its DDIM); the
        # teacher of the halving where they leave eps is clamped, as diffusers samples it (few-step FID, results.md)
        self.switch_clip_index, self.switch_clip_range = None, switch_clip_range(self.teacher_config, teacher_clip_sample)
        leave = next((i for i, entry in enumerate(self.plan) if entry["prediction_type"] != "epsilon"), None)
        if self.switch_clip_range is not None and leave == 0:  # stage 0's teacher is the original: clamped, as `on`
            self.teacher_clip_range = self.switch_clip_range
        elif self.switch_clip_range is not None and leave is not None:
            self.switch_clip_index = leave
        for entry in self.plan:  # e.g. epsilon on a zero-terminal-SNR schedule: refused now, not at that stage
            ProgressiveDistillationScheduler.from_config(self.scheduler_config, prediction_type=entry["prediction_type"])
            entry["loss_weighting"] = student_loss_weighting(prediction_type=entry["prediction_type"], loss_weighting=loss_weighting)
            entry["learning_rate"] = student_learning_rate(learning_rate=learning_rate, steps=entry["steps"],
                                                           prediction_type=entry["prediction_type"], scale=scale_lr_with_steps)
        self.dataset, self.sample_shape = dataset, tuple(sample_shape)
        self.start_steps, self.end_steps = start_steps, end_steps
        self.budgets = stage_budgets(iterations_per_stage, len(self.plan))
        self.random_flip, self.dataloader_num_workers = random_flip, dataloader_num_workers

    def title(self, teacher: str) -> str:
        return f"Progressive distillation of {teacher}: {self.start_steps} -> {self.end_steps} steps"

    def stages(self) -> List[Stage]:
        return [Stage(i, self.stage_name(i), self.budgets[i], (entry["steps"],)) for i, entry in enumerate(self.plan)]

    def stage_name(self, index: int) -> str:
        """'64 -> 32' for a halving, '64: epsilon -> v_prediction' for a conversion stage; a student predicting other
        than the original teacher says so: '8 -> 4 (v_prediction)'."""
        entry, before = self.plan[index], self.plan[index - 1]["prediction_type"] if index else self.teacher_prediction_type
        clamped = "teacher x-hat clamped" if index == self.switch_clip_index else ""
        if entry["conversion"]:
            return f"{entry['steps']}: {before} -> {entry['prediction_type']}" + (f", {clamped}" if clamped else "")
        return halving_name(entry["steps"], entry["prediction_type"], self.teacher_config["prediction_type"], clamped)

    def init_student(self, teacher, stage: Stage):
        """The student starts as an exact copy of the teacher (as in the paper)."""
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def stage_teacher(self, teacher, stage: Stage):
        """The stage's teacher as its DDIM steps see it: the original (stage 0's) `clipped`, the switching halving's
        clamped to `switch_clip_range` (on its own prediction_type), any other as is."""
        if stage.index == 0:
            return self.clipped(teacher)
        if stage.index == self.switch_clip_index:
            return clipped_teacher(teacher, self.scheduler_config, self.switch_clip_range)
        return teacher

    def micro_step(self, stage: Stage, iteration: int, micro: int, ctx: LoopContext) -> int:
        """The global index of a micro-batch over the whole run: what its random draws and images are a function of."""
        return (self.iterations_before(stage) + iteration) * ctx.gradient_accumulation_steps + micro

    def start_stage(self, stage: Stage, first_iteration: int, ctx: LoopContext) -> None:
        """The stage's scheduler and loss, and its data stream from the exact micro-batch where it stopped."""
        entry = self.plan[stage.index]
        self.scheduler = ProgressiveDistillationScheduler.from_config(self.scheduler_config, prediction_type=entry["prediction_type"])
        self.scheduler.set_timesteps(stage.steps[0])
        loss_class = ParameterizationConversionLoss if entry["conversion"] else ProgressiveDistillationLoss
        self.loss_fn = loss_class(self.scheduler, entry["loss_weighting"], self.teacher_prediction_type)
        sampler = GlobalBatchSampler(len(self.dataset), ctx.batch_size, ctx.rank, ctx.num_processes, ctx.seed,
                                     start=self.micro_step(stage, first_iteration, 0, ctx))
        from .data import collate_pixel_values

        self.batches = iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.dataloader_num_workers, collate_fn=collate_pixel_values,
            generator=torch.Generator().manual_seed(ctx.seed)))  # its own generator: never consumes the global RNG (dropout)

    def learning_rate(self, stage: Stage, iteration: int) -> float:
        return linear_decay_lr(iteration, stage.iterations, self.plan[stage.index]["learning_rate"])

    def batch(self, stage: Stage, iteration: int, teacher, ctx: LoopContext) -> Batch:
        return ProgressiveBatch(self, stage, iteration, teacher, ctx)

    def finish_stage(self, stage: Stage, student) -> Tuple[torch.nn.Module, List[FinishedStudent]]:
        """The student becomes the next teacher (now in its prediction_type); a conversion stage's gets a summary row
        but no folder."""
        num_steps, entry = stage.steps[0], self.plan[stage.index]
        student_config = {**self.scheduler_config, "prediction_type": entry["prediction_type"]}
        finished = FinishedStudent(
            num_steps, student, self.scheduler, saved=not entry["conversion"],
            sampler=partial(ddim_samples, scheduler_config=student_config, num_steps=num_steps),
            save_kwargs=dict(teacher_prediction_type=self.teacher_prediction_type, loss_weighting=entry["loss_weighting"]),
        )
        self.teacher_prediction_type, self.scheduler_config = entry["prediction_type"], student_config
        return student, [finished]

    def card_training(self, stage: Stage, global_batch: int) -> Dict[str, Any]:
        entry = self.plan[stage.index]
        return {"iterations per stage": stage.iterations, "global batch size": global_batch,
                "learning rate": f"{entry['learning_rate']:.4g} (linear decay to 0 per stage)",
                "loss weighting": entry["loss_weighting"],
                "teacher x-hat": self.teacher_card_row(stage)}

    def notes(self) -> List[str]:
        """The run's one warning where `auto` clamps the teacher only from the switching stage (`switch_clip_note`)."""
        return [] if self.switch_clip_index is None else [switch_clip_note(self.switch_stage())]

    def switch_stage(self) -> str:
        """'the halving to 4 steps' (or 'the conversion stage at 8 steps'): where the teacher's clamp starts."""
        entry = self.plan[self.switch_clip_index]
        return f"the {'conversion stage at' if entry['conversion'] else 'halving to'} {entry['steps']} steps"

    def teacher_card_row(self, stage: Stage) -> str:
        """The card's "teacher x-hat" row: the original teacher's clamp, or from which stage on it was clamped."""
        if self.switch_clip_index is None:
            return clip_card_row(self.teacher_clip_range)
        if stage.index < self.switch_clip_index:
            return clip_card_row(None)
        return f"{clip_card_row(self.switch_clip_range)} from {self.switch_stage()} on, where students leave epsilon"

    def reference_sampler(self):
        """The original teacher's DDIM at `start_steps`: what every stage distils."""
        return self.teacher_baseline(self.start_steps)

    def teacher_baseline(self, nfe: int):
        return lambda unet, latents, **cond: ddim_samples(self.clipped(unet), latents, scheduler_config=self.teacher_config,
                                                         num_steps=nfe, **cond)

    def state(self) -> Dict[str, Any]:
        return {"teacher_prediction_type": self.teacher_prediction_type, "teacher_clip_range": self.teacher_clip_range}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.teacher_prediction_type = state.get("teacher_prediction_type", self.teacher_prediction_type)
        self.scheduler_config = {**self.scheduler_config, "prediction_type": self.teacher_prediction_type}
