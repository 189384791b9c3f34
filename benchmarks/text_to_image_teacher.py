#!/usr/bin/env python
"""Train the offline text-to-image teacher of the guided-distillation benchmark: a small Stable Diffusion pipeline
on Fashion-MNIST with captions "a photo of a {class name}".

Components, all built here from configs (no Hub):
  vae           AutoencoderKL, 32x32 grey images <-> 8x8x4 latents (factor 4), trained --vae_steps on
                MSE + --kl_weight KL; scaling_factor = 1 / std of its latent samples (as SD's 0.18215 was chosen)
  tokenizer     CLIPTokenizer on a vocabulary written by `diffusers_pd.clip_vocab` (every caption word one token)
  text_encoder  a small random CLIPTextModel, frozen (as SD's CLIP is)
  unet          UNet2DConditionModel on the 8x8x4 latents, eps prediction, SD's scaled_linear schedule (T = 1000),
                trained --unet_steps with caption dropout --proportion_empty_prompts (the null caption "" for CFG)
  scheduler     DDIMScheduler with SD 1.x's config (steps_offset=1, set_alpha_to_one=False)

The pipeline folder (--output_dir) is what `examples/train_distill.py --teacher` reads; --data_dir receives the
captioned imagefolder (PNGs + metadata.jsonl) that its `--train_data_dir` reads. Example:

    python benchmarks/text_to_image_teacher.py --output_dir benchmarks/results/text-to-image-fashion/teacher \
        --data_dir runs/t2i/captioned --work_dir runs/t2i/teacher-work

An --output_dir that already holds a pipeline is kept: the run then only writes --data_dir (the committed teacher's
captioned data on a fresh clone).
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_pd.atomic import atomic_directory, atomic_write_text
from diffusers_pd.clip_vocab import caption_words, write_clip_vocab
from diffusers_pd.data import FASHION_MNIST_CLASSES, image_transform, load_fashion_mnist
from diffusers_pd.guided import guided_ddim_samples
from diffusers_pd.pipeline import image_grid
from diffusers_pd.text_image_data import encode_prompts, encode_text_image_dataset, write_captioned_imagefolder
from diffusers_pd.training import linear_warmup_lr, set_lr

RESOLUTION = 32
MAX_LENGTH = 16
TEXT_DIM = 32
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           sample_size=RESOLUTION)
UNET = dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
            attention_head_dim=8, norm_num_groups=16)


def class_prompts() -> list:
    """The ten captions, "a photo of a {class name}" with Fashion-MNIST's names lower-cased."""
    return [f"a photo of a {name.lower()}" for name in FASHION_MNIST_CLASSES]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="The StableDiffusionPipeline folder to write.")
    parser.add_argument("--data_dir", required=True, help="The captioned imagefolder to write (for --train_data_dir).")
    parser.add_argument("--work_dir", required=True, help="Intermediate results (a finished phase is not redone).")
    parser.add_argument("--num_data_images", type=int, default=4000, help="Images in --data_dir (balanced classes).")
    parser.add_argument("--vae_steps", type=int, default=800)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--unet_steps", type=int, default=2000)
    parser.add_argument("--unet_batch_size", type=int, default=64)
    parser.add_argument("--unet_learning_rate", type=float, default=1e-3)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.1, help="Caption dropout (the CFG null).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists() and not Path(args.output_dir, "model_index.json").is_file():
        parser.error(f"--output_dir {args.output_dir} exists and is not a pipeline folder: remove it or name another.")
    return args


def write_data_dir(dataset, folder: Path, num_images: int, seed: int) -> None:
    """A class-balanced, seeded subset of the training split as a captioned imagefolder."""
    labels = dataset["label"]
    rng = random.Random(seed)
    per_class = [[i for i, label in enumerate(labels) if label == c] for c in range(len(FASHION_MNIST_CLASSES))]
    rows = sorted(i for members in per_class for i in rng.sample(members, num_images // len(per_class)))
    prompts = class_prompts()
    subset = dataset.select(rows)
    write_captioned_imagefolder(folder, subset["image"], [prompts[label] for label in subset["label"]])


def train_vae(pixels: torch.Tensor, args, log) -> AutoencoderKL:
    """MSE reconstruction + kl_weight x KL(q(z|x) || N(0, I)), Adam, linear warm-up; scaling_factor = 1 / std(z)."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.vae_learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        set_lr(optimizer, linear_warmup_lr(step, 50, args.vae_learning_rate))
        x = pixels[torch.randint(len(pixels), (args.vae_batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + args.kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}: mse {mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = vae.encode(pixels[:2000]).latent_dist.sample(generator=generator)
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae


def text_components(folder: Path, seed: int):
    """The tokenizer (project-written vocabulary of the captions' words) and a random, frozen CLIPTextModel."""
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(folder, caption_words(class_prompts())),
                                              model_max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, CLIPTextModel(config).eval()


def train_unet(data, args, log) -> UNet2DConditionModel:
    """The eps-prediction loss |eps - eps_hat(z_t, t, c)|^2 with c <- "" at --proportion_empty_prompts; EMA weights."""
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**UNET).train()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.unet_learning_rate)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(args.unet_steps):
        set_lr(optimizer, linear_warmup_lr(step, 100, args.unet_learning_rate))
        indices = torch.randint(len(data), (args.unet_batch_size,), generator=generator)
        latents, text = data.batch(indices, proportion_empty_prompts=args.proportion_empty_prompts, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval()


class PromptRows:
    """The conditioning that `guided_ddim_samples` reads: fixed prompt embeddings, one per sample, and the empty one."""

    def __init__(self, text: torch.Tensor, empty: torch.Tensor):
        self.text, self.empty = text, empty

    def validation_cond(self, batch_size: int, device) -> dict:
        return {"encoder_hidden_states": self.text[:batch_size].to(device)}

    def uncond(self, cond) -> dict:
        text = cond["encoder_hidden_states"]
        return {"encoder_hidden_states": self.empty.to(text).expand_as(text)}


def sample_grid(components, scheduler_config, guidance_scale: float, per_prompt: int = 8, steps: int = 64) -> Image.Image:
    """One row per prompt: the teacher with CFG at `guidance_scale`, DDIM at `steps`."""
    prompts = class_prompts()
    text = encode_prompts(components["tokenizer"], components["text_encoder"], prompts).repeat_interleave(per_prompt, 0)
    empty = encode_prompts(components["tokenizer"], components["text_encoder"], [""])[0]
    noise = torch.randn((len(text), 4, UNET["sample_size"], UNET["sample_size"]), generator=torch.Generator().manual_seed(0))
    latents = guided_ddim_samples(components["unet"], noise, scheduler_config=scheduler_config, num_steps=steps,
                                  conditioning=PromptRows(text, empty), guidance_scale=guidance_scale, student=False)
    vae = components["vae"]
    images = ((vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1) * 255).round().byte()
    return image_grid([Image.fromarray(image[0].numpy(), "L") for image in images], cols=per_prompt)


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    costs = {}

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    train = load_fashion_mnist("train")
    train = train.add_column("text", [class_prompts()[label] for label in train["label"]])
    if not Path(args.data_dir, "metadata.jsonl").is_file():
        write_data_dir(train, Path(args.data_dir), args.num_data_images, args.seed)
        log(f"wrote {args.num_data_images} captioned images to {args.data_dir}")
    if Path(args.output_dir, "model_index.json").is_file():
        log(f"{args.output_dir} already holds a teacher pipeline: kept, only the data folder was written (remove it to train again)")
        return

    if (work / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    else:
        transform = image_transform(RESOLUTION, 1, center_crop=True)
        pixels = torch.stack([transform(image) for image in train["image"]])
        phase = time.time()
        with torch.enable_grad():
            vae = train_vae(pixels, args, log)
        costs["vae_seconds"] = time.time() - phase
        with atomic_directory(work / "vae") as staging:
            vae.save_pretrained(staging)
    log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")

    tokenizer, text_encoder = text_components(work / "vocab", args.seed)
    data = encode_text_image_dataset(train, image_column="image", caption_column="text", vae=vae, tokenizer=tokenizer,
                                     text_encoder=text_encoder, resolution=RESOLUTION, seed=args.seed, batch_size=500,
                                     cache_path=work / "encoded_train.safetensors")
    log(f"encoded {len(data)} images: latent std {data.latents.std():.3f}")

    phase = time.time()
    with torch.enable_grad():
        unet = train_unet(data, args, log)
    costs["unet_seconds"] = time.time() - phase

    components = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER),
                      safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    with atomic_directory(args.output_dir) as staging:
        StableDiffusionPipeline(**components).save_pretrained(staging)
        for scale in (1.0, 3.0):
            sample_grid(components, SD_SCHEDULER, scale).save(staging / f"samples_cfg{scale:g}_ddim64.png")
        costs = {**costs, "total_seconds": time.time() - started, "machine": "shared 2-core CPU, 1 thread",
                 "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "unet_batch_size": args.unet_batch_size,
                 "unet_parameters": sum(p.numel() for p in unet.parameters()),
                 "vae_parameters": sum(p.numel() for p in vae.parameters())}
        atomic_write_text(staging / "training_cost.json", json.dumps(costs, indent=2) + "\n")
    log(f"saved the teacher pipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
