"""SFD-v step-count conditioning for `UNet2DModel` and `UNet2DConditionModel`, through the UNet's own class-embedding slot.

Both UNets with `num_class_embeds` (and no `class_embed_type`) add E[label] to their time embedding:
emb = linear_2(act(linear_1(t_emb))) + E[label]. SFD-v (one student for several NFEs) uses label = NFE:

* `add_step_embedding` gives the teacher an `nn.Embedding(max_nfe + 1, dim)` initialised to ZERO, so the
  untrained student equals the teacher for every label (instead of the official per-block layers);
* `fold_step_embedding` exports one step count: E[nfe] is a constant, so adding it to
  `time_embedding.linear_2.bias` gives a plain UNet of the same class (no class embedding in its config) with the
  same output, loadable and samplable by stock diffusers pipelines (DDPMPipeline, StableDiffusionPipeline) that
  cannot pass class labels.
"""

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

STEP_EMBEDDING = "class_embedding.weight"
TIME_BIAS = "time_embedding.linear_2.bias"


def unet_config(unet: UNet2DModel, **changes) -> dict:
    """`unet`'s public config with `changes`, without private keys (`_use_default_values` would drop the changes)."""
    return {**{key: value for key, value in unet.config.items() if not key.startswith("_")}, **changes}


def like(model: torch.nn.Module, reference: torch.nn.Module) -> torch.nn.Module:
    """`model` on `reference`'s device and in its dtype (a dtype cast only where they differ)."""
    parameter = next(reference.parameters())
    model = model.to(parameter.device)
    return model if next(model.parameters()).dtype == parameter.dtype else model.to(parameter.dtype)


def check_no_class_embedding(unet: UNet2DModel) -> None:
    """Raise if `unet` already has a class embedding (its slot is where the step count goes)."""
    if unet.class_embedding is not None or unet.config.num_class_embeds is not None or unet.config.class_embed_type is not None:
        raise ValueError(
            "This UNet already has a class embedding (num_class_embeds / class_embed_type): SFD-v needs that slot for "
            "the step count; distil one student per NFE instead."
        )


def add_step_embedding(unet: UNet2DModel | UNet2DConditionModel, max_nfe: int):
    """A copy of `unet` with E = zeros(max_nfe + 1, dim) added to its time embedding at label = NFE (equal outputs)."""
    check_no_class_embedding(unet)
    if max_nfe < 1:
        raise ValueError(f"max_nfe must be >= 1, got {max_nfe}.")
    student = like(type(unet).from_config(unet_config(unet, num_class_embeds=max_nfe + 1)), unet)  # cast, then load
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if missing != [STEP_EMBEDDING] or unexpected:
        raise RuntimeError(f"Unexpected weights while adding the step embedding: missing {missing}, unexpected {unexpected}.")
    torch.nn.init.zeros_(student.class_embedding.weight)
    return student.train(unet.training)


def fold_step_embedding(unet: UNet2DModel | UNet2DConditionModel, nfe: int):
    """A plain UNet of `unet`'s class (config without the class embedding) with b_2 + E[nfe] as time_embedding.linear_2.bias."""
    if unet.class_embedding is None or unet.config.class_embed_type is not None:
        raise ValueError("fold_step_embedding needs a UNet made by add_step_embedding (num_class_embeds, no class_embed_type).")
    if not 0 <= nfe < unet.config.num_class_embeds:
        raise ValueError(f"NFE {nfe} is outside the step embedding's range 0..{unet.config.num_class_embeds - 1}.")
    state = dict(unet.state_dict())
    step_vector = state.pop(STEP_EMBEDDING)[nfe]
    state[TIME_BIAS] = state[TIME_BIAS] + step_vector
    folded = like(type(unet).from_config(unet_config(unet, num_class_embeds=None)), unet)  # cast, then load
    folded.load_state_dict(state)
    return folded.eval()
