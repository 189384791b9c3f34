"""The teacher's x-hat clipping (the `clip_sample` of its scheduler config), applied to the TEACHER's outputs only.

Hub DDPM checkpoints (eps prediction, T = 1000) ship `DDPMScheduler` configs with `clip_sample=True`: diffusers samples
them with x-hat clamped to [-1, 1]. Unclipped, x-hat = (z - sigma eps-hat) / alpha multiplies the eps error by
1 / alpha at the first trailing timestep: 157x on linear T = 1000, 15x on scaled_linear, 20,000x on
squaredcos_cap_v2. Measured on 64-step trailing DDIM, 64 samples: the Fashion-MNIST linear eps teacher has 24% of
its pixels outside [-1.05, 1.05] unclipped (0% clipped), yet its distillation keeps every stage below its own DDIM
(benchmarks/results/fashion-mnist-eps/); a digits squaredcos_cap_v2 eps teacher reaches |x| = 2,600 unclipped and
nothing distils. `ClippedTeacher` makes the teacher's output mean clamp(x-hat) at every call, so its DDIM steps (the
two-step targets, the fidelity references and the teacher's DDIM baselines) are diffusers' DDIM with
`clip_sample=True, use_clipped_model_output=True` on the trailing grid. Students are never clipped: they are saved
for, and sampled by, stock unclipped schedulers (an eps student on such a schedule breaks there too, so
`parameterization.stage_plan` gives it v from the first stage). `--teacher_clip_sample auto` (the default) clips
where the config says `clip_sample` AND the teacher `epsilon_breaks_at_first_step`; `on` / `off` force it. Every
method reads it, for the ORIGINAL teacher only; one more clamp is progressive distillation's: under `auto`, an eps
`clip_sample` teacher that does not break there (the Hub DDPM shape, linear T = 1000) keeps its eps stages and
references unclamped (every stage below the teacher's DDIM) and has the teacher of the halving where its students
leave eps clamped (`switch_clip_range`: on the Fashion-MNIST eps teacher its 4 / 2 / 1-step students' FID measured
in benchmarks/results/fashion-mnist-eps/results.md). The ORIGINAL teacher's clamp: progressive distillation clips
its DDIM steps, SFD its solver's trajectories (the data prediction of DPM-Solver++ is the same x-hat; a conditional
teacher's at s = 1, `ClippedTeacher` passing class labels and text embeddings through), guided distillation its
classifier-free-guided x-hat AFTER the combination, clamp(x_u + s (x_c - x_u)), not each pass
(`GuidedDenoiser(clip_range=r)`: stage one's targets, the reference samples, the teacher's DDIM baselines; a first
halving without a guided stage is s = 1, `ClippedTeacher`).
"""

import inspect
from typing import Mapping, Optional

import diffusers
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from .parameterization import clip_output
from .schedules import alpha_sigma_interpolated, alphas_cumprod_from_config, broadcast_like

CLIP_MODES = ("auto", "on", "off")
# An epsilon teacher whose alpha at its last train timestep is below this breaks at the first trailing step: x-hat =
# (z - sigma eps) / alpha multiplies the eps error by > 1,000. Measured (benchmarks/results/eps-teacher-digits/,
# digits eps teachers, T = 1000): linear (alpha_T 0.0064, 157x) and scaled_linear (0.068) distil unclipped with every
# stage below the teacher's DDIM; squaredcos_cap_v2 (4.9e-5, 20,000x) does not even sample unclipped.
EPSILON_MIN_ALPHA = 1e-3


def epsilon_breaks_at_first_step(scheduler_config: Mapping) -> bool:
    """Whether an epsilon teacher's alpha at t = T - 1 is below EPSILON_MIN_ALPHA (its first trailing DDIM step
    amplifies eps errors by more than 1 / EPSILON_MIN_ALPHA)."""
    if scheduler_config.get("prediction_type") != "epsilon":
        return False
    return float(alphas_cumprod_from_config(scheduler_config)[-1].sqrt()) < EPSILON_MIN_ALPHA


def class_default(scheduler_config: Mapping, key: str, fallback=None):
    """`key` of a scheduler config, or the default of its `_class_name`'s __init__ when the file leaves it out."""
    if key in scheduler_config:
        return scheduler_config[key]
    cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    parameter = inspect.signature(cls.__init__).parameters.get(key) if cls is not None else None
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def teacher_clip_range(scheduler_config: Mapping, mode: str = "auto") -> Optional[float]:
    """The range r the teacher's x-hat is clamped to ("on"; "auto": where its config says `clip_sample` and it is an
    epsilon teacher that `epsilon_breaks_at_first_step`), or None."""
    if mode not in CLIP_MODES:
        raise ValueError(f"--teacher_clip_sample {mode!r}: choose one of {', '.join(CLIP_MODES)}.")
    auto = class_default(scheduler_config, "clip_sample", False) and epsilon_breaks_at_first_step(scheduler_config)
    if mode == "off" or (mode == "auto" and not auto):
        return None
    return config_clip_range(scheduler_config)


def config_clip_range(scheduler_config: Mapping) -> float:
    """The config's `clip_sample_range` (1.0 where it leaves it out); one clear error if it is not positive."""
    clip_range = float(class_default(scheduler_config, "clip_sample_range", 1.0))
    if clip_range <= 0:
        raise ValueError(f"clip_sample_range {clip_range} of the teacher's scheduler config must be positive.")
    return clip_range


def left_unclamped(scheduler_config: Mapping, mode: str = "auto") -> bool:
    """True for an eps teacher whose config says `clip_sample` (diffusers clamps its x-hat) that `mode` "auto" leaves
    unclamped."""
    if mode != "auto" or teacher_clip_range(scheduler_config, mode) is not None:
        return False
    return scheduler_config.get("prediction_type") == "epsilon" and bool(class_default(scheduler_config, "clip_sample", False))


def switch_clip_range(scheduler_config: Mapping, mode: str = "auto") -> Optional[float]:
    """The range r to which progressive distillation's "auto" clamps the teacher of the halving where the students of
    a `left_unclamped` eps teacher leave eps (the Hub DDPM shape: linear, clip_sample=True), or None."""
    return config_clip_range(scheduler_config) if left_unclamped(scheduler_config, mode) else None


def switch_clip_note(where: str) -> str:
    """The one-line warning of a progressive run whose teacher `auto` clamps only from stage `where` on (e.g. "the
    halving to 4 steps"; `switch_clip_range`): where only few-step students matter, clamping from the first stage
    measured better."""
    return ("The teacher's scheduler config says clip_sample=True (diffusers samples it with x-hat clamped): "
            f"--teacher_clip_sample auto distils it unclamped while its students keep eps and clamped from {where} on, "
            "where they switch to v (every stage below the teacher's own DDIM). If only students "
            "of 4 steps or fewer matter, pass --teacher_clip_sample on (clamped, v students from the first stage): on "
            "the Fashion-MNIST eps benchmark teacher its 4 / 2 / 1-step students reached FID 66.00 / 78.29 / 89.35 "
            "against auto's 90.40 / 96.78 / 105.21 (benchmarks/results/fashion-mnist-eps/results.md).")


def clipped_teacher(unet: torch.nn.Module, scheduler_config: Mapping, clip_range: Optional[float]) -> torch.nn.Module:
    """`unet` with its x-hat clamped to [-clip_range, clip_range] (`ClippedTeacher`), or `unet` itself for None."""
    return ClippedTeacher(unet, scheduler_config, clip_range) if clip_range else unet


def clip_card_row(clip_range: Optional[float]) -> str:
    """The model card's "teacher x-hat" row."""
    return f"clamped to [-{clip_range:g}, {clip_range:g}] (its clip_sample)" if clip_range else "unclipped"


class ClippedTeacher(torch.nn.Module):
    """A UNet whose output means clamp(x-hat, -clip_range, clip_range) at each call (`clip_output` on the schedule of
    `scheduler_config`, at any, possibly fractional, timestep); called and read like the UNet it wraps."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: Mapping, clip_range: float):
        super().__init__()
        self.unet = unet
        self.prediction_type = scheduler_config["prediction_type"]
        self.alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
        self.clip_range = clip_range

    @property
    def config(self):
        """The wrapped UNet's config."""
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        """The wrapped UNet's dtype."""
        return next(self.unet.parameters()).dtype

    def forward(self, sample: torch.Tensor, timestep, *args, **kwargs) -> UNet2DOutput:
        """The UNet's output at (sample, timestep), re-expressed so that its x-hat is clamped."""
        output = self.unet(sample, timestep, *args, **kwargs).sample
        timesteps = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        alpha, sigma = alpha_sigma_interpolated(self.alphas_cumprod, timesteps)
        dtype = torch.promote_types(output.dtype, torch.float32)
        alpha, sigma = broadcast_like(sample, alpha, sigma, dtype=dtype)
        clipped = clip_output(output=output.to(dtype), z=sample.to(dtype), alpha=alpha, sigma=sigma,
                              prediction_type=self.prediction_type, clip_range=self.clip_range)
        return UNet2DOutput(sample=clipped.to(output.dtype))
