"""Classifier-free guidance (CFG) and the guidance-scale input of a guidance-conditioned student.

Convention (diffusers', `StableDiffusionPipeline`): the guided prediction at scale s is

    D_s = D_u + s (D_c - D_u)        (s = 1: the conditional prediction; s = 0: the unconditional one)

An affine combination (weights 1 - s and s sum to 1), so combining x-hat, eps-hat or v-hat gives the same guided
prediction: x_from_eps(z, eps_s) = x_s exactly in exact arithmetic. `GuidedDenoiser` combines x-hat and eps-hat
alike; for an eps-prediction teacher eps_s is the pipeline's `noise_pred` itself.

A guidance-conditioned student (Meng et al. 2023) takes s through `UNet2DConditionModel`'s `timestep_cond`:
`time_embedding.cond_proj` (a bias-free linear map of dimension `time_cond_proj_dim`) adds P c to the sinusoidal
timestep embedding before `linear_1`, with c = `guidance_scale_embedding(s - 1)` exactly as `StableDiffusionPipeline`
and `LatentConsistencyModelPipeline` feed it (the pipeline then skips its unconditional batch: one call per step).
"""

import torch


def cfg_combine(*, uncond, cond, guidance_scale):
    """D_s = D_u + s (D_c - D_u), computed as D_c + (s - 1)(D_c - D_u) so that s = 1 returns D_c exactly."""
    guidance_scale = torch.as_tensor(guidance_scale, dtype=cond.dtype, device=cond.device)
    if guidance_scale.ndim == 1:  # one scale per sample
        guidance_scale = guidance_scale.reshape((-1,) + (1,) * (cond.ndim - 1))
    return cond + (guidance_scale - 1) * (cond - uncond)
