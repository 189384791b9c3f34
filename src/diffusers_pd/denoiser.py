"""`Denoiser`: the seam between a diffusers UNet and the methods and solvers (see DESIGN.md).

It hides which UNet it wraps, which extra inputs it takes (`class_labels`, ...), what the network predicts
(`prediction_type`) and the schedule: methods and solvers only call

    x_hat, eps_hat = denoiser(z, t, alpha=alpha, sigma=sigma, **cond)

at a possibly FRACTIONAL timestep t. Without `alpha`/`sigma` the pair is the schedule's at t (log-sigma
interpolation between table entries, exactly as diffusers' `_sigma_to_t` maps sigma -> t; the table entries
themselves at integer t). With them, the caller's pair is used to read the network output: a grid built by a
stock scheduler (Karras: rounded integer timesteps for the network, exact sigmas for the step) passes its own.
"""

from typing import Mapping, Optional, Tuple, Union

import torch

from .guidance import cfg_combine
from .parameterization import check_prediction_type, clip_x_eps, x_eps_from_output
from .scheduler import check_parameterization_fits_schedule
from .schedules import alpha_sigma_interpolated, alphas_cumprod_from_config, broadcast_like


class Denoiser:
    """D(z, t, cond) -> (x-hat, eps-hat) for any diffusers UNet (or a wrapper such as DDP) and its VP schedule.

    `cond` is the UNet's own keyword inputs: `class_labels` (class-conditional `UNet2DModel`),
    `encoder_hidden_states` and `timestep_cond` (`UNet2DConditionModel`); floating-point ones are cast to the
    UNet's dtype (a half-precision teacher takes float32 text embeddings).

    Args:
        unet: the network, called as `unet(z, timesteps, **cond).sample` with float timesteps of shape (batch,).
        scheduler_config: a diffusers scheduler config (the schedule keys and, unless given, `prediction_type`).
        prediction_type: what the network predicts: `"epsilon"`, `"sample"` or `"v_prediction"`.
    """

    def __init__(self, unet: torch.nn.Module, scheduler_config: Mapping, prediction_type: Optional[str] = None):
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type or scheduler_config["prediction_type"])
        self.alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
        check_parameterization_fits_schedule(self.prediction_type, self.alphas_cumprod)

    def alpha_sigma(self, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64 at any timestep in [0, T - 1] (fractional ones interpolated) or -1 (clean)."""
        return alpha_sigma_interpolated(self.alphas_cumprod, timesteps)

    def __call__(
        self,
        z: torch.Tensor,
        timesteps: Union[float, torch.Tensor],
        *,
        alpha: Optional[Union[float, torch.Tensor]] = None,
        sigma: Optional[Union[float, torch.Tensor]] = None,
        **cond,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x-hat, eps-hat) of one network call at (z, t): x_eps_from_output(unet(z, t, **cond), z, alpha_t, sigma_t)."""
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        if alpha is None or sigma is None:
            alpha, sigma = self.alpha_sigma(timesteps)
        alpha, sigma = broadcast_like(z, alpha, sigma)
        dtype = alpha.dtype
        model_dtype = next(self.unet.parameters()).dtype
        model_timesteps = timesteps.to(z.device, torch.float32).expand(z.shape[0])
        cond = {key: value.to(model_dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                for key, value in cond.items()}
        output = self.unet(z.to(model_dtype), model_timesteps, **cond).sample
        return x_eps_from_output(
            output=output.to(dtype), z=z.to(dtype), alpha=alpha, sigma=sigma, prediction_type=self.prediction_type
        )


def repeat_per_sample(value, batch_size: int):
    """`value` (None, a scalar or one entry per sample) for a batch stacked twice: per-sample entries repeated."""
    if value is None:
        return None
    value = torch.as_tensor(value)
    if value.numel() > 1 and value.numel() != batch_size:
        raise ValueError(f"Expected one value or {batch_size} (one per sample), got {value.numel()}.")
    return value.reshape(-1).repeat(2) if value.numel() > 1 else value


class GuidedDenoiser:
    """Classifier-free guidance of a conditional `Denoiser` as ONE batched forward:
    D_s(z, t, c) = D(z, t, u) + s (D(z, t, c) - D(z, t, u)), x-hat and eps-hat combined alike (see guidance.py).

    Called as `guided(z, t, guidance_scale=s, uncond={...}, alpha=..., sigma=..., **cond)`: the network sees
    [z; z] with [uncond[k]; cond[k]] for every key of `uncond` (the null text embeddings or the null class label)
    and [cond[k]; cond[k]] for the other keys of `cond` (inputs both halves share). `guidance_scale` is a number
    or one per sample. Solvers pass `guidance_scale` and `uncond` through like any other condition.

    `clip_range` r (a teacher whose scheduler config clips, `clipping.teacher_clip_range`): the GUIDED x-hat is clamped,
    x_s = clamp(x_u + s (x_c - x_u), -r, r), and eps-hat re-derived from it (`clip_x_eps`), as diffusers clamps the
    x-hat of the guided noise prediction (not each half; at s = 1 the conditional x-hat, as `ClippedTeacher`'s).
    """

    def __init__(self, denoiser: Denoiser, clip_range: Optional[float] = None):
        self.denoiser = denoiser
        self.clip_range = clip_range

    def alpha_sigma(self, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """The wrapped denoiser's (alpha_t, sigma_t)."""
        return self.denoiser.alpha_sigma(timesteps)

    def __call__(
        self,
        z: torch.Tensor,
        timesteps: Union[float, torch.Tensor],
        *,
        guidance_scale: Union[float, torch.Tensor],
        uncond: Mapping[str, torch.Tensor],
        alpha: Optional[Union[float, torch.Tensor]] = None,
        sigma: Optional[Union[float, torch.Tensor]] = None,
        **cond,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x-hat, eps-hat) of the guided prediction at scale s (x-hat clamped with `clip_range`) from one network call on
        the doubled batch."""
        if not uncond or set(uncond) - set(cond):
            raise ValueError(
                f"uncond must give the unconditional value of some of the conditions {sorted(cond)}, got {sorted(uncond)}: "
                "pass e.g. uncond={'encoder_hidden_states': empty_prompt_embeds} or {'class_labels': null_labels}."
            )
        batch = z.shape[0]
        both = {key: torch.cat([uncond.get(key, value), value]) for key, value in cond.items()}
        x, eps = self.denoiser(
            torch.cat([z, z]), repeat_per_sample(timesteps, batch),
            alpha=repeat_per_sample(alpha, batch), sigma=repeat_per_sample(sigma, batch), **both,
        )
        (x_u, x_c), (eps_u, eps_c) = x.chunk(2), eps.chunk(2)
        x = cfg_combine(uncond=x_u, cond=x_c, guidance_scale=guidance_scale)
        eps = cfg_combine(uncond=eps_u, cond=eps_c, guidance_scale=guidance_scale)
        if self.clip_range is None:
            return x, eps
        if alpha is None or sigma is None:
            alpha, sigma = self.alpha_sigma(torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu())
        alpha, sigma = broadcast_like(x, alpha, sigma, dtype=x.dtype)
        return clip_x_eps(x=x, z=z.to(x.dtype), alpha=alpha, sigma=sigma, clip_range=self.clip_range)
