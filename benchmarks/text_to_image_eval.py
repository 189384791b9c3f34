#!/usr/bin/env python
"""Evaluate the text-to-image teacher and its guided students, every row sampled by the STOCK StableDiffusionPipeline.

Rows (same prompts, same initial noise for every row; prompt i is class i mod 10, "a photo of a {class}"):

| row                      | model   | sampler                                             | UNet evaluations / image |
| ------------------------ | ------- | --------------------------------------------------- | ------------------------ |
| teacher DDIM (ceiling)   | teacher | CFG at s, DDIM on the trailing grid, --teacher_steps | 2 N (N at s = 1)         |
| teacher DDIM             | teacher | the same at each --teacher_nfe_steps                 | 2 N (N at s = 1)         |
| teacher DPM-Solver++(2M) | teacher | CFG at s, diffusers' multistep solver, trailing grid | 2 N (N at s = 1)         |
| student                  | student | its own saved stock scheduler, guidance input e(s-1) | N                        |

(The stock pipeline skips the unconditional batch at s = 1, where CFG equals the conditional prediction.)

Columns: prompted-class accuracy (the project's Fashion-MNIST classifier, `fashion_classifier.py`), the Frechet
distance in that classifier's 128-d features against the whole 10k test split (FD_cls), the standard Inception FID
against the first --num_reference test images for the rows named by --inception_rows (0.25 s per image on one CPU
core), UNet evaluations per image counted by a hook on the UNet (sum of batch sizes / images), wall time per image
(sampling + VAE decoding, on whatever machine runs it).

Each finished row is kept in <output_dir>/rows/<row>.json and its images in <output_dir>/images/<row>.pt, so a
rerun only computes what is missing (an Inception FID is added to a row later without sampling it again).
"""

import argparse
import io
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from diffusers_pd.atomic import atomic_write_bytes, atomic_write_text
from diffusers_pd.data import FASHION_MNIST_CLASSES, image_transform, load_fashion_mnist
from diffusers_pd.evaluation import InceptionFeatures, feature_statistics, fid_from_statistics, reference_statistics
from diffusers_pd.pipeline import image_grid
from diffusers_pd.training import format_table

from fashion_classifier import ClassifierFeatures, load_classifier
from text_to_image_teacher import class_prompts

GRID_COLUMNS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="The teacher's StableDiffusionPipeline folder.")
    parser.add_argument("--students", nargs="*", default=[], help="Student pipeline folders (train_distill.py).")
    parser.add_argument("--classifier_dir", required=True, help="Folder of fashion_classifier.py's classifier.pt.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--teacher_steps", type=int, default=64, help="Steps of the ceiling rows.")
    parser.add_argument("--teacher_nfe_steps", type=int, nargs="*", default=[4, 8], help="Teacher DDIM steps.")
    parser.add_argument("--dpm_solver_steps", type=int, nargs="*", default=[4, 8], help="Teacher DPM-Solver++ steps.")
    parser.add_argument("--num_samples", type=int, default=500, help="Images per row (a multiple of 10).")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--inception_rows", nargs="*", default=[],
                        help="Rows (names as in rows/) that get the Inception FID; 'all' for every row.")
    parser.add_argument("--num_reference", type=int, default=1000, help="Test images of the Inception reference.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.num_samples % len(FASHION_MNIST_CLASSES):
        parser.error(f"--num_samples {args.num_samples} is not a multiple of 10: every class gets the same count.")
    return args


class CallCounter:
    """Counts UNet evaluations (the sum of the batch sizes the UNet is called with) through a forward pre-hook."""

    def __init__(self, unet):
        self.evaluations = 0
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.evaluations += sample.shape[0]


def row_specs(args) -> list:
    """(name, kind, folder, steps, scale) of every row: targets first (ceiling, then the 4-step student)."""
    students = sorted(((int(json.loads((Path(f) / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
                                ["num_inference_steps"]), f) for f in args.students), reverse=True)
    rows = []
    for scale in args.guidance_scales:
        rows.append((f"teacher-ddim{args.teacher_steps}-s{scale:g}", "ddim", args.teacher, args.teacher_steps, scale))
        rows += [(f"student{n}-s{scale:g}", "student", f, n, scale) for n, f in students]
        rows += [(f"teacher-ddim{n}-s{scale:g}", "ddim", args.teacher, n, scale) for n in args.teacher_nfe_steps]
        rows += [(f"teacher-dpmpp{n}-s{scale:g}", "dpmpp", args.teacher, n, scale) for n in args.dpm_solver_steps]
    rows = list({row[0]: row for row in rows}.values())  # the ceiling may also be a --teacher_nfe_steps row
    order = {f"teacher-ddim{args.teacher_steps}-": 0, "student4": 1}
    return sorted(rows, key=lambda row: min((v for k, v in order.items() if row[0].startswith(k)), default=2))


def load_pipeline(kind: str, folder: str) -> StableDiffusionPipeline:
    """The stock pipeline; a teacher gets DDIM or DPM-Solver++(2M) on the trailing grid that ends at the clean sample."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if kind == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    elif kind == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2,
            final_sigmas_type="zero")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_row(pipe, noise: torch.Tensor, prompts: list, steps: int, scale: float, batch_size: int):
    """uint8 images (N, 1, 32, 32), UNet evaluations per image and seconds per image of one row."""
    counter = CallCounter(pipe.unet)
    images, started = [], time.perf_counter()
    for start in range(0, len(noise), batch_size):
        out = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=scale,
                   latents=noise[start:start + batch_size], output_type="pt").images
        images.append((out.clamp(0, 1) * 255).round().to(torch.uint8))
    seconds = time.perf_counter() - started
    return torch.cat(images), counter.evaluations / len(noise), seconds / len(noise)


def test_images(resolution: int = 32):
    """The test split as uint8 (N, 1, 32, 32) and labels, transformed as the teacher's training images."""
    dataset = load_fashion_mnist("test")
    transform = image_transform(resolution, 1, center_crop=True)
    pixels = torch.stack([transform(image) for image in dataset["image"]])
    return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(dataset["label"])


def batches(images: torch.Tensor, size: int = 250):
    return (images[i:i + size] for i in range(0, len(images), size))


def per_prompt_grid(images: torch.Tensor) -> Image.Image:
    """One row per prompt (class), GRID_COLUMNS samples each (sample i shows class i mod 10)."""
    classes = len(FASHION_MNIST_CLASSES)
    columns = min(GRID_COLUMNS, len(images) // classes)
    picks = [images[c + classes * j] for c in range(classes) for j in range(columns)]
    return image_grid([Image.fromarray(image[0].numpy(), "L") for image in picks], cols=columns)


def plot(rows: list, path: Path) -> None:
    """Accuracy and FD/FID against UNet evaluations per image, one line per sampler and guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("accuracy", "prompted-class accuracy"), ("fd_classifier", "FD (classifier features)")]
    if any(row.get("fid_inception") is not None for row in rows):
        metrics.append(("fid_inception", "Inception FID"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    colors = {1.0: "tab:blue", 3.0: "tab:orange", 5.0: "tab:green"}
    styles = {"student": "o-", "teacher DDIM": "s--", "teacher DPM-Solver++(2M)": "^:"}
    for axis, (key, label) in zip(axes, metrics):
        for family, style in styles.items():
            for scale in sorted({row["guidance_scale"] for row in rows}):
                points = sorted((row["unet_evaluations_per_image"], row[key]) for row in rows
                                if row["sampler"] == family and row["guidance_scale"] == scale and row.get(key) is not None)
                if points:
                    axis.plot(*zip(*points), style, color=colors.get(scale), label=f"{family}, s={scale:g}", markersize=4)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("UNet evaluations per image")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    for sub in ("rows", "images", "samples"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    prompts_by_class = class_prompts()
    prompts = [prompts_by_class[i % len(prompts_by_class)] for i in range(args.num_samples)]
    labels = torch.arange(args.num_samples) % len(prompts_by_class)
    noise = torch.randn((args.num_samples, 4, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    classifier = load_classifier(args.classifier_dir)
    features = ClassifierFeatures(classifier)
    test, _ = test_images()
    reference_cls = feature_statistics(batches(test, 1000), features, total=len(test), desc="classifier features, test")
    specs = row_specs(args)
    settings = dict(num_samples=args.num_samples, seed=args.seed)
    for name, kind, folder, steps, scale in specs:
        row_path, image_path = out / "rows" / f"{name}.json", out / "images" / f"{name}.pt"
        if row_path.is_file() and json.loads(row_path.read_text())["settings"] == settings:
            continue
        pipe = load_pipeline(kind, folder)
        images, evaluations, seconds = sample_row(pipe, noise, prompts, steps, scale, args.batch_size)
        pixels = images.float() / 127.5 - 1
        predicted = torch.cat([classifier(chunk).argmax(1) for chunk in pixels.split(500)])
        sampler = {"ddim": "teacher DDIM", "dpmpp": "teacher DPM-Solver++(2M)", "student": "student"}[kind]
        row = {"row": name, "sampler": sampler, "model": Path(folder).name, "steps": steps, "guidance_scale": scale,
               "unet_evaluations_per_image": evaluations, "seconds_per_image": round(seconds, 5),
               "accuracy": (predicted == labels).float().mean().item(),
               "fd_classifier": fid_from_statistics(feature_statistics(batches(images), features, desc=name), reference_cls),
               "fid_inception": None, "settings": settings}
        buffer = io.BytesIO()
        torch.save(images, buffer)
        atomic_write_bytes(image_path, buffer.getvalue())
        per_prompt_grid(images).save(out / "samples" / f"{name}.png")
        atomic_write_text(row_path, json.dumps(row, indent=2) + "\n")
        print(f"{name}: accuracy {row['accuracy']:.3f}, FD_cls {row['fd_classifier']:.2f}, "
              f"{evaluations:g} evals/image, {seconds * 1e3:.1f} ms/image", flush=True)

    wanted = [name for name, *_ in specs] if args.inception_rows == ["all"] else args.inception_rows
    if wanted:
        inception = InceptionFeatures()
        reference = reference_statistics(lambda: batches(test[:args.num_reference]), inception, dataset_name="fashion_mnist",
                                         split="test", resolution=32, num_channels=1, num_images=args.num_reference)
        for name in wanted:
            row_path = out / "rows" / f"{name}.json"
            row = json.loads(row_path.read_text())
            if row.get("fid_inception") is not None and row.get("num_reference") == args.num_reference:
                continue
            images = torch.load(out / "images" / f"{name}.pt", weights_only=True)
            row["fid_inception"] = fid_from_statistics(feature_statistics(batches(images), inception, desc=name), reference)
            row["num_reference"] = args.num_reference
            atomic_write_text(row_path, json.dumps(row, indent=2) + "\n")
            print(f"{name}: Inception FID {row['fid_inception']:.2f}", flush=True)

    rows = [json.loads((out / "rows" / f"{name}.json").read_text()) for name, *_ in specs
            if (out / "rows" / f"{name}.json").is_file()]
    rows.sort(key=lambda row: (row["guidance_scale"], row["sampler"] != "student", row["unet_evaluations_per_image"]))
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    table = [{"s": f"{row['guidance_scale']:g}", "sampler": row["sampler"], "steps": row["steps"],
              "UNet evals/image": f"{row['unet_evaluations_per_image']:g}", "accuracy": f"{100 * row['accuracy']:.1f}%",
              "FD_cls": f"{row['fd_classifier']:.2f}",
              "Inception FID": "-" if row.get("fid_inception") is None else f"{row['fid_inception']:.1f}",
              "ms/image": f"{1e3 * row['seconds_per_image']:.1f}"} for row in rows]
    atomic_write_text(out / "results.md", format_table(table) + "\n")
    plot(rows, out / "quality_vs_unet_evaluations.png")
    print(format_table(table))


if __name__ == "__main__":
    main()
