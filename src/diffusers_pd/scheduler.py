"""`ProgressiveDistillationScheduler`: exact deterministic DDIM on a student's N-step grid, and the
two-step distillation target of Algorithm 2 of Salimans & Ho (2022).

Notation (paper -> code), for a student with N steps on the "trailing" grid t_0 > t_1 > ... > t_{N-1}:

| paper                     | code                                                        |
|---------------------------|-------------------------------------------------------------|
| t                         | `timesteps` (a point t_k of the student's N-step grid)      |
| t' = t - 0.5/N            | `mid_timesteps` (the odd point 2k+1 of the teacher's 2N grid) |
| t'' = t - 1/N             | `next_timesteps` (t_{k+1}, or -1 = the clean sample)        |
| z_t, z_t', z_t''          | `sample`, `z_mid`, `z_next`                                 |
| x~                        | `x_target`                                                  |

The previous timestep is always read off the grid (never computed as t - T // N), so the step is exact
for every N, including num_train_timesteps % N != 0. Timestep -1 stands for the clean sample (alpha = 1, sigma = 0):
`next_timesteps` returns it after the last grid point and `alpha_sigma` accepts it; every other public method takes
integer timesteps 0 <= t < num_train_timesteps and raises for anything else.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.logging import get_logger
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import (
    check_prediction_type,
    ddim_noise_std,
    ddim_step,
    ddim_stochastic_step,
    output_from_x,
    x_eps_from_output,
    x_from_ddim_endpoints,
)
from .schedules import alpha_sigma_at, alphas_cumprod_from_config, betas_from_alphas_cumprod, broadcast_like, trailing_timesteps

logger = get_logger(__name__)

# Keys a stock DDIMScheduler needs to sample our grid; written into every config we save, explicitly (not as
# defaults), so `DDIMScheduler.from_config(our_config)` samples the same trailing, unclipped grid.
STOCK_SAMPLING_KEYS = {
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "thresholding": False,
}

# Settings of other diffusers schedulers that change what they sample, with the value this scheduler samples as.
# `from_config` logs each one a source config sets otherwise and writes ours in its place, so a compatible class
# built from our config samples our grid.
SAMPLING_SETTINGS = {
    **STOCK_SAMPLING_KEYS,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "final_sigmas_type": "zero",
}
# DDPM variance types that leave the model output's shape alone (a learned variance doubles its channels).
FIXED_VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
_REPORTED_SETTINGS = set()  # (key, repr(value)) pairs already logged by `from_config`: each is said once per process

# Private config key holding a student's metadata (step count, teacher, parameterizations, schedule).
# Private keys are ignored by every diffusers scheduler's __init__ but kept in its config and saved back.
METADATA_KEY = "_diffusers_pd"

TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ProgressiveDistillationSchedulerOutput(BaseOutput):
    """Output of `ProgressiveDistillationScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): z at the next point of the grid; the clean sample after the last step.
        pred_original_sample (`torch.Tensor`): x-hat, the model's prediction of the clean sample.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ProgressiveDistillationScheduler(SchedulerMixin, ConfigMixin):
    """DDIM on the N-step "trailing" grid (deterministic by default, `eta` as in `DDIMScheduler`), plus the
    progressive-distillation target.

    Accepts the scheduler config of any diffusers teacher (DDPM, DDIM, PNDM, DPM-Solver, ...): only the
    schedule keys and `prediction_type` are read; the sampling grid is always "trailing" (first step at
    the last train timestep, last step landing on the clean sample), x-hat is never clipped or thresholded.
    `from_config` logs (once per process, with diffusers' logger) each setting of the source that it drops although
    it changes sampling: `clip_sample=True`, `thresholding=True`, leading/linspace spacing, `steps_offset != 0`,
    `set_alpha_to_one=False`, Karras/exponential/beta sigmas, `final_sigmas_type`, a learned `variance_type`.

    Attributes: `alphas_cumprod` (float64, the table the step's math uses), `betas` and `alphas` (float32, as in
    diffusers; `cumprod(alphas)` equals `alphas_cumprod` to float32 precision), `timesteps`, `init_noise_sigma` (1).

    diffusers' `DDIMScheduler` test suite, pointed at this class, fails where this scheduler refuses by design:
    timesteps off the N-step grid (`time_step=0, 1, 10, 49` in `check_over_forward`; the step reads the next timestep
    off the grid, so off-grid timesteps have none: `ValueError`), the settings it does not take (`clip_sample`,
    `thresholding`, `timestep_spacing`, `steps_offset`, `set_alpha_to_one`: `TypeError` in `__init__`, logged by
    `from_config`), `rescale_betas_zero_snr=True` with its default `prediction_type="epsilon"` (x = (z - eps) / 0:
    `ValueError`), the private `_get_variance` (here `parameterization.ddim_noise_std`), and the stored full-loop
    numbers (computed with clipping and leading spacing). `tests/test_scheduler_contract.py` covers the rest of
    the contract (config round trips, compatible classes, step dict/tuple, add_noise dtypes and shapes,
    scale_model_input, set_timesteps bounds, eta > 0 against `DDIMScheduler`, a full loop against a float64
    reference).

    Args:
        num_train_timesteps (`int`): length T of the discrete schedule.
        beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the schedule, exactly as
            diffusers' schedulers read them (`linear`, `scaled_linear`, `squaredcos_cap_v2`, `sigmoid`).
        prediction_type (`str`): what the model predicts: `"epsilon"`, `"sample"` or `"v_prediction"`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ):
        check_prediction_type(prediction_type)
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        check_parameterization_fits_schedule(prediction_type, self.alphas_cumprod)
        self.betas = betas_from_alphas_cumprod(self.alphas_cumprod).float()
        self.alphas = 1.0 - self.betas
        self._write_sampling_settings({})
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from any diffusers scheduler config: every schedule value it holds is read (defaults included), and
        each setting it has that changes sampling and that this scheduler does not follow is logged, then replaced."""
        dropped = {}
        if isinstance(config, Mapping):
            # A stock from_config skips the keys the source left at ITS defaults (`_use_default_values`); the schedule
            # of a trained model is what its config says, whatever our defaults are.
            config = {key: value for key, value in config.items() if key != "_use_default_values"}
            dropped = dropped_sampling_settings({**config, **kwargs})
            log_dropped_settings(dropped)
        output = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = output[0] if isinstance(output, tuple) else output
        scheduler._write_sampling_settings(dropped)
        return output

    def _write_sampling_settings(self, dropped: Mapping[str, Any]):
        """Write our grid settings (and ours for each `dropped` one) into the config, every key explicit.

        Explicit means no `_use_default_values`: `OtherScheduler.from_config(our_config)` then reads our schedule and
        grid instead of its own defaults (HeunDiscreteScheduler's default betas differ from ours, for one).
        """
        self.register_to_config(**{**STOCK_SAMPLING_KEYS, **{k: SAMPLING_SETTINGS[k] for k in dropped if k in SAMPLING_SETTINGS}})
        self._internal_dict = FrozenDict({k: v for k, v in self._internal_dict.items() if k != "_use_default_values"})

    # ------------------------------------------------------------------ grid
    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        """Set the student's N-step trailing grid (N may be any integer 1 <= N <= num_train_timesteps)."""
        grid = trailing_timesteps(self.config.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)

    def _require_grid(self) -> int:
        """Return N, or raise if `set_timesteps` was not called."""
        if self.num_inference_steps is None:
            raise ValueError("Call `scheduler.set_timesteps(num_inference_steps)` first.")
        return self.num_inference_steps

    def checked_timesteps(self, timesteps, allow_clean: bool = False) -> torch.Tensor:
        """`timesteps` as a flat CPU long tensor; raise unless each is an integer 0 <= t < T (or -1 if `allow_clean`)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1).cpu()
        if timesteps.is_floating_point() and not torch.equal(timesteps, timesteps.round()):
            raise ValueError(
                f"Timesteps {timesteps.tolist()} are not integers: pass integer timesteps (e.g. `scheduler.timesteps`)."
            )
        timesteps = timesteps.long()
        num_train_timesteps = self.config.num_train_timesteps
        lowest = -1 if allow_clean else 0
        out_of_range = (timesteps < lowest) | (timesteps >= num_train_timesteps)
        if out_of_range.any():
            clean = " or -1 (the clean sample)" if allow_clean else ""
            raise ValueError(
                f"Timesteps {sorted(set(timesteps[out_of_range].tolist()))} are out of range: use integers "
                f"0 <= t < num_train_timesteps={num_train_timesteps}{clean}."
            )
        return timesteps

    def grid_index(self, timesteps) -> torch.Tensor:
        """Index k of each timestep on the current grid; one clear error for any timestep off it."""
        num_steps = self._require_grid()
        grid = self.timesteps.cpu()
        timesteps = self.checked_timesteps(timesteps)
        matches = timesteps[:, None] == grid[None, :]
        off_grid = ~matches.any(dim=1)
        if off_grid.any():
            raise ValueError(
                f"Timesteps {sorted(set(timesteps[off_grid].tolist()))} are not on the {num_steps}-step grid "
                f"{grid.tolist()}: take them from `scheduler.timesteps` after `set_timesteps({num_steps})`."
            )
        return matches.float().argmax(dim=1)

    def next_timesteps(self, timesteps) -> torch.Tensor:
        """The grid point after each timestep (t_{k+1}); -1, the clean sample, after the last one."""
        index = self.grid_index(timesteps)
        padded = torch.cat([self.timesteps.cpu(), torch.tensor([-1])])
        return padded[index + 1]

    def alpha_sigma(self, timesteps, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) per timestep (-1: the clean sample, (1, 0)), shaped to broadcast against `like`, on its
        device, in its dtype promoted to at least float32."""
        timesteps = self.checked_timesteps(timesteps, allow_clean=True)
        return broadcast_like(like, *alpha_sigma_at(self.alphas_cumprod, timesteps))

    # ------------------------------------------------------------------ diffusers API
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: DDIM needs no input scaling."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[ProgressiveDistillationSchedulerOutput, Tuple]:
        """One DDIM step from `timestep` to the next point of the grid, with `DDIMScheduler.step`'s signature.

        Args:
            eta (`float`): 0 (default) is deterministic DDIM, 1 DDPM's posterior noise: noise of standard deviation
                sigma_t(eta) (eq. 16 of DDIM) is added, drawn from `generator` exactly as `DDIMScheduler` draws it,
                or taken from `variance_noise`.
            use_clipped_model_output (`bool`): accepted for `DDIMScheduler` callers; it has no effect, since x-hat is
                never clipped here (as in `DDIMScheduler` with `clip_sample=False`).
        """
        # 0. refuse what the step cannot honour, before any work
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} is outside [0, 1]: 0 is deterministic DDIM, 1 is DDPM's posterior noise.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}: a model with a "
                "learned variance outputs twice the channels; pass its first half, model_output[:, :C]."
            )
        if eta > 0 and generator is not None and variance_noise is not None:
            raise ValueError("Pass either generator or variance_noise, not both: the noise comes from one of them.")
        if eta > 0 and variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(f"variance_noise has shape {tuple(variance_noise.shape)}; it needs {tuple(sample.shape)}.")
        # 1. previous timestep, read off the grid
        next_timestep = self.next_timesteps(timestep)
        # 2. alpha_t, sigma_t, alpha_s, sigma_s
        alpha_t, sigma_t = self.alpha_sigma(timestep, sample)
        alpha_s, sigma_s = self.alpha_sigma(next_timestep, sample)
        # 3. x-hat and eps-hat from the model output
        x, eps = x_eps_from_output(
            output=model_output.to(alpha_t.dtype),
            z=sample.to(alpha_t.dtype),
            alpha=alpha_t,
            sigma=sigma_t,
            prediction_type=self.config.prediction_type,
        )
        if eta == 0:
            # 4. z_s = alpha_s x-hat + sigma_s eps-hat
            prev_sample = ddim_step(x=x, eps=eps, alpha_s=alpha_s, sigma_s=sigma_s).to(sample.dtype)
        else:
            # 4. z_s = alpha_s x-hat + sqrt(sigma_s^2 - std^2) eps-hat + std noise, std = sigma_t(eta)
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            std = ddim_noise_std(alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s, eta=eta)
            noise = variance_noise.to(alpha_t.device, alpha_t.dtype)
            prev_sample = ddim_stochastic_step(x=x, eps=eps, noise=noise, alpha_s=alpha_s, sigma_s=sigma_s, std=std)
            prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, x.to(sample.dtype))
        return ProgressiveDistillationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x.to(sample.dtype))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """z_t = alpha_t x + sigma_t eps, for integer timesteps 0 <= t < num_train_timesteps (others raise)."""
        alpha, sigma = self.alpha_sigma(self.checked_timesteps(timesteps), original_samples)
        return (alpha * original_samples + sigma * noise).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v_t = alpha_t eps - sigma_t x (here `sample` is the clean x, as in diffusers); 0 <= t < T as in add_noise."""
        alpha, sigma = self.alpha_sigma(self.checked_timesteps(timesteps), sample)
        return (alpha * noise - sigma * sample).to(sample.dtype)

    def __len__(self):
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ distillation (Algorithm 2)
    def teacher_timesteps(self, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t', t''): the teacher's half-step and full-step points on the 2N grid for student points t."""
        num_steps = self._require_grid()
        num_train_timesteps = self.config.num_train_timesteps
        if 2 * num_steps > num_train_timesteps:
            raise ValueError(
                f"A {num_steps}-step student needs a {2 * num_steps}-step teacher grid, more than "
                f"num_train_timesteps={num_train_timesteps}: distill from at most {num_train_timesteps // 2} steps."
            )
        index = self.grid_index(timesteps)
        teacher_grid = torch.cat([torch.from_numpy(trailing_timesteps(num_train_timesteps, 2 * num_steps)), torch.tensor([-1])])
        return teacher_grid[2 * index + 1], teacher_grid[2 * index + 2]

    @torch.no_grad()
    def distillation_target_x(
        self,
        teacher: TeacherFn,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        teacher_prediction_type: Optional[str] = None,
    ) -> torch.Tensor:
        """x~ of Algorithm 2: the x-hat with which ONE student DDIM step from t reaches the teacher's two-step z_t''."""
        teacher_prediction_type = check_prediction_type(teacher_prediction_type or self.config.prediction_type)
        check_parameterization_fits_schedule(teacher_prediction_type, self.alphas_cumprod, who="teacher")
        mid_timesteps, next_timesteps = self.teacher_timesteps(timesteps)
        timesteps = torch.as_tensor(timesteps).reshape(-1).to(sample.device)
        alpha, sigma = self.alpha_sigma(timesteps, sample)
        alpha_mid, sigma_mid = self.alpha_sigma(mid_timesteps, sample)
        alpha_next, sigma_next = self.alpha_sigma(next_timesteps, sample)
        z = sample.to(alpha.dtype)

        # 1. teacher DDIM step t -> t'
        x, eps = self._teacher_x_eps(teacher, z, timesteps, alpha, sigma, teacher_prediction_type)
        z_mid = ddim_step(x=x, eps=eps, alpha_s=alpha_mid, sigma_s=sigma_mid)
        # 2. teacher DDIM step t' -> t''
        x_mid, eps_mid = self._teacher_x_eps(
            teacher, z_mid, mid_timesteps.to(sample.device), alpha_mid, sigma_mid, teacher_prediction_type
        )
        z_next = ddim_step(x=x_mid, eps=eps_mid, alpha_s=alpha_next, sigma_s=sigma_next)
        # 3. invert one student step t -> t''; at the last step (sigma_t'' = 0) it is the teacher's own x-hat at t'
        x_target = x_from_ddim_endpoints(
            z_t=z, z_s=z_next, alpha_t=alpha, sigma_t=sigma, alpha_s=alpha_next, sigma_s=sigma_next
        )
        return torch.where(sigma_next == 0, x_mid, x_target)

    @staticmethod
    def _teacher_x_eps(teacher, z, timesteps, alpha, sigma, prediction_type):
        """(x-hat, eps-hat) of one teacher evaluation at (z, t)."""
        output = teacher(z.to(torch.promote_types(z.dtype, torch.float32)), timesteps)
        return x_eps_from_output(
            output=output.to(z.dtype), z=z, alpha=alpha, sigma=sigma, prediction_type=prediction_type
        )

    def distillation_target(
        self,
        teacher: TeacherFn,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        teacher_prediction_type: Optional[str] = None,
    ) -> torch.Tensor:
        """The student's regression target at (z_t, t), in the student's `prediction_type`.

        The scheduler is set to the STUDENT's N steps; `timesteps` are points of that grid (one per batch element);
        `teacher(x, t)` returns the teacher's raw output in `teacher_prediction_type` (default: the scheduler's).
        The teacher takes two DDIM half-steps on the 2N grid (t -> t' -> t''); the target is the output with which
        one student DDIM step t -> t'' lands on the teacher's z_t'' (at the last step: the teacher's x-hat at t').
        """
        x_target = self.distillation_target_x(teacher, sample, timesteps, teacher_prediction_type)
        alpha, sigma = self.alpha_sigma(timesteps, sample)
        target = output_from_x(
            x=x_target, z=sample.to(alpha.dtype), alpha=alpha, sigma=sigma, prediction_type=self.config.prediction_type
        )
        return target.to(torch.promote_types(sample.dtype, torch.float32))


def dropped_sampling_settings(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings of a scheduler `config` that change what it samples and that this scheduler does not follow."""
    dropped = {key: config[key] for key, ours in SAMPLING_SETTINGS.items() if key in config and config[key] != ours}
    if config.get("variance_type") not in FIXED_VARIANCE_TYPES:
        dropped["variance_type"] = config["variance_type"]
    return dropped


def log_dropped_settings(dropped: Mapping[str, Any]) -> None:
    """One warning naming each dropped setting with its value; a (setting, value) pair already logged is not repeated."""
    new = {key: value for key, value in dropped.items() if (key, repr(value)) not in _REPORTED_SETTINGS}
    if not new:
        return
    _REPORTED_SETTINGS.update((key, repr(value)) for key, value in new.items())
    logger.warning(
        "ProgressiveDistillationScheduler samples DDIM on the trailing grid, unclipped, landing on the clean sample; "
        "it drops these settings of the source config, which change sampling: %s.",
        ", ".join(f"{key}={value!r}" for key, value in new.items()),
    )


def check_parameterization_fits_schedule(prediction_type: str, alphas_cumprod: torch.Tensor, who: str = "model"):
    """Raise if an epsilon-prediction model is used where the schedule reaches zero SNR (x = (z - sigma eps) / 0)."""
    if prediction_type == "epsilon" and alphas_cumprod[-1] == 0:
        raise ValueError(
            f"An epsilon-prediction {who} cannot denoise at zero terminal SNR (alpha_T = 0): "
            "use prediction_type='v_prediction' (or 'sample'), or a schedule without rescale_betas_zero_snr."
        )
