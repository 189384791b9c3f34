"""diffusers_pd: progressive distillation and SFD for Hugging Face diffusers.

The public names are imported on first use (as diffusers does), so `import diffusers_pd.arguments` costs no torch
or diffusers import and a script answers `--help` at once.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "save_student": "export", "save_stock_sd_pipeline": "export", "stock_scheduler_for": "export", "student_metadata": "export",
    "ProgressiveDistillationPipeline": "pipeline", "denoise": "pipeline", "initial_noise": "pipeline",
    "student_steps": "pipeline",
    "ProgressiveDistillationScheduler": "scheduler", "ProgressiveDistillationSchedulerOutput": "scheduler",
    "alphas_cumprod_from_config": "schedules", "cosine_logsnr": "schedules", "cosine_trained_betas": "schedules",
    "trailing_timesteps": "schedules",
    "GuidedDistillationLoss": "guided_distillation", "draw_guided_batch": "guided_distillation",
    "uniform_guidance_scales": "guided_distillation",
    "load_sd_teacher": "loading",
    "EncodedTextImageData": "text_image_data", "drop_captions": "text_image_data", "encode_prompts": "text_image_data",
    "encode_text_image_dataset": "text_image_data", "load_text_image_dataset": "text_image_data",
    "Denoiser": "denoiser", "GuidedDenoiser": "denoiser",
    "add_guidance_embedding": "guidance", "cfg_combine": "guidance", "check_guidance_range": "guidance",
    "fold_guidance_embedding": "guidance", "guidance_scale_embedding": "guidance", "guidance_timestep_cond": "guidance",
    "null_class_labels": "guidance",
    "GRID_KINDS": "grids", "Grid": "grids", "nested_indices": "grids", "student_grid": "grids", "teacher_grid": "grids",
    "SFDLoss": "sfd", "check_nfe": "sfd", "sfd_sample": "sfd", "sfd_student_samples": "sfd", "step_count_cond": "sfd",
    "TEACHER_SOLVERS": "solvers", "ddim_trajectory": "solvers", "dpm_solver_pp_trajectory": "solvers",
    "heun_trajectory": "solvers", "solve": "solvers",
    "add_step_embedding": "step_embedding", "fold_step_embedding": "step_embedding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module of a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
