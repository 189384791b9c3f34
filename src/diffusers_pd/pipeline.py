"""`ProgressiveDistillationPipeline`: sample a distilled student on the grid it was trained for."""

import math
from contextlib import contextmanager
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from PIL import Image
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

from .export import save_stock_pipeline
from .guidance import guided_model_output, null_class_labels
from .scheduler import METADATA_KEY, ProgressiveDistillationScheduler


@contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode inside the block, its training flag restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def student_steps(scheduler) -> Optional[int]:
    """The step count a student was distilled for, from its scheduler config metadata (None for a plain teacher)."""
    return (scheduler.config.get(METADATA_KEY) or {}).get("num_inference_steps")


def initial_noise(unet: UNet2DModel, batch_size: int, generator=None, device=None) -> torch.Tensor:
    """z_1 ~ N(0, I) of the unet's sample shape, drawn exactly as diffusers' DDPMPipeline draws it."""
    sample_size = unet.config.sample_size
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    shape = (batch_size, unet.config.in_channels, *size)
    return randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)


def denoise(
    unet: UNet2DModel,
    scheduler,
    latents: torch.Tensor,
    num_inference_steps: int,
    progress: Optional[callable] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[dict] = None,
    **cond,
) -> torch.Tensor:
    """Run any diffusers scheduler from noise `latents` for `num_inference_steps` steps; returns the final sample
    (`cond`: the UNet's extra inputs, e.g. `class_labels`; `guidance_scale` > 1: classifier-free guidance against
    `uncond`, one forward of the doubled batch per step, as diffusers' pipelines guide)."""
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    sample = latents * scheduler.init_noise_sigma
    timesteps: Iterable = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    for t in timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        if guidance_scale > 1:
            model_output = guided_model_output(unet, model_input, t, guidance_scale=guidance_scale, uncond=uncond, **cond)
        else:
            model_output = unet(model_input, t, **cond).sample
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample


class ProgressiveDistillationPipeline(DiffusionPipeline):
    """Unconditional image pipeline for distilled students: deterministic DDIM on the student's own N-step grid.

    `num_inference_steps` defaults to the step count stored in the student's scheduler config. A stock scheduler
    (as saved by `save_student`) is converted to `ProgressiveDistillationScheduler` with the same schedule, so
    `ProgressiveDistillationPipeline.from_pretrained(student_folder)` samples exactly what the student learned.
    An SFD student (`"method": "sfd"` in its metadata) is sampled at its own step count on its own grid with its
    analytic first step, if it was trained with one (`sfd.sfd_student_samples`): the paper's NFE. A class-conditional
    student takes `class_labels`, and `guidance_scale` > 1 applies classifier-free guidance against its null class
    (both predictions from one forward of the doubled batch per step).

    `save_pretrained` and `push_to_hub` write the stock folder (`export.save_stock_pipeline`): a `DDPMPipeline` that
    plain diffusers loads with `DiffusionPipeline.from_pretrained`, never a folder naming this class.

    Args:
        unet (`UNet2DModel`): the student (or a teacher).
        scheduler (`SchedulerMixin`): any diffusers scheduler of the same schedule.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        if not isinstance(scheduler, ProgressiveDistillationScheduler):
            scheduler = ProgressiveDistillationScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: Optional[int] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Sample `batch_size` images in `num_inference_steps` (default: the student's own) DDIM steps.

        Args:
            latents (`torch.Tensor`, *optional*): initial noise; drawn from `generator` as DDPMPipeline does if None.
            output_type (`str`): `"pil"`, `"np"` or `"pt"` (images in [0, 1]).
            class_labels (`torch.Tensor`, *optional*): one class per image, for a class-conditional student.
            guidance_scale (`float`): classifier-free guidance scale s (diffusers' convention, none at s <= 1) against
                the student's null class (`null_class` in its metadata, else its last class embedding).
        """
        num_inference_steps = num_inference_steps or student_steps(self.scheduler)
        if num_inference_steps is None:
            raise ValueError("This pipeline holds no student step count: pass num_inference_steps=N.")
        if (class_labels is None) != (self.unet.config.get("num_class_embeds") is None):
            raise ValueError("Pass class_labels=tensor of one class per image for a class-conditional student, and only then.")
        cond = {} if class_labels is None else {"class_labels": torch.as_tensor(class_labels).to(self._execution_device)}
        if latents is None:
            batch_size = batch_size if class_labels is None else len(cond["class_labels"])
            latents = initial_noise(self.unet, batch_size, generator=generator, device=self._execution_device)
        latents = latents.to(self._execution_device)
        metadata = self.scheduler.config.get(METADATA_KEY) or {}
        guidance = {}
        if guidance_scale > 1:
            if class_labels is None:
                raise ValueError("guidance_scale > 1 needs a class-conditional student and class_labels: an unconditional "
                                 "student has no condition to guide; pass guidance_scale=1.")
            null = null_class_labels(self.unet, len(cond["class_labels"]), metadata.get("null_class"))
            guidance = {"guidance_scale": guidance_scale, "uncond": {"class_labels": null}}
        if metadata.get("method") == "sfd" and num_inference_steps == metadata["num_inference_steps"]:
            from .sfd import sfd_student_samples  # an SFD student: its own grid, its analytic first step

            sample = sfd_student_samples(self.unet, latents, scheduler_config=self.scheduler.config, num_steps=num_inference_steps,
                                         grid=metadata.get("grid", "trailing"), afs=metadata.get("afs", False), **guidance, **cond)
        else:
            sample = denoise(self.unet, self.scheduler, latents, num_inference_steps, self.progress_bar, **guidance, **cond)
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def save_pretrained(
        self,
        save_directory,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Save as the stock folder `save_student` writes, which plain diffusers loads and samples identically.

        A student (its scheduler config holds a step count under `_diffusers_pd`) is saved exactly as `save_student`
        saves it: a stock `DDPMPipeline`, the stock scheduler that reproduces its grid, its metadata and model card.
        A pipeline without a step count is saved with DPM-Solver++(1), which samples our deterministic DDIM for every
        N (see `export.save_stock_pipeline`). Other files in `save_directory` stay. With `push_to_hub`, the folder is
        then uploaded as diffusers does it (`repo_id`, `token`, `private`, `commit_message`, `create_pr`); returns
        the commit URL then.
        """
        hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "commit_message", "create_pr", "subfolder") if key in kwargs}
        repo_id = None
        if push_to_hub:
            repo_name = hub_kwargs.get("repo_id", Path(save_directory).name)
            repo_id = create_repo(repo_name, exist_ok=True, private=hub_kwargs.get("private"), token=hub_kwargs.get("token")).repo_id
        save_stock_pipeline(
            save_directory, self.unet, self.scheduler, card_repo_id=repo_id, safe_serialization=safe_serialization,
            variant=variant, max_shard_size=max_shard_size, **kwargs,
        )
        if not push_to_hub:
            return None
        card_path = Path(save_directory) / "README.md"
        if not card_path.exists():  # a pipeline without a step count has no card of ours: diffusers' own, as it pushes
            populate_model_card(load_or_create_model_card(repo_id, token=hub_kwargs.get("token"), is_pipeline=True)).save(card_path)
        return self._upload_folder(
            save_directory, repo_id, token=hub_kwargs.get("token"), commit_message=hub_kwargs.get("commit_message"),
            create_pr=hub_kwargs.get("create_pr", False), subfolder=hub_kwargs.get("subfolder"),
        )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        subfolder: Optional[str] = None,
    ) -> str:
        """Upload the stock folder `save_pretrained` writes (a student keeps its model card); returns the commit URL."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.save_pretrained(
                Path(tmp) / "pipeline", safe_serialization=safe_serialization, variant=variant, push_to_hub=True,
                repo_id=repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr,
                subfolder=subfolder,
            )


def sample_grid(unet: UNet2DModel, scheduler_config, num_steps: int, num_images: int, device=None):
    """A PIL grid of `num_images` samples from fixed noise (seed 0), `num_steps` deterministic DDIM steps."""
    return sampler_grid(unet, partial(ddim_samples, scheduler_config=scheduler_config, num_steps=num_steps), num_images, device)


@torch.no_grad()
def sampler_grid(unet: UNet2DModel, sampler: Callable, num_images: int, device=None, decode: Optional[Callable] = None):
    """A PIL grid of `num_images` samples of `sampler(unet, latents)` from fixed noise (seed 0), `decode`d to images."""
    latents = initial_noise(unet, num_images, generator=torch.Generator().manual_seed(0)).to(device or unet.device)
    with evaluating(unet):
        samples = sampler(unet, latents)
    if decode is not None:
        samples = decode(samples)
    images = DiffusionPipeline.numpy_to_pil((samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy())
    rows = max(1, int(num_images**0.5))
    return image_grid(images[: rows * (num_images // rows)], cols=num_images // rows)


def image_grid(images: List[Image.Image], cols: int, min_size: int = 64, gutter: int = 2) -> Image.Image:
    """Tile images `cols` per row on white, `gutter` pixels apart, each upscaled (nearest neighbour) by the smallest
    integer factor that makes it at least `min_size` pixels, so an 8x8 sample is visible in a model card."""
    width, height = images[0].size
    scale = max(1, math.ceil(min_size / min(width, height)))
    tile_w, tile_h = width * scale, height * scale
    rows = math.ceil(len(images) / cols)
    grid = Image.new(images[0].mode, (cols * tile_w + (cols - 1) * gutter, rows * tile_h + (rows - 1) * gutter), "white")
    for i, image in enumerate(images):
        position = ((i % cols) * (tile_w + gutter), (i // cols) * (tile_h + gutter))
        grid.paste(image.resize((tile_w, tile_h), Image.Resampling.NEAREST), position)
    return grid


@torch.no_grad()
def ddim_samples(unet: UNet2DModel, latents: torch.Tensor, *, scheduler_config, num_steps: int, **cond) -> torch.Tensor:
    """Deterministic DDIM samples of `unet` from `latents` on the `num_steps` trailing grid of `scheduler_config`
    (`cond`: the UNet's extra inputs)."""
    with evaluating(unet):
        return denoise(unet, ProgressiveDistillationScheduler.from_config(dict(scheduler_config)), latents, num_steps, **cond)


def mean_squared_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared distance of samples to reference samples from the same noise."""
    return (samples.float() - reference.float()).pow(2).mean().item()
