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

from .parameterization import check_prediction_type, x_eps_from_output
from .scheduler import check_parameterization_fits_schedule
from .schedules import alpha_sigma_interpolated, alphas_cumprod_from_config


class Denoiser:
    """D(z, t, cond) -> (x-hat, eps-hat) for any `UNet2DModel` (or a wrapper such as DDP) and its VP schedule.

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
        dtype = torch.promote_types(z.dtype, torch.float32)
        shape = (-1,) + (1,) * (z.ndim - 1)
        alpha = torch.as_tensor(alpha, dtype=dtype).reshape(shape).to(z.device)
        sigma = torch.as_tensor(sigma, dtype=dtype).reshape(shape).to(z.device)
        model_dtype = next(self.unet.parameters()).dtype
        model_timesteps = timesteps.to(z.device, torch.float32).expand(z.shape[0])
        output = self.unet(z.to(model_dtype), model_timesteps, **cond).sample
        return x_eps_from_output(
            output=output.to(dtype), z=z.to(dtype), alpha=alpha, sigma=sigma, prediction_type=self.prediction_type
        )
