"""diffusers_pd: progressive distillation and SFD for Hugging Face diffusers."""

__version__ = "0.1.0"

from .export import save_student, stock_scheduler_for, student_metadata
from .pipeline import ProgressiveDistillationPipeline, denoise, initial_noise, student_steps
from .scheduler import ProgressiveDistillationScheduler, ProgressiveDistillationSchedulerOutput
from .schedules import alphas_cumprod_from_config, cosine_logsnr, cosine_trained_betas, trailing_timesteps

__all__ = [
    "ProgressiveDistillationPipeline",
    "ProgressiveDistillationScheduler",
    "ProgressiveDistillationSchedulerOutput",
    "alphas_cumprod_from_config",
    "cosine_logsnr",
    "cosine_trained_betas",
    "denoise",
    "initial_noise",
    "save_student",
    "stock_scheduler_for",
    "student_metadata",
    "student_steps",
    "trailing_timesteps",
]
