"""Condition adapters: what differs between conditional teacher kinds, behind one interface (see DESIGN.md).

A guided distillation run (`guided.py`) sees its teacher only through one of these:

| adapter             | teacher                                        | condition c            | null condition    | guidance input s        | students saved as                 |
|---------------------|------------------------------------------------|------------------------|-------------------|-------------------------|-----------------------------------|
| `TextConditioning`  | Stable Diffusion (UNet2DConditionModel + VAE)  | `encoder_hidden_states`| the empty prompt  | `timestep_cond` e(s - 1)| stock `StableDiffusionPipeline`   |
|                     |                                                |                        |                   | (or one s, folded)      | (a plain SD UNet when folded)     |
| `ClassConditioning` | class-conditional `UNet2DModel` (pixels)       | `class_labels`         | the null class    | none: one s, folded in  | `DDPMPipeline` folder + metadata  |

A `UNet2DModel` has no input for a guidance scale (its one conditioning slot holds the class), so a class-conditional
student learns the teacher's guided output at ONE scale; stock diffusers has no pipeline that passes class labels to
a `UNet2DModel`, so such students are sampled by `ProgressiveDistillationPipeline(class_labels=...)` (their model
card says so). A text-to-image student trained at one scale (s_min = s_max) may be saved the same way with
`fold_guidance_scale=True`: it trains with its guidance input (stage one's student is the next stage's teacher, in
memory) and each saved copy has the constant e(s - 1) folded into its time-embedding bias (`fold_guidance_embedding`,
exact): a plain UNet2DConditionModel that the stock pipeline runs as an ordinary SD UNet, at `guidance_scale=1`.

SFD (`sfd.py`) uses the same adapters for the condition of each trajectory (`batch`), its validation conditions and
its students' export (`save` without a guidance range: guidance is applied at sampling, two predictions per step).
"""

import copy
from typing import Dict, Mapping, Optional

import torch

from .guidance import add_guidance_embedding, check_foldable_range, fold_guidance_embedding, guidance_timestep_cond


def repeat_rows(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`tensor`'s rows repeated cyclically to `batch_size` rows."""
    return tensor.repeat((batch_size + len(tensor) - 1) // len(tensor), *([1] * (tensor.ndim - 1)))[:batch_size]


class TextConditioning:
    """A text-to-image teacher's view: cached VAE latents and text embeddings (`text_image_data.EncodedTextImageData`).

    Args:
        components: the teacher's `vae`, `text_encoder`, `tokenizer`.
        data: its encodings of the training pairs; validation prompts are the first captions of the data.
        embedding_dim: the students' guidance embedding size (`time_cond_proj_dim`).
        proportion_empty_prompts: captions replaced by the empty prompt, drawn per batch.
        fold_guidance_scale: save the students with their one scale (s_min = s_max) folded in: plain SD UNets.
    """

    key = "encoder_hidden_states"
    guidance_input = True

    def __init__(self, components: Mapping, data, *, embedding_dim: int = 256, proportion_empty_prompts: float = 0.0,
                 num_validation_prompts: int = 4, fold_guidance_scale: bool = False):
        self.components, self.data, self.embedding_dim = components, data, embedding_dim
        self.fold_guidance_scale = fold_guidance_scale
        self.proportion_empty_prompts = proportion_empty_prompts
        self.validation_text = data.caption_embeddings[data.caption_index[: min(num_validation_prompts, len(data))]]

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices, generator: Optional[torch.Generator] = None):
        """(latents, {"encoder_hidden_states": c}) of the pairs at `indices`, captions dropped per batch."""
        latents, text = self.data.batch(indices, proportion_empty_prompts=self.proportion_empty_prompts, generator=generator)
        return latents, {self.key: text}

    def uncond(self, cond: Mapping) -> Dict[str, torch.Tensor]:
        """The empty prompt's embedding for every sample of `cond`."""
        text = cond[self.key]
        return {self.key: self.data.empty_embedding.to(text).expand_as(text)}

    def guidance_cond(self, guidance_scale, batch_size: int, device) -> Dict[str, torch.Tensor]:
        """The student's guidance input e(s - 1) (one s per sample, or one for all)."""
        return {"timestep_cond": guidance_timestep_cond(torch.as_tensor(guidance_scale).cpu(), self.embedding_dim,
                                                        batch_size=batch_size).to(device)}

    def validation_cond(self, batch_size: int, device) -> Dict[str, torch.Tensor]:
        """The fixed validation prompts, cyclically, for `batch_size` samples."""
        return {self.key: repeat_rows(self.validation_text, batch_size).to(device)}

    def add_guidance_input(self, teacher):
        """The teacher with a zero-initialised guidance embedding: equal outputs for every s."""
        return add_guidance_embedding(teacher, self.embedding_dim)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: vae.decode(z / scaling_factor), as StableDiffusionPipeline decodes."""
        vae = self.components["vae"]
        parameter = next(vae.parameters())
        return vae.decode(latents.to(parameter.device, parameter.dtype) / vae.config.scaling_factor).sample.float()

    def save(self, folder, unet, num_steps: int, *, scheduler_config, guidance_scale_min: Optional[float] = None,
             guidance_scale_max: Optional[float] = None, teacher_prediction_type=None, **kwargs):
        """A full stock StableDiffusionPipeline folder of the student (the teacher's vae, text encoder, tokenizer);
        `guidance_scale_min/max`: the range a guidance-conditioned student learnt (None: a student without guidance
        input, which the pipeline guides at two predictions per step); with `fold_guidance_scale`, its one scale
        folded into the weights (a plain UNet, sampled at `guidance_scale=1`)."""
        from .export import save_stock_sd_pipeline

        if self.fold_guidance_scale:
            check_foldable_range(guidance_scale_min, guidance_scale_max)
            return save_stock_sd_pipeline(folder, self.components, fold_guidance_embedding(unet, guidance_scale_max), num_steps,
                                          scheduler_config, guidance_scale_folded=guidance_scale_max, **kwargs)
        return save_stock_sd_pipeline(folder, self.components, unet, num_steps, scheduler_config,
                                      guidance_scale_min=guidance_scale_min, guidance_scale_max=guidance_scale_max, **kwargs)


class ClassConditioning:
    """A class-conditional `UNet2DModel` teacher's view: images (in [-1, 1]) with integer labels, held in memory.

    Args:
        images: (N, C, H, W) training images; labels: (N,) their classes (each below the null class).
        num_class_embeds: the teacher's class embedding size; null_class: the unconditional label (default the last).
    """

    key = "class_labels"
    guidance_input = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, num_class_embeds: int, null_class: Optional[int] = None):
        self.images, self.labels = images, labels.long()
        self.null_class = num_class_embeds - 1 if null_class is None else int(null_class)
        if not 0 <= self.null_class < num_class_embeds:
            raise ValueError(f"--null_class {self.null_class} is outside the teacher's {num_class_embeds} class embeddings.")
        if (self.labels == self.null_class).any() or self.labels.max() >= num_class_embeds or self.labels.min() < 0:
            raise ValueError(
                f"The data's labels span {int(self.labels.min())}..{int(self.labels.max())} but the teacher has "
                f"{num_class_embeds} class embeddings with null class {self.null_class}: a class-conditional teacher "
                "needs a null class that no image has (trained with label dropout) for guidance.")
        self.validation_labels = torch.unique(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, generator: Optional[torch.Generator] = None):
        """(images, {"class_labels": y}) of the examples at `indices`."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.images[indices], {self.key: self.labels[indices]}

    def uncond(self, cond: Mapping) -> Dict[str, torch.Tensor]:
        """The null class for every sample of `cond`."""
        labels = cond[self.key]
        return {self.key: torch.full_like(labels, self.null_class)}

    def guidance_cond(self, guidance_scale, batch_size: int, device) -> Dict[str, torch.Tensor]:
        """No guidance input: the student's scale is built into its weights."""
        return {}

    def validation_cond(self, batch_size: int, device) -> Dict[str, torch.Tensor]:
        """Every class of the data, cyclically, for `batch_size` samples."""
        return {self.key: repeat_rows(self.validation_labels, batch_size).to(device)}

    def add_guidance_input(self, teacher):
        """A copy of the teacher (a UNet2DModel has no guidance input)."""
        return copy.deepcopy(teacher)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Pixel samples are images."""
        return samples

    def save(self, folder, unet, num_steps: int, *, scheduler_config, prediction_type: str,
             guidance_scale_min: Optional[float] = None, guidance_scale_max: Optional[float] = None,
             method: str = "guided_distillation", **kwargs):
        """A DDPMPipeline folder with the class-conditional metadata (sampled by ProgressiveDistillationPipeline);
        `guidance_scale_max`: the one scale built into a guided student's weights (None: guidance at sampling)."""
        from .export import save_student
        from .scheduler import ProgressiveDistillationScheduler

        scheduler = ProgressiveDistillationScheduler.from_config(scheduler_config, prediction_type=prediction_type)
        return save_student(folder, unet, scheduler, num_steps, method=method, class_conditional=True,
                            null_class=self.null_class, guidance_scale_folded=guidance_scale_max, **kwargs)


