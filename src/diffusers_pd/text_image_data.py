"""Text conditioning and image-caption data for text-to-image (Stable Diffusion) teachers.

Data are read as diffusers' `train_text_to_image.py` reads them: `--dataset_name` (HF datasets) or `--train_data_dir`
(an imagefolder with `metadata.jsonl`), `--image_column`, `--caption_column` (default `text`; a string or a list of
strings per image), `--resolution`, `--center_crop`, `--random_flip`, `--proportion_empty_prompts`.

Everything a stage needs is encoded ONCE by the teacher and cached on disk (one safetensors file, written atomically):

    latents    z_0 = scaling_factor * sample of vae.encode(x).latent_dist      (one per image, seeded)
    captions   c = text_encoder(tokenizer(caption))  for each distinct caption, plus c_empty for ""

so the random crop, flip and list-caption choice are drawn once, at encoding. `--proportion_empty_prompts` is
drawn per batch instead (`drop_captions`), so every epoch drops different captions, as diffusers' example does.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import torch

from .atomic import PathLike, atomic_directory, atomic_write_bytes
from .data import image_transform, load_image_dataset

CACHE_FORMAT = 1


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline.encode_prompt computes them (padded to the tokenizer's
    model_max_length, truncated; attention mask only where the text encoder's config asks for one; no clip_skip)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    attention_mask = tokens.attention_mask.to(device) if use_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]


def vae_scale_factor(vae) -> int:
    """The VAE's spatial downsampling factor 2^(len(block_out_channels) - 1), as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(resolution: int, vae) -> None:
    """Raise a one-line error unless the VAE divides `resolution` into whole latent pixels."""
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: "
                         f"use e.g. {max(factor, resolution - resolution % factor)}.")


def load_text_image_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    split: str = "train",
    image_column: Optional[str] = None,
    caption_column: str = "text",
    cache_dir: Optional[str] = None,
) -> tuple:
    """(dataset, image column, caption column) of an image-caption data set; raises if the caption column is missing."""
    dataset, image_column = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, split, image_column, cache_dir)
    if caption_column not in dataset.column_names:
        raise ValueError(f"caption column {caption_column!r} not found; columns are {dataset.column_names}: pass the captions' "
                         "column with `--caption_column` (an imagefolder takes them from metadata.jsonl).")
    return dataset, image_column, caption_column


def write_captioned_imagefolder(folder: PathLike, images: Sequence, captions: Sequence[str],
                                caption_column: str = "text") -> Path:
    """Write PIL `images` as PNGs with a metadata.jsonl of {"file_name", caption_column} lines: an imagefolder that
    `--train_data_dir` reads (diffusers' text-to-image layout); the folder appears complete or not at all."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image.")
    width = len(str(max(len(images) - 1, 0)))
    with atomic_directory(folder) as staging:
        lines = []
        for index, (image, caption) in enumerate(zip(images, captions)):
            name = f"{index:0{width}d}.png"
            image.save(staging / name)
            lines.append(json.dumps({"file_name": name, caption_column: caption}))
        (staging / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return Path(folder)


def pick_caption(caption, row: int, caption_column: str, rng: random.Random) -> str:
    """The caption of one image: a string as is, one of a list drawn by `rng` (diffusers' train_text_to_image rule)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return rng.choice(list(caption))
    raise ValueError(f"row {row} of caption column {caption_column!r} holds {caption!r}: a text-to-image teacher needs a "
                     "caption (a string or a list of strings) for every image.")


def drop_captions(embeddings: torch.Tensor, empty_embedding: torch.Tensor, *, proportion: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """c_i <- c_empty with probability p per sample (--proportion_empty_prompts: the null condition for CFG)."""
    if not 0 <= proportion <= 1:
        raise ValueError(f"--proportion_empty_prompts must lie in [0, 1], got {proportion}.")
    drop = torch.rand(embeddings.shape[0], generator=generator) < proportion
    return torch.where(drop.reshape(-1, 1, 1).to(embeddings.device), empty_embedding.to(embeddings), embeddings)


@dataclass
class EncodedTextImageData:
    """A text-image data set encoded by the teacher: latents (N, C, h, w), distinct caption embeddings (U, L, D),
    each image's caption index (N,), and the empty prompt's embedding (L, D)."""

    latents: torch.Tensor
    caption_embeddings: torch.Tensor
    caption_index: torch.Tensor
    empty_embedding: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices, *, proportion_empty_prompts: float = 0.0, generator: Optional[torch.Generator] = None):
        """(latents, text embeddings) of the images at `indices`, captions dropped to "" with the given probability."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        embeddings = self.caption_embeddings[self.caption_index[indices]]
        if proportion_empty_prompts > 0:
            embeddings = drop_captions(embeddings, self.empty_embedding, proportion=proportion_empty_prompts, generator=generator)
        return self.latents[indices], embeddings

    def tensors(self) -> dict:
        return {"latents": self.latents, "caption_embeddings": self.caption_embeddings, "caption_index": self.caption_index,
                "empty_embedding": self.empty_embedding}


def cache_key(dataset: datasets.Dataset, **settings) -> str:
    """A digest of everything the encodings depend on: the data set's fingerprint and the encoding settings."""
    payload = json.dumps({"format": CACHE_FORMAT, "dataset": dataset._fingerprint, "rows": len(dataset), **settings},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def model_digest(module: torch.nn.Module) -> str:
    """A digest of a model's weights (a cache made with other weights is stale)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_text_image_dataset(
    dataset: datasets.Dataset,
    *,
    image_column: str,
    caption_column: str,
    vae,
    tokenizer,
    text_encoder,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    cache_path: Optional[PathLike] = None,
) -> EncodedTextImageData:
    """Encode every image (VAE latent sample x scaling_factor) and every distinct caption once; with `cache_path`,
    read the encodings from there when its key matches (same data, settings and weights), else write them there."""
    check_resolution(resolution, vae)
    settings = dict(image_column=image_column, caption_column=caption_column, resolution=resolution, center_crop=center_crop,
                    random_flip=random_flip, seed=seed, vae=model_digest(vae), text_encoder=model_digest(text_encoder),
                    max_length=tokenizer.model_max_length, scaling_factor=vae.config.scaling_factor)
    key = cache_key(dataset, **settings)
    if cache_path is not None and Path(cache_path).is_file():
        cached = read_cache(cache_path, key)
        if cached is not None:
            return cached
    rng = random.Random(seed)
    captions = [pick_caption(caption, row, caption_column, rng) for row, caption in enumerate(dataset[caption_column])]
    distinct = sorted(set(captions))
    caption_embeddings = torch.cat([encode_prompts(tokenizer, text_encoder, distinct[i:i + batch_size]).cpu().float()
                                    for i in range(0, len(distinct), batch_size)])
    empty_embedding = encode_prompts(tokenizer, text_encoder, [""])[0].cpu().float()
    transform = image_transform(resolution, vae.config.in_channels, center_crop=center_crop, random_flip=random_flip, rng=rng)
    generator = torch.Generator().manual_seed(seed)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    latents = []
    for start in range(0, len(dataset), batch_size):
        pixels = torch.stack([transform(image) for image in dataset[start:start + batch_size][image_column]])
        sample = vae.encode(pixels.to(device, dtype)).latent_dist.sample(generator=generator)
        latents.append((sample * vae.config.scaling_factor).cpu().float())
    index = {caption: i for i, caption in enumerate(distinct)}
    encoded = EncodedTextImageData(
        # standard (not channels_last) layout, as read back from the cache: a resumed run computes the same bits
        latents=torch.cat(latents).contiguous(memory_format=torch.contiguous_format), caption_embeddings=caption_embeddings,
        caption_index=torch.tensor([index[caption] for caption in captions], dtype=torch.long), empty_embedding=empty_embedding,
    )
    if cache_path is not None:
        write_cache(cache_path, encoded, key)
    return encoded


def write_cache(path: PathLike, encoded: EncodedTextImageData, key: str) -> None:
    """Write the encodings to one safetensors file atomically, `key` in its header."""
    from safetensors.torch import save

    tensors = {name: tensor.contiguous() for name, tensor in encoded.tensors().items()}
    atomic_write_bytes(path, save(tensors, metadata={"cache_key": key}))


def read_cache(path: PathLike, key: str) -> Optional[EncodedTextImageData]:
    """The cached encodings at `path` if their header's key is `key`, else None (stale: encode again)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("cache_key") != key:
            return None
        return EncodedTextImageData(**{name: handle.get_tensor(name) for name in handle.keys()})
