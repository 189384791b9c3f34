#!/usr/bin/env python
"""Is a guided student's guidance input live? r(s) and the error to the teacher's CFG on a fixed validation batch.

For the demo's teacher (`text_to_image_teacher.py`) and guidance-conditioned students (`train_distill.py` folders), on
the first --num_samples Fashion-MNIST TEST images with their class captions, encoded by the teacher (VAE latents, text
embeddings), noised with fixed noise at each of --timesteps:

    r(s) = ||eps_student(s) - eps_student(1)|| / ||eps_cfg(s) - eps_cfg(1)||     (1: follows the teacher's s, 0: ignores s)

and the RMS error of eps_student(s) to the teacher's CFG eps_cfg(s) (`diffusers_pd.guided_distillation.guidance_liveness`).
Seconds on one CPU core; prints a markdown table, --output writes it as JSON too.

    python benchmarks/guidance_liveness.py --teacher benchmarks/results/text-to-image-fashion/teacher \
        --students runs/t2i/distill/student-8steps runs/t2i/distill/student-4steps
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffusers_pd.atomic import atomic_write_text
from diffusers_pd.data import load_fashion_mnist
from diffusers_pd.denoiser import Denoiser
from diffusers_pd.guidance import guidance_timestep_cond
from diffusers_pd.guided_distillation import guidance_liveness
from diffusers_pd.loading import load_sd_teacher
from diffusers_pd.text_image_data import encode_text_image_dataset
from diffusers_pd.training import format_table

from text_to_image_teacher import class_prompts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="The teacher's StableDiffusionPipeline folder.")
    parser.add_argument("--students", nargs="+", required=True, help="Guidance-conditioned student pipeline folders.")
    parser.add_argument("--num_samples", type=int, default=64, help="Test images (with their class captions) per timestep.")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[3.0, 5.0])
    parser.add_argument("--per_timestep", action="store_true", help="Also a row per timestep (default: all pooled).")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=str, default=None, help="JSON file of the rows.")
    return parser.parse_args(argv)


def validation_batch(components, args):
    """(latents, noise, timesteps, text, empty text): every test image at every timestep, fixed noise."""
    test = load_fashion_mnist("test").select(range(args.num_samples))
    test = test.add_column("text", [class_prompts()[label] for label in test["label"]])
    encoded = encode_text_image_dataset(test, image_column="image", caption_column="text", vae=components["vae"],
                                        tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                                        resolution=args.resolution, seed=args.seed)
    latents, text = encoded.batch(torch.arange(len(encoded)))
    repeats = len(args.timesteps)
    latents, text = latents.repeat(repeats, 1, 1, 1), text.repeat(repeats, 1, 1)
    timesteps = torch.tensor(args.timesteps, dtype=torch.float32).repeat_interleave(args.num_samples)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed))
    return latents, noise, timesteps, text, encoded.empty_embedding.expand_as(text)


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    components, scheduler_config = load_sd_teacher(args.teacher)
    teacher = Denoiser(components["unet"].eval(), scheduler_config)
    latents, noise, timesteps, text, empty = validation_batch(components, args)
    rows = []
    for folder in args.students:
        unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet").eval()
        dim = unet.config.time_cond_proj_dim
        if dim is None:
            raise SystemExit(f"error: {folder} has no guidance input (time_cond_proj_dim): pass guidance-conditioned students.")
        student = Denoiser(unet, DDPMScheduler.load_config(Path(folder) / "scheduler"))
        subsets = [("all", slice(None))] + [(str(t), slice(i * args.num_samples, (i + 1) * args.num_samples))
                                            for i, t in enumerate(args.timesteps)] * args.per_timestep
        for name, rows_t in subsets:
            result = guidance_liveness(
                student, teacher, latents[rows_t], noise[rows_t], timesteps[rows_t],
                cond={"encoder_hidden_states": text[rows_t]}, uncond={"encoder_hidden_states": empty[rows_t]},
                guidance_cond=lambda s, n: {"timestep_cond": guidance_timestep_cond(s, dim, batch_size=n)},
                guidance_scales=args.guidance_scales)
            for s, row in result.items():
                rows.append({"student": str(folder), "t": name, "s": s, "r(s)": round(row["ratio"], 3), "cos": round(row["cosine"], 3),
                             "RMS error to CFG": round(row["student_error"], 4),
                             "teacher RMS change": round(row["teacher_change"], 4)})
    print(format_table(rows))
    if args.output:
        atomic_write_text(args.output, json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
