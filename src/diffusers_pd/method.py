"""The seam between the training loop and a distillation method (progressive distillation, SFD, ...).

The loop of `examples/train_distill.py` is the same for every method: stages, each a fresh optimizer over a student;
iterations, each one GLOBAL batch drawn as a pure function of (seed, stage, iteration); inside an iteration one or
more optimizer updates (progressive distillation: one; SFD: one per student step), each optionally accumulated over
micro-batches; checkpoints between iterations; the finished students of a stage measured, saved and pushed.

A method supplies only what differs, through the small interface below:

| method call                                   | returns                                                          |
|-----------------------------------------------|------------------------------------------------------------------|
| `stages()`                                    | the list of `Stage`s                                             |
| `init_student(teacher, stage)`                | a new trainable student for the stage                            |
| `start_stage(stage, first_iteration, ctx)`    | prepares the stage's grids, losses and data stream               |
| `learning_rate(stage, iteration)`             | the learning rate of that iteration                              |
| `batch(stage, iteration, teacher, ctx)`       | a `Batch`: `num_updates` and `loss(student, update, micro)`      |
| `finish_stage(stage, student)`                | (next teacher, [`FinishedStudent`, ...] to save)                 |
| `resume_teacher(teacher, stage_index)`        | the teacher's architecture at that stage (to load a checkpoint)  |
| `clipped(teacher)`                            | the original teacher with its x-hat clamped as its steps see it  |
| `decode(samples)`                             | images of sampled latents (sample grids)                         |
| `reference_sampler()`, `teacher_baseline(n)`  | samplers `(unet, latents) -> samples` for the fidelity columns   |
| `state()`, `load_state(state)`                | what a checkpoint keeps beyond the weights                       |

`ctx` is a `LoopContext`: device, this process's rank and the number of processes, per-process batch size,
gradient accumulation steps and the seed.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .clipping import clipped_teacher

@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name in logs and summaries, its budget in global batches, the step counts it trains."""

    index: int
    name: str
    iterations: int
    steps: Tuple[int, ...]


def stage_budgets(iterations, num_stages: int, flag: str = "--iterations_per_stage") -> List[int]:
    """Updates per stage: one value for every stage, or one per stage in order (the last repeats for the rest)."""
    values = [int(iterations)] if isinstance(iterations, int) else [int(value) for value in iterations]
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {' '.join(map(str, values))}: each stage needs at least 1 update.")
    if len(values) > num_stages:
        raise ValueError(f"{flag} gives {len(values)} budgets for {num_stages} stages: pass at most {num_stages} "
                         "(the last repeats for the stages after it).")
    return values + [values[-1]] * (num_stages - len(values))


def halving_name(steps: int, prediction_type: str, teacher_prediction_type: str, teacher_note: str = "") -> str:
    """'2N -> N', with ' (P)' where the N-step student predicts P other than the original teacher and ' (..., note)'
    where its teacher differs from the plain one (so a resume with another plan is refused as one with other stages)."""
    notes = [prediction_type] if prediction_type != teacher_prediction_type else []
    notes += [teacher_note] if teacher_note else []
    name = f"{2 * steps} -> {steps}"
    return f"{name} ({', '.join(notes)})" if notes else name


@dataclass(frozen=True)
class LoopContext:
    """What a method needs to know of the loop: where it runs and how the global batch is split."""

    device: torch.device
    rank: int
    num_processes: int
    batch_size: int  # per process
    gradient_accumulation_steps: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        """Per-process batch x processes (one micro-batch)."""
        return self.batch_size * self.num_processes

    def rank_slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        return tensor[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


@dataclass
class FinishedStudent:
    """A student of a finished stage, ready for `save_student`.

    Args:
        nfe: its network calls per sample with its own sampler (the summary's `steps`, the folder name).
        unet, scheduler: what is saved (any scheduler of the student's schedule and prediction type).
        sampler: `(unet, latents) -> samples`, how this student samples (fidelity column, samples.png).
        num_inference_steps: the steps of the stock folder's scheduler (None: `nfe`).
        save_kwargs: further keyword arguments of the saver (metadata, grid).
        saver: `(folder, unet, num_inference_steps, **kwargs)` writing the stock folder; None: `export.save_student`
            with `scheduler` (a DDPMPipeline folder).
        saved: False for an intermediate model that gets a summary row but no folder (a conversion stage's).
    """

    nfe: int
    unet: torch.nn.Module
    scheduler: Any
    sampler: Callable
    num_inference_steps: Optional[int] = None
    save_kwargs: Dict[str, Any] = field(default_factory=dict)
    saver: Optional[Callable] = None
    saved: bool = True

    @property
    def folder_name(self) -> str:
        return f"student-{self.nfe}steps" if self.saved else "-"

    @property
    def prediction_type(self) -> Optional[str]:
        """What the student's network predicts."""
        if "prediction_type" in self.save_kwargs:
            return self.save_kwargs["prediction_type"]
        return None if self.scheduler is None else self.scheduler.config.prediction_type

    @property
    def stock_steps(self) -> int:
        """The step count the stock folder samples with."""
        return self.num_inference_steps or self.nfe

    def save(self, folder, **kwargs) -> Dict[str, Any]:
        """Write the student's stock folder atomically (its saver, else `save_student`); returns its metadata."""
        if self.saver is not None:
            return self.saver(folder, self.unet, self.stock_steps, **self.save_kwargs, **kwargs)
        from .export import save_student

        return save_student(folder, self.unet, self.scheduler, self.stock_steps, **self.save_kwargs, **kwargs)


class Batch:
    """One iteration's work: `num_updates` optimizer updates, each the mean of `loss(student, update, micro)`."""

    num_updates: int = 1

    def loss(self, student: torch.nn.Module, update: int, micro: int) -> torch.Tensor:
        """The unreduced per-sample loss of update `update`, micro-batch `micro`."""
        raise NotImplementedError


class DistillationMethod:
    """Base of every method: see the module docstring for the interface the loop calls."""

    name: str = ""
    budget_flag: str = ""  # the flag that gives a stage more training (named in the worse-than-DDIM warning)
    unit: str = "images"  # what one iteration's global batch holds (progress bars and logs count them)
    teacher_config: Dict[str, Any]  # the ORIGINAL teacher's scheduler config
    teacher_clip_range: Optional[float] = None  # its x-hat's clamp (`clipping.teacher_clip_range`; None: unclipped)

    def title(self, teacher: str) -> str:
        """The summary's heading line."""
        raise NotImplementedError

    def stages(self) -> List[Stage]:
        raise NotImplementedError

    def iterations_before(self, stage: Stage) -> int:
        """Iterations of the stages before `stage`: where its global batches start in the run's sequence."""
        return sum(earlier.iterations for earlier in self.stages()[: stage.index])

    def init_student(self, teacher: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        raise NotImplementedError

    def resume_teacher(self, teacher: torch.nn.Module, stage_index: int) -> torch.nn.Module:
        """A module of the architecture of stage `stage_index`'s teacher, to load a checkpoint into (default: as is)."""
        return teacher

    def start_stage(self, stage: Stage, first_iteration: int, ctx: LoopContext) -> None:
        """Prepare the stage (default: nothing)."""

    def learning_rate(self, stage: Stage, iteration: int) -> float:
        raise NotImplementedError

    def batch(self, stage: Stage, iteration: int, teacher: torch.nn.Module, ctx: LoopContext) -> Batch:
        raise NotImplementedError

    def finish_stage(self, stage: Stage, student: torch.nn.Module) -> Tuple[torch.nn.Module, List[FinishedStudent]]:
        raise NotImplementedError

    def notes(self) -> List[str]:
        """One-line warnings about this run's settings, logged once before training (default: none)."""
        return []

    def clipped(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The original teacher as its sampling steps see it: x-hat clamped where `teacher_clip_range` says so."""
        return clipped_teacher(teacher, self.teacher_config, self.teacher_clip_range)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of a sampler's output (default: the samples are images; latent models decode)."""
        return samples

    def card_training(self, stage: Stage, global_batch: int) -> Dict[str, Any]:
        """The 'Training' rows of the stage's model cards."""
        return {}

    def reference_sampler(self) -> Callable:
        """The ORIGINAL teacher's sampler that every student is compared with (`mse_to_teacher`)."""
        raise NotImplementedError

    def teacher_baseline(self, nfe: int) -> Callable:
        """The original teacher's DDIM at a student's NFE (`teacher_ddim_mse`)."""
        raise NotImplementedError

    def state(self) -> Dict[str, Any]:
        """Method state kept in checkpoints beyond the weights (default: none)."""
        return {}

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore `state()` when resuming (default: nothing)."""
