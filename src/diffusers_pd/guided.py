"""Guided distillation of a text-to-image teacher (Meng et al., CVPR 2023) as a method of the training loop.

Stage one (`--guidance_iterations` updates): the student is the teacher's UNet2DConditionModel with a zero-initialised
guidance embedding (`time_cond_proj_dim`, fed `e(s - 1)` as `StableDiffusionPipeline` feeds it), trained to match
the teacher's classifier-free-guided prediction at s ~ U[s_min, s_max] at all timesteps (`GuidedDistillationLoss`,
the teacher's two passes as one batched forward). Stage two: progressive halvings start_steps/2, ..., end_steps of
the guidance-conditioned student, the teacher side conditioned on the same s (`ProgressiveDistillationLoss` over
`RawOutput(unet, encoder_hidden_states=c, timestep_cond=e(s - 1))`).

Every student is written as a full stock `StableDiffusionPipeline` folder (`export.save_stock_sd_pipeline`), which
runs ONE UNet call per step at any guidance scale: the pipeline sees `time_cond_proj_dim` and skips its
unconditional batch. Data are the teacher's own encodings of image-caption pairs (`text_image_data`), latents and
text embeddings computed once.
"""

import copy
from functools import partial
from typing import Any, Dict, List, Mapping, Tuple

import torch

from .denoiser import Denoiser, GuidedDenoiser
from .export import save_stock_sd_pipeline
from .grids import student_grid
from .guidance import add_guidance_embedding, check_guidance_range, guidance_timestep_cond
from .guided_distillation import GuidedDistillationLoss, draw_guided_batch, uniform_guidance_scales
from .loss import ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices
from .method import Batch, DistillationMethod, FinishedStudent, LoopContext, Stage
from .pipeline import evaluating
from .progressive import stage_steps
from .scheduler import ProgressiveDistillationScheduler
from .solvers import ddim_trajectory
from .training import GlobalBatchSampler, linear_decay_lr, step_generator


@torch.no_grad()
def guided_ddim_samples(unet, latents: torch.Tensor, *, scheduler_config, num_steps: int, text: torch.Tensor,
                        empty: torch.Tensor, guidance_scale: float, embedding_dim=None) -> torch.Tensor:
    """Latents of deterministic DDIM on the trailing N-step grid: a guidance-conditioned student at e(s - 1) (one call per
    step), or a plain teacher with classifier-free guidance at s (one batched call of 2B per step)."""
    batch = latents.shape[0]
    text = text.repeat((batch + len(text) - 1) // len(text), 1, 1)[:batch].to(latents.device)
    grid = student_grid(dict(scheduler_config), num_steps, "trailing")
    with evaluating(unet):
        denoiser = Denoiser(unet, scheduler_config)
        if embedding_dim is not None:
            cond = guidance_timestep_cond(guidance_scale, embedding_dim, batch_size=batch).to(latents.device)
            return ddim_trajectory(denoiser, latents, grid, encoder_hidden_states=text, timestep_cond=cond)[-1]
        uncond = {"encoder_hidden_states": empty.expand_as(text).to(latents.device)}
        return ddim_trajectory(GuidedDenoiser(denoiser), latents, grid, guidance_scale=guidance_scale, uncond=uncond,
                               encoder_hidden_states=text)[-1]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of latents z: vae.decode(z / scaling_factor) (as StableDiffusionPipeline decodes)."""
    parameter = next(vae.parameters())
    return vae.decode(latents.to(parameter.device, parameter.dtype) / vae.config.scaling_factor).sample.float()


class GuidedBatch(Batch):
    """One update: the global batch of cached latents and captions of `iteration`, its noise, timesteps and scales."""

    num_updates = 1

    def __init__(self, method: "GuidedDistillation", stage: Stage, iteration: int, teacher, ctx: LoopContext):
        self.method, self.stage, self.iteration, self.teacher, self.ctx = method, stage, iteration, teacher, ctx

    def loss(self, student, update: int, micro: int) -> torch.Tensor:
        method, ctx, stage = self.method, self.ctx, self.stage
        micro_step = method.micro_step(stage, self.iteration, micro, ctx)
        generator = step_generator(ctx.seed, micro_step)
        indices = ctx.rank_slice(torch.tensor(method.sampler.global_indices(micro_step)))
        latents, text = method.data.batch(indices, proportion_empty_prompts=method.proportion_empty_prompts,
                                          generator=step_generator(ctx.seed, micro_step, stream=1))
        latents, text = latents.to(ctx.device), text.to(ctx.device)
        shape = (ctx.global_batch_size, *latents.shape[1:])
        if stage.index == 0:
            noise, timesteps, scales = draw_guided_batch(
                shape, num_train_timesteps=method.num_train_timesteps, guidance_scale_min=method.guidance_scale_min,
                guidance_scale_max=method.guidance_scale_max, generator=generator)
            empty = method.data.empty_embedding.expand_as(text).to(ctx.device)
            return method.guided_loss(
                Denoiser(student, method.config), Denoiser(self.teacher, method.teacher_config), latents,
                ctx.rank_slice(noise).to(ctx.device), ctx.rank_slice(timesteps).to(ctx.device),
                ctx.rank_slice(scales).to(ctx.device),
                cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty})
        noise, grid_indices = draw_noise_and_grid_indices(shape, stage.steps[0], generator)
        scales = uniform_guidance_scales(shape[0], guidance_scale_min=method.guidance_scale_min,
                                         guidance_scale_max=method.guidance_scale_max, generator=generator)
        embedding = guidance_timestep_cond(ctx.rank_slice(scales), method.embedding_dim).to(ctx.device)
        cond = dict(encoder_hidden_states=text, timestep_cond=embedding)
        return method.loss_fn(RawOutput(student, **cond), RawOutput(self.teacher, **cond), latents,
                              ctx.rank_slice(noise).to(ctx.device), ctx.rank_slice(grid_indices))


class GuidedDistillation(DistillationMethod):
    """Guided distillation (stage one) then progressive halvings of a text-to-image teacher.

    Args:
        components: the teacher's `vae`, `text_encoder`, `tokenizer` (for export and sample grids).
        scheduler_config: the teacher's scheduler config (its schedule and prediction_type).
        data: `text_image_data.EncodedTextImageData`, the teacher's encodings of the training pairs.
        validation_text: text embeddings of the fixed prompts used for the fidelity columns and sample grids.
        guidance_scale_min, guidance_scale_max: the range of s (diffusers' scale) the students are trained for.
        guidance_iterations: updates of stage one; iterations_per_stage: updates per halving.
        start_steps, end_steps: stage one's student steps (= the first halving's teacher) and the last student's.
        prediction_type: the halved students' parameterization (stage one keeps the teacher's: it starts equal to it).
        embedding_dim: the guidance embedding's size (`time_cond_proj_dim`).
    """

    name = "guided"
    budget_flag = "--iterations_per_stage"

    def __init__(self, components: Mapping, scheduler_config: Mapping, data, validation_text: torch.Tensor, *,
                 guidance_scale_min: float, guidance_scale_max: float, guidance_iterations: int, iterations_per_stage: int,
                 start_steps: int, end_steps: int, prediction_type: str, loss_weighting: str, learning_rate: float,
                 embedding_dim: int = 256, proportion_empty_prompts: float = 0.0):
        check_guidance_range(guidance_scale_min, guidance_scale_max)
        self.halvings = stage_steps(start_steps, end_steps)
        self.components, self.data, self.validation_text = components, data, validation_text
        self.teacher_config = dict(scheduler_config)
        self.config = dict(scheduler_config)  # the current stage's teacher's
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.guidance_scale_min, self.guidance_scale_max = guidance_scale_min, guidance_scale_max
        self.validation_scale = (guidance_scale_min + guidance_scale_max) / 2
        self.guidance_iterations, self.iterations_per_stage = guidance_iterations, iterations_per_stage
        self.start_steps, self.end_steps, self.prediction_type = start_steps, end_steps, prediction_type
        self.loss_weighting, self.peak_learning_rate, self.embedding_dim = loss_weighting, learning_rate, embedding_dim
        self.proportion_empty_prompts = proportion_empty_prompts
        self.guided_loss = GuidedDistillationLoss(embedding_dim=embedding_dim, weighting=loss_weighting)

    def title(self, teacher: str) -> str:
        return (f"Guided distillation of {teacher}: s in [{self.guidance_scale_min}, {self.guidance_scale_max}], "
                f"{self.start_steps} -> {self.end_steps} steps")

    def stages(self) -> List[Stage]:
        first = Stage(0, f"guided: s in [{self.guidance_scale_min}, {self.guidance_scale_max}]", self.guidance_iterations,
                      (self.start_steps,))
        return [first] + [Stage(i + 1, f"{2 * n} -> {n}", self.iterations_per_stage, (n,)) for i, n in enumerate(self.halvings)]

    def resume_teacher(self, teacher, stage_index: int):
        """The architecture of stage `stage_index`'s teacher: after stage one, the guidance-conditioned student's."""
        return add_guidance_embedding(teacher, self.embedding_dim).eval() if stage_index > 0 else teacher

    def init_student(self, teacher, stage: Stage):
        """Stage one: the teacher with a zero-initialised guidance embedding (equal outputs); then a copy of the teacher."""
        if stage.index == 0:
            return add_guidance_embedding(teacher, self.embedding_dim).train().requires_grad_(True)
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def micro_step(self, stage: Stage, iteration: int, micro: int, ctx: LoopContext) -> int:
        """The global index of a micro-batch over the whole run (stage one first, then the halvings)."""
        before = 0 if stage.index == 0 else self.guidance_iterations + (stage.index - 1) * self.iterations_per_stage
        return (before + iteration) * ctx.gradient_accumulation_steps + micro

    def start_stage(self, stage: Stage, first_iteration: int, ctx: LoopContext) -> None:
        self.sampler = GlobalBatchSampler(len(self.data), ctx.batch_size, ctx.rank, ctx.num_processes, ctx.seed)
        if stage.index > 0:
            self.scheduler = ProgressiveDistillationScheduler.from_config(self.config, prediction_type=self.prediction_type)
            self.scheduler.set_timesteps(stage.steps[0])
            self.loss_fn = ProgressiveDistillationLoss(self.scheduler, self.loss_weighting, self.config["prediction_type"])

    def learning_rate(self, stage: Stage, iteration: int) -> float:
        return linear_decay_lr(iteration, stage.iterations, self.peak_learning_rate)

    def batch(self, stage: Stage, iteration: int, teacher, ctx: LoopContext) -> Batch:
        return GuidedBatch(self, stage, iteration, teacher, ctx)

    def sampler_for(self, config, num_steps: int, embedding_dim=None):
        """(unet, latents) -> latents of DDIM at `num_steps` on the validation prompts at the validation scale."""
        return partial(guided_ddim_samples, scheduler_config=config, num_steps=num_steps, text=self.validation_text,
                       empty=self.data.empty_embedding, guidance_scale=self.validation_scale, embedding_dim=embedding_dim)

    def save(self, folder, unet, num_steps: int, **kwargs):
        """A full stock StableDiffusionPipeline folder of the student (the teacher's vae, text encoder, tokenizer)."""
        kwargs.pop("teacher_prediction_type", None)
        return save_stock_sd_pipeline(folder, self.components, unet, num_steps, self.teacher_config,
                                      guidance_scale_min=self.guidance_scale_min, guidance_scale_max=self.guidance_scale_max,
                                      **kwargs)

    def finish_stage(self, stage: Stage, student) -> Tuple[torch.nn.Module, List[FinishedStudent]]:
        """The student becomes the next teacher; it is saved at its stage's step count."""
        num_steps = stage.steps[0]
        teacher_prediction_type = self.config["prediction_type"]
        if stage.index > 0:
            self.config = {**self.config, "prediction_type": self.prediction_type}
        finished = FinishedStudent(
            num_steps, student, None, sampler=self.sampler_for(self.config, num_steps, self.embedding_dim),
            saver=self.save, save_kwargs=dict(prediction_type=self.config["prediction_type"],
                                              teacher_prediction_type=teacher_prediction_type),
        )
        return student, [finished]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of sampled latents, for the sample grids."""
        return decode_latents(self.components["vae"], latents)

    def card_training(self, stage: Stage, global_batch: int) -> Dict[str, Any]:
        return {"updates": stage.iterations, "global batch size": global_batch,
                "learning rate": f"{self.peak_learning_rate} (linear decay to 0 per stage)", "loss weighting": self.loss_weighting,
                "guidance scale range": f"[{self.guidance_scale_min}, {self.guidance_scale_max}]"}

    def reference_sampler(self):
        """The teacher with classifier-free guidance at the validation scale, DDIM at `start_steps`."""
        return self.teacher_baseline(self.start_steps)

    def teacher_baseline(self, nfe: int):
        return self.sampler_for(self.teacher_config, nfe)

    def state(self) -> Dict[str, Any]:
        return {"guided_prediction_type": self.config["prediction_type"]}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.config = {**self.config, "prediction_type": state.get("guided_prediction_type", self.config["prediction_type"])}
