"""Guided distillation, stage one (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023).

A guidance-conditioned student x-hat_eta(z_t, t, c, e(s - 1)) learns the teacher's classifier-free-guided prediction
at scale s, s drawn per sample from [s_min, s_max] and t from the whole table:

    L = w(lambda_t) || x-hat_eta(z_t, t, c, e(s - 1)) - x-hat^s_theta(z_t, t, c) ||^2,
    x-hat^s_theta = x-hat_theta(z_t, t, u) + s (x-hat_theta(z_t, t, c) - x-hat_theta(z_t, t, u)),

with z_t = alpha_t x + sigma_t eps (the target clamped to [-r, r] after the combination for a teacher whose scheduler
config clips, `teacher_clip_range`), e the guidance embedding as `StableDiffusionPipeline` feeds it (guidance.py),
and the teacher's conditional and unconditional passes as one batched forward (`GuidedDenoiser`). The loss object
returns the UNREDUCED per-sample loss (the EDM pattern of loss.py); stage two (halvings of the student, the teacher
side conditioned on the same s) reuses the progressive-distillation target with these conditions.
"""

from typing import Mapping, Optional

import torch

from .denoiser import Denoiser, GuidedDenoiser
from .guidance import check_guidance_range, guidance_timestep_cond
from .loss import weighted_x_mse
from .parameterization import loss_weight


def uniform_guidance_scales(batch_size: int, *, guidance_scale_min: float, guidance_scale_max: float,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """s = s_min + (s_max - s_min) u, u ~ U[0, 1), one per sample (float32)."""
    check_guidance_range(guidance_scale_min, guidance_scale_max)
    return guidance_scale_min + (guidance_scale_max - guidance_scale_min) * torch.rand(batch_size, generator=generator)


def draw_guided_batch(shape, *, num_train_timesteps: int, guidance_scale_min: float, guidance_scale_max: float,
                      generator: Optional[torch.Generator] = None, device=None):
    """(eps ~ N(0, I) of `shape`, t ~ U{0, ..., T - 1}, s ~ U[s_min, s_max]) per sample: one stage-one batch's randomness."""
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(num_train_timesteps, (shape[0],), generator=generator)
    scales = uniform_guidance_scales(shape[0], guidance_scale_min=guidance_scale_min, guidance_scale_max=guidance_scale_max,
                                     generator=generator)
    return noise.to(device), timesteps.to(device), scales.to(device)


class GuidedDistillationLoss:
    """Stage one of Meng et al. (2023): the student at e(s - 1) regresses the teacher's CFG x-hat at s (see the module).

    Args:
        embedding_dim: the student's `time_cond_proj_dim` (the guidance embedding's size); None: the caller passes the
            student's guidance input as `student_cond` (nothing for a student with the scale built in).
        weighting: w(lambda) of the x-space MSE: `"truncated_snr"` (max(SNR, 1), the paper's), `"snr_plus_one"`, ...
        teacher_clip_range: r of a teacher whose x-hat is clamped (`clipping.teacher_clip_range`): the target is
            clamp(x-hat^s_theta, -r, r), the guided x-hat clamped after the combination (`GuidedDenoiser`); None: unclamped.
    """

    def __init__(self, *, embedding_dim: Optional[int] = None, weighting: str = "truncated_snr",
                 teacher_clip_range: Optional[float] = None):
        loss_weight(alpha=torch.ones(1), sigma=torch.ones(1), weighting=weighting)  # validate early
        self.embedding_dim = embedding_dim
        self.weighting = weighting
        self.teacher_clip_range = teacher_clip_range

    def __call__(
        self,
        student: Denoiser,
        teacher: Denoiser,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        guidance_scales: torch.Tensor,
        *,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor],
        student_cond: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Per-sample loss at z_t = alpha_t x + sigma_t eps; `cond` / `uncond` are the teacher's conditional and null inputs
        (e.g. `encoder_hidden_states`), `cond` is also the student's, which further gets `student_cond` (default
        `timestep_cond` = e(s - 1) with `embedding_dim`)."""
        if not torch.equal(student.alphas_cumprod, teacher.alphas_cumprod):
            raise ValueError("The student's and the teacher's Denoiser must share one noise schedule: build both from the teacher's scheduler config.")
        alpha, sigma = teacher.alpha_sigma(torch.as_tensor(timesteps, dtype=torch.float64).cpu())
        shape = (-1,) + (1,) * (latents.ndim - 1)
        z = (alpha.reshape(shape).to(latents.device) * latents + sigma.reshape(shape).to(latents.device) * noise).to(latents.dtype)
        with torch.no_grad():
            x_target, _ = GuidedDenoiser(teacher, self.teacher_clip_range)(
                z, timesteps, alpha=alpha, sigma=sigma, guidance_scale=guidance_scales, uncond=uncond, **cond)
        if student_cond is None:
            student_cond = {} if self.embedding_dim is None else {"timestep_cond": guidance_timestep_cond(
                guidance_scales.cpu(), self.embedding_dim, batch_size=latents.shape[0]).to(latents.device)}
        x_hat, _ = student(z, timesteps, alpha=alpha, sigma=sigma, **cond, **student_cond)
        return weighted_x_mse(x_hat=x_hat, x_target=x_target, alpha=alpha.to(latents.device), sigma=sigma.to(latents.device),
                              weighting=self.weighting)


def guidance_response_ratio(*, student_s, student_1, teacher_s, teacher_1) -> float:
    """r(s) = ||y(s) - y(1)|| / ||D^s - D^1||: how much of the teacher's CFG change with s the student follows (1: all, 0: none)."""
    return float(torch.linalg.vector_norm((student_s - student_1).double())
                 / torch.linalg.vector_norm((teacher_s - teacher_1).double()))


def guidance_response_cosine(*, student_s, student_1, teacher_s, teacher_1) -> float:
    """cos(y(s) - y(1), D^s - D^1): whether the student's change with s points the teacher's way (r(s) alone does not say)."""
    student, teacher = (student_s - student_1).double().flatten(), (teacher_s - teacher_1).double().flatten()
    return float(student @ teacher / (torch.linalg.vector_norm(student) * torch.linalg.vector_norm(teacher)).clamp_min(1e-300))


def rms(tensor: torch.Tensor) -> float:
    """sqrt(mean(x^2))."""
    return float(tensor.double().pow(2).mean().sqrt())


@torch.no_grad()
def guidance_liveness(student: Denoiser, teacher: Denoiser, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      *, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], guidance_cond,
                      guidance_scales=(3.0, 5.0)) -> dict:
    """Is the student's guidance input live? On fixed z_t = alpha_t x + sigma_t eps, in eps-hat (unit scale at every t, any
    parameterization), for each s: r(s) (`guidance_response_ratio` against s = 1), the cosine of the two changes and the RMS error of the student at s
    to the teacher's CFG eps-hat at s (`guidance_cond(s, batch)`: the student's guidance input, e.g. the conditioning's)."""
    alpha, sigma = teacher.alpha_sigma(torch.as_tensor(timesteps, dtype=torch.float64).cpu())
    shape = (-1,) + (1,) * (latents.ndim - 1)
    z = (alpha.reshape(shape).to(latents) * latents + sigma.reshape(shape).to(latents) * noise).to(latents.dtype)

    def outputs(s):
        _, teacher_eps = GuidedDenoiser(teacher)(z, timesteps, alpha=alpha, sigma=sigma, guidance_scale=s, uncond=uncond, **cond)
        _, student_eps = student(z, timesteps, alpha=alpha, sigma=sigma, **cond, **guidance_cond(s, latents.shape[0]))
        return student_eps, teacher_eps

    student_1, teacher_1 = outputs(1.0)
    rows = {1.0: {"ratio": float("nan"), "cosine": float("nan"), "student_error": rms(student_1 - teacher_1), "teacher_change": 0.0}}
    for s in guidance_scales:
        student_s, teacher_s = outputs(float(s))
        pair = dict(student_s=student_s, student_1=student_1, teacher_s=teacher_s, teacher_1=teacher_1)
        rows[float(s)] = {"ratio": guidance_response_ratio(**pair), "cosine": guidance_response_cosine(**pair),
                          "student_error": rms(student_s - teacher_s), "teacher_change": rms(teacher_s - teacher_1)}
    return rows
