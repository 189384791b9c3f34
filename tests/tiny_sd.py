"""A tiny Stable Diffusion pipeline built entirely offline: UNet2DConditionModel, AutoencoderKL, CLIPTextModel from a
tiny CLIPTextConfig, and a CLIPTokenizer read from a vocab.json + merges.txt written here (no Hub).

Shapes: 16x16 RGB images, 8x8x4 latents (VAE scale factor 2), 16-token prompts, 32-dim text embeddings; the
scheduler is SD 1.x's own PNDMScheduler config (scaled_linear, steps_offset=1, set_alpha_to_one=False).
"""

from pathlib import Path

import torch
from conftest import TINY_UNET, perturbed
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_pd.clip_vocab import write_clip_vocab

MAX_LENGTH = 16
TEXT_DIM = 32
WORDS = ("a", "photo", "of", "sneaker", "bag", "shirt", "dress")

TINY_COND_UNET = {  # conftest's tiny UNet2DModel, on 4 latent channels, with cross-attention in its outer blocks
    **TINY_UNET, "in_channels": 4, "out_channels": 4, "cross_attention_dim": TEXT_DIM, "attention_head_dim": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    sample_size=16,
)

# Stable Diffusion 1.x's scheduler_config.json, as the Hub folders ship it
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
    steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon", trained_betas=None,
)


def seeded(seed: int) -> torch.Generator:
    """The generator of a tiny model's perturbation: its own stream, apart from the seed of its initialisation."""
    return torch.Generator().manual_seed(seed + 1000)


def tiny_cond_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A randomly initialised tiny UNet2DConditionModel (8x8x4 latents, 32-dim cross-attention)."""
    torch.manual_seed(seed)
    return perturbed(UNet2DConditionModel(**{**TINY_COND_UNET, **overrides}), seeded(seed))


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A randomly initialised tiny AutoencoderKL (16x16 RGB <-> 8x8x4)."""
    torch.manual_seed(seed)
    return perturbed(AutoencoderKL(**TINY_VAE), seeded(seed))


def write_tiny_clip_vocab(folder, words=WORDS) -> Path:
    """Write the tiny vocabulary (the library's writer, with WORDS) into `folder`."""
    return write_clip_vocab(folder, words)


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A CLIPTokenizer read from the tiny vocabulary written into `folder`."""
    return CLIPTokenizer.from_pretrained(write_tiny_clip_vocab(folder), model_max_length=MAX_LENGTH)


def tiny_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """A randomly initialised 2-layer CLIPTextModel (hidden size 32) for `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def tiny_sd_components(vocab_folder, seed: int = 0, **scheduler_overrides) -> dict:
    """The components of a tiny StableDiffusionPipeline (safety checker None); `vocab_folder` receives the vocabulary."""
    tokenizer = tiny_tokenizer(vocab_folder)
    return dict(
        unet=tiny_cond_unet(seed), vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        scheduler=PNDMScheduler(**{**SD_SCHEDULER, **scheduler_overrides}), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(folder, seed: int = 0, **scheduler_overrides) -> Path:
    """Write a tiny StableDiffusionPipeline folder (the layout of an SD Hub checkpoint) and return its path."""
    folder = Path(folder)
    components = tiny_sd_components(folder.parent / f"{folder.name}-vocab", seed, **scheduler_overrides)
    StableDiffusionPipeline(**components).save_pretrained(folder)
    return folder
