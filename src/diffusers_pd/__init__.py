"""diffusers_pd: progressive distillation and SFD for Hugging Face diffusers."""

__version__ = "0.1.0"

from .denoiser import Denoiser
from .export import save_student, stock_scheduler_for, student_metadata
from .grids import GRID_KINDS, Grid, nested_indices, student_grid, teacher_grid
from .pipeline import ProgressiveDistillationPipeline, denoise, initial_noise, student_steps
from .scheduler import ProgressiveDistillationScheduler, ProgressiveDistillationSchedulerOutput
from .schedules import alphas_cumprod_from_config, cosine_logsnr, cosine_trained_betas, trailing_timesteps
from .sfd import SFDLoss, check_nfe, sfd_sample, step_count_cond
from .solvers import TEACHER_SOLVERS, ddim_trajectory, dpm_solver_pp_trajectory, heun_trajectory, solve
from .step_embedding import add_step_embedding, fold_step_embedding

__all__ = [
    "Denoiser",
    "GRID_KINDS",
    "Grid",
    "ProgressiveDistillationPipeline",
    "ProgressiveDistillationScheduler",
    "ProgressiveDistillationSchedulerOutput",
    "SFDLoss",
    "TEACHER_SOLVERS",
    "add_step_embedding",
    "alphas_cumprod_from_config",
    "check_nfe",
    "cosine_logsnr",
    "cosine_trained_betas",
    "ddim_trajectory",
    "denoise",
    "dpm_solver_pp_trajectory",
    "fold_step_embedding",
    "heun_trajectory",
    "initial_noise",
    "nested_indices",
    "save_student",
    "sfd_sample",
    "solve",
    "step_count_cond",
    "stock_scheduler_for",
    "student_grid",
    "student_metadata",
    "student_steps",
    "teacher_grid",
    "trailing_timesteps",
]
