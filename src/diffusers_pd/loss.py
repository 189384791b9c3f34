"""Training losses as small objects (as in NVlabs EDM): hyperparameters in `__init__`, `__call__` returns the
UNREDUCED per-sample loss. Reduction, optimizer, accelerate and logging belong to the training loop.

Both losses are the weighted x-space MSE  w(lambda_t) * ||x-hat - x_target||^2  (mean over pixels), whatever the
network predicts: with `snr_plus_one` weighting this equals the v-MSE, with `truncated_snr` it is max(SNR, 1).
"""

from typing import Callable, Optional

import torch

from .parameterization import check_prediction_type, loss_weight, x_eps_from_output
from .scheduler import ProgressiveDistillationScheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RawOutput:
    """Callable (z, t) -> the raw output tensor of a diffusers UNet (which returns a `UNet2DOutput`), passing the fixed
    keyword conditions `cond` of one batch on every call (`class_labels`; `encoder_hidden_states`, `timestep_cond`):
    with them the losses below distil conditional and guidance-conditioned models unchanged (guided stage two)."""

    def __init__(self, unet: torch.nn.Module, **cond):
        self.unet = unet
        self.cond = cond

    def __call__(self, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timesteps, **self.cond).sample


def weighted_x_mse(*, x_hat, x_target, alpha, sigma, weighting: str) -> torch.Tensor:
    """Per-sample w(lambda) * mean over pixels of (x-hat - x_target)^2."""
    weight = loss_weight(alpha=alpha, sigma=sigma, weighting=weighting).reshape(-1)
    return weight * (x_hat.float() - x_target.float()).pow(2).flatten(1).mean(dim=1)


def draw_noise_and_grid_indices(shape, num_steps: int, generator: Optional[torch.Generator] = None, device=None):
    """(eps ~ N(0, I) of `shape`, uniform grid indices k in [0, num_steps)): the randomness of one training batch."""
    noise = torch.randn(shape, generator=generator)
    indices = torch.randint(num_steps, (shape[0],), generator=generator)
    return noise.to(device), indices


class DiffusionLoss:
    """Algorithm 1 of Salimans & Ho (2022): denoising loss on z_t = alpha_t x + sigma_t eps, t uniform on the table.

    Args:
        scheduler: a `ProgressiveDistillationScheduler` holding the schedule (any `num_train_timesteps`).
        weighting: `"truncated_snr"` (max(SNR, 1)), `"snr_plus_one"` (= v-MSE), `"snr"` (= eps-MSE) or `"constant"`.
    """

    def __init__(self, scheduler: ProgressiveDistillationScheduler, weighting: str = "snr_plus_one"):
        loss_weight(alpha=torch.ones(1), sigma=torch.ones(1), weighting=weighting)  # validate early
        self.scheduler = scheduler
        self.weighting = weighting

    def __call__(self, net: ModelFn, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss of `net(z_t, t)` (raw output in the scheduler's prediction_type)."""
        timesteps = timesteps.to(images.device)
        alpha, sigma = self.scheduler.alpha_sigma(timesteps, images)
        z = alpha * images + sigma * noise
        x_hat, _ = x_eps_from_output(
            output=net(z.to(images.dtype), timesteps).to(alpha.dtype),
            z=z, alpha=alpha, sigma=sigma, prediction_type=self.scheduler.config.prediction_type,
        )
        return weighted_x_mse(x_hat=x_hat, x_target=images, alpha=alpha, sigma=sigma, weighting=self.weighting)


class ProgressiveDistillationLoss:
    """Algorithm 2 of Salimans & Ho (2022): regress the student's one-step x-hat on the teacher's two-step target.

    Args:
        scheduler: a `ProgressiveDistillationScheduler` set to the STUDENT's N steps, in the student's prediction_type.
        weighting: `"truncated_snr"` (paper default) or `"snr_plus_one"`, ...
        teacher_prediction_type: what the teacher outputs (default: the student's).
    """

    def __init__(
        self,
        scheduler: ProgressiveDistillationScheduler,
        weighting: str = "truncated_snr",
        teacher_prediction_type: Optional[str] = None,
    ):
        loss_weight(alpha=torch.ones(1), sigma=torch.ones(1), weighting=weighting)  # validate early
        scheduler._require_grid()
        self.scheduler = scheduler
        self.weighting = weighting
        self.teacher_prediction_type = check_prediction_type(teacher_prediction_type or scheduler.config.prediction_type)

    def __call__(
        self, student: ModelFn, teacher: ModelFn, images: torch.Tensor, noise: torch.Tensor, grid_indices: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample loss at z_t = alpha_t x + sigma_t eps for t = the student's grid points `grid_indices`."""
        timesteps = self.scheduler.timesteps.cpu()[grid_indices.cpu()].to(images.device)
        alpha, sigma = self.scheduler.alpha_sigma(timesteps, images)
        z = (alpha * images + sigma * noise).to(images.dtype)
        x_target = self.target_x(teacher, z, timesteps)
        x_hat, _ = x_eps_from_output(
            output=student(z, timesteps).to(alpha.dtype),
            z=z.to(alpha.dtype), alpha=alpha, sigma=sigma, prediction_type=self.scheduler.config.prediction_type,
        )
        return weighted_x_mse(x_hat=x_hat, x_target=x_target, alpha=alpha, sigma=sigma, weighting=self.weighting)

    def target_x(self, teacher: ModelFn, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x~ of Algorithm 2: two teacher DDIM steps t -> t' -> t'', inverted to one student step t -> t''."""
        return self.scheduler.distillation_target_x(teacher, z, timesteps, self.teacher_prediction_type)


class ParameterizationConversionLoss(ProgressiveDistillationLoss):
    """Move a student to another parameterization without changing what it samples: regress its x-hat at (z_t, t)
    on the teacher's x-hat (ONE teacher call per sample), t on the N-step grid the teacher samples with.

    Same arguments and call as `ProgressiveDistillationLoss` (the scheduler is set to the TEACHER's N steps), so a
    training loop runs it as one more stage.
    """

    @torch.no_grad()
    def target_x(self, teacher: ModelFn, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The teacher's own x-hat at (z_t, t)."""
        alpha, sigma = self.scheduler.alpha_sigma(timesteps, z)
        x, _ = self.scheduler._teacher_x_eps(teacher, z.to(alpha.dtype), timesteps, alpha, sigma, self.teacher_prediction_type)
        return x
