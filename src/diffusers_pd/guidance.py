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

from .step_embedding import like, unet_config


def cfg_combine(*, uncond, cond, guidance_scale):
    """D_s = D_u + s (D_c - D_u), computed as D_c + (s - 1)(D_c - D_u) so that s = 1 returns D_c exactly."""
    guidance_scale = torch.as_tensor(guidance_scale, dtype=cond.dtype, device=cond.device)
    if guidance_scale.ndim == 1:  # one scale per sample
        guidance_scale = guidance_scale.reshape((-1,) + (1,) * (cond.ndim - 1))
    return cond + (guidance_scale - 1) * (cond - uncond)


def guided_model_output(unet, sample: torch.Tensor, timestep, *, guidance_scale, uncond, **cond) -> torch.Tensor:
    """u + s (c - u) of the raw outputs of ONE forward on the doubled batch [sample; sample] with [uncond; cond] for the
    keys of `uncond` (the others shared), as StableDiffusionPipeline guides its `noise_pred`."""
    both = {key: torch.cat([uncond.get(key, value), value]) for key, value in cond.items()}
    uncond_output, cond_output = unet(torch.cat([sample, sample]), timestep, **both).sample.chunk(2)
    return cfg_combine(uncond=uncond_output, cond=cond_output, guidance_scale=guidance_scale)


def guidance_scale_embedding(w, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e(w) = [sin(1000 w f_k), cos(1000 w f_k)], f_k = 10000^(-k / (dim/2 - 1)), k < dim/2, zero-padded to odd dim (VDM)."""
    w = torch.as_tensor(w).reshape(-1) * 1000.0
    half_dim = dim // 2
    frequencies = torch.exp(torch.arange(half_dim, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half_dim - 1)))
    angles = w.to(dtype)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))


def guidance_timestep_cond(guidance_scale, dim: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `timestep_cond` of scale s as StableDiffusionPipeline feeds it: e(s - 1), one row per sample."""
    guidance_scale = torch.as_tensor(guidance_scale, dtype=torch.float32).reshape(-1)
    if guidance_scale.numel() == 1:
        guidance_scale = guidance_scale.repeat(batch_size)
    return guidance_scale_embedding(guidance_scale - 1, dim, dtype)


def check_guidance_range(guidance_scale_min: float, guidance_scale_max: float) -> None:
    """Raise a one-line error unless 1 <= s_min <= s_max (diffusers' scale: 1 is the conditional model, no guidance)."""
    if guidance_scale_min > guidance_scale_max:
        raise ValueError(f"--guidance_scale_min {guidance_scale_min} exceeds --guidance_scale_max {guidance_scale_max}: swap them.")
    if guidance_scale_min < 1:
        raise ValueError(f"--guidance_scale_min {guidance_scale_min} is below 1 (s = 1 is the conditional model): use s >= 1.")


def check_foldable_range(guidance_scale_min: float, guidance_scale_max: float) -> None:
    """Raise a one-line error unless s_min = s_max: only a constant guidance embedding folds into a bias."""
    if guidance_scale_min != guidance_scale_max:
        raise ValueError(f"--fold_guidance_scale builds ONE guidance scale into the students, got the range [{guidance_scale_min}, "
                         f"{guidance_scale_max}]: pass --guidance_scale_min = --guidance_scale_max (e.g. both {guidance_scale_max}), "
                         "or drop --fold_guidance_scale to keep the guidance input (any s in the range at sampling).")


COND_PROJ = "time_embedding.cond_proj.weight"
TIME_BIAS_1 = "time_embedding.linear_1.bias"


def add_guidance_embedding(unet, dim: int):
    """A copy of a `UNet2DConditionModel` with `time_cond_proj_dim=dim` and cond_proj = 0 (outputs equal for every input)."""
    if "time_cond_proj_dim" not in unet.config:
        raise ValueError(f"{type(unet).__name__} has no guidance-embedding input: a guidance-conditioned student needs a UNet2DConditionModel.")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"This UNet already takes a guidance embedding (time_cond_proj_dim={unet.config.time_cond_proj_dim}): "
                         "train it as it is instead of adding another.")
    if dim < 2:
        raise ValueError(f"The guidance embedding dimension must be >= 2, got {dim}.")
    # cast BEFORE loading: float64 weights loaded into a float32 model would be rounded
    student = like(type(unet).from_config(unet_config(unet, time_cond_proj_dim=dim)), unet)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if missing != [COND_PROJ] or unexpected:
        raise RuntimeError(f"Unexpected weights while adding the guidance embedding: missing {missing}, unexpected {unexpected}.")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train(unet.training)


def folded_time_bias(*, linear_1_weight, linear_1_bias, cond_proj_weight, condition):
    """b_1' = b_1 + W_1 P c: linear_1(x + P c) = W_1 x + b_1', so a constant condition c folds into the bias."""
    return linear_1_bias + linear_1_weight @ (cond_proj_weight @ condition)


def fold_guidance_embedding(unet, guidance_scale: float):
    """A plain UNet (config without time_cond_proj_dim) equal to `unet` fed `guidance_timestep_cond(s)` at every call."""
    dim = unet.config.get("time_cond_proj_dim")
    if dim is None:
        raise ValueError("fold_guidance_embedding needs a UNet with a guidance embedding (time_cond_proj_dim), e.g. from add_guidance_embedding.")
    state = dict(unet.state_dict())
    if TIME_BIAS_1 not in state:
        raise ValueError("This UNet's time embedding has no linear_1 bias to fold the guidance embedding into.")
    condition = guidance_timestep_cond(guidance_scale, dim)[0].double()
    bias = folded_time_bias(
        linear_1_weight=state["time_embedding.linear_1.weight"].double(), linear_1_bias=state[TIME_BIAS_1].double(),
        cond_proj_weight=state.pop(COND_PROJ).double(), condition=condition,
    )
    state[TIME_BIAS_1] = bias.to(state[TIME_BIAS_1].dtype)
    folded = like(type(unet).from_config(unet_config(unet, time_cond_proj_dim=None)), unet)
    folded.load_state_dict(state)
    return folded.eval()



def null_class_labels(unet, batch_size: int, null_class=None) -> torch.Tensor:
    """The unconditional `class_labels` of a class-conditional UNet2DModel for CFG: `null_class` for every sample
    (default: its last class embedding, num_class_embeds - 1, where class-conditional trainers put the null class)."""
    num_classes = unet.config.get("num_class_embeds")
    if num_classes is None:
        raise ValueError("Guidance needs a conditional teacher: this UNet has no class embedding (num_class_embeds) and no text input.")
    null_class = num_classes - 1 if null_class is None else int(null_class)
    if not 0 <= null_class < num_classes:
        raise ValueError(f"Null class {null_class} is outside the teacher's class embedding 0..{num_classes - 1}: a class-conditional "
                         "teacher needs a null class (trained with label dropout) for guidance.")
    device = next(unet.parameters()).device
    return torch.full((batch_size,), null_class, dtype=torch.long, device=device)
