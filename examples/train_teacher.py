#!/usr/bin/env python
"""Train a diffusion teacher from scratch (Algorithm 1 of Salimans & Ho, ICLR 2022), with accelerate.

    accelerate launch examples/train_teacher.py --dataset_name fashion_mnist --resolution 28 \\
        --block_out_channels 64 128 128 --layers_per_block 2 --attention --train_batch_size 128 \\
        --max_train_steps 100000 --output_dir runs/teacher-fashion

The network is a UNet2DModel (from `--model_config_name_or_path`, or from the shape arguments) that predicts v
(or x) on the paper's cosine log-SNR schedule, tabulated at `--num_train_timesteps` points and stored as
`trained_betas`. The loss is the x-space MSE weighted by SNR + 1 (= the v-MSE) or max(SNR, 1). The final teacher
(EMA weights) is written to `output_dir/teacher/`: a stock `DDPMPipeline` folder (with a deterministic, trailing
`DDIMScheduler`) that `DiffusionPipeline.from_pretrained` loads without this package, with its model card,
`samples.png` and `training_cost.json`. It is the `--teacher` of `examples/train_distill.py`.

Every random draw of update s (images, flips, noise, timesteps) is a function of (seed, s) for the GLOBAL batch,
so `--resume_from_checkpoint latest` continues exactly, and K processes train as one process with the same global
batch (`train_batch_size` x processes x `gradient_accumulation_steps`).
"""

import argparse
import sys

from diffusers_pd import arguments  # standard library only: --help answers before the heavy imports below

GRAYSCALE_DATASETS = ("digits", "fashion_mnist")
SHAPE_ARGS = ("block_out_channels", "layers_per_block", "attention", "norm_num_groups", "dropout")
DEFAULT_SHAPE = {"block_out_channels": [64, 128, 128], "layers_per_block": 2}  # as the help texts say
# the paper's table, then diffusers_pd.schedules.BETA_SCHEDULES[:3] (spelled out: --help answers before any heavy import)
TEACHER_SCHEDULES = ("cosine_logsnr", "linear", "scaled_linear", "squaredcos_cap_v2")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A UNet2DModel config: config.json, a folder holding it, or a pipeline folder (unet/).")
    group.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                       help="Channels per resolution level; None: 64 128 128.")
    group.add_argument("--layers_per_block", type=int, default=None, help="ResNet blocks per level; None: 2.")
    group.add_argument("--attention", action="store_true", default=None,
                       help="Self-attention at the lowest resolution level and in the middle block; None: off.")
    group.add_argument("--norm_num_groups", type=int, default=None,
                       help="GroupNorm groups; None: the gcd of the channels, at most 32.")
    group.add_argument("--dropout", type=float, default=None, help="Dropout in the ResNet blocks; None: 0.")
    group.add_argument("--num_channels", type=int, default=None,
                       help=f"Image channels; None: 1 for {', '.join(GRAYSCALE_DATASETS)}, else 3.")
    group = parser.add_argument_group("diffusion")
    group.add_argument("--num_train_timesteps", type=int, default=1024,
                       help="Points T of the cosine log-SNR table, or of the beta schedule (Hub DDPM checkpoints: 1000).")
    group.add_argument("--beta_schedule", type=str, default="cosine_logsnr", choices=TEACHER_SCHEDULES,
                       help="cosine_logsnr: the paper's table, saved as trained_betas with a trailing DDIMScheduler; "
                            "else a diffusers beta schedule saved as a stock DDPMScheduler config (the Hub DDPM shape: "
                            "linear, T = 1000, epsilon).")
    group.add_argument("--beta_start", type=float, default=0.0001, help="First beta of linear / scaled_linear.")
    group.add_argument("--beta_end", type=float, default=0.02, help="Last beta of linear / scaled_linear.")
    group.add_argument("--prediction_type", type=str, default="v_prediction", choices=["v_prediction", "sample", "epsilon"],
                       help="What the network predicts (epsilon: the Hub DDPM shape; it breaks down at zero SNR).")
    group.add_argument("--loss_weighting", type=str, default="snr_plus_one", choices=["snr_plus_one", "truncated_snr", "snr"],
                       help="x-MSE weight: SNR + 1 (= v-MSE), max(SNR, 1), or SNR (= eps-MSE, DDPM's L_simple).")
    group = parser.add_argument_group("loop")
    group.add_argument("--max_train_steps", type=int, default=100_000, help="Optimizer updates.")
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Linear warmup, then a constant learning rate.")
    group.add_argument("--save_images_steps", type=int, default=1000, help="Sample a grid (EMA weights) every N updates.")
    group.add_argument("--num_inference_steps", type=int, default=256, help="DDIM steps of every sample grid.")
    group.add_argument("--teacher_dir", type=str, default=None,
                       help="Where the final teacher pipeline folder goes; None: OUTPUT_DIR/teacher.")
    arguments.add_data_args(parser, resolution_help="None: the sample_size of --model_config_name_or_path.")
    arguments.add_optimization_args(parser, learning_rate=2e-4, ema_decay=0.9999)
    arguments.add_output_args(parser, output_dir="teacher-output")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and argument errors answer here, before the heavy imports below
    parse_args()

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusers_pd import ProgressiveDistillationScheduler, __version__, checkpoints, cosine_trained_betas, data, interrupt, launch, training  # noqa: E402
from diffusers_pd.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from diffusers_pd.clipping import clipped_teacher, teacher_clip_range  # noqa: E402
from diffusers_pd.data import collate_pixel_values, load_image_dataset, preprocess_batch_fn, validate_image_dataset  # noqa: E402
from diffusers_pd.export import card_front_matter, ddim_scheduler, ddpm_scheduler, save_pipeline_folder  # noqa: E402
from diffusers_pd.loading import public_name  # noqa: E402
from diffusers_pd.loss import DiffusionLoss, RawOutput, draw_noise_and_grid_indices  # noqa: E402
from diffusers_pd.pipeline import sample_grid  # noqa: E402
from diffusers_pd.schedules import LOGSNR_MAX, LOGSNR_MIN  # noqa: E402

logger = get_logger(__name__)


def first_line(error: Exception) -> str:
    """The first line of an error message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_model_config(name_or_path: str) -> dict:
    """A UNet2DModel config from a config.json, a folder holding one, or a pipeline folder (its unet/)."""
    subfolder = "unet" if (Path(name_or_path) / "unet" / "config.json").is_file() else None
    config = dict(UNet2DModel.load_config(name_or_path, subfolder=subfolder))
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"--model_config_name_or_path holds a {config['_class_name']} config: pass a UNet2DModel one.")
    return config


def unet_config(args, template: dict, resolution: int, num_channels: int) -> dict:
    """The UNet2DModel config: `template` (from --model_config_name_or_path) at `resolution`, or the shape arguments'."""
    if template:
        return {**template, "sample_size": resolution}
    channels = args.block_out_channels or DEFAULT_SHAPE["block_out_channels"]
    down, up = ["DownBlock2D"] * len(channels), ["UpBlock2D"] * len(channels)
    if args.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return dict(
        sample_size=resolution, in_channels=num_channels, out_channels=num_channels, block_out_channels=channels,
        layers_per_block=args.layers_per_block or DEFAULT_SHAPE["layers_per_block"], down_block_types=down,
        up_block_types=up, add_attention=bool(args.attention), dropout=args.dropout or 0.0,
        norm_num_groups=args.norm_num_groups or min(32, math.gcd(*channels)),
    )


def run_signature(unet: UNet2DModel, args) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    config = {k: v for k, v in json.loads(json.dumps(dict(unet.config))).items() if not k.startswith("_")}
    return {"unet": config, "num_train_timesteps": args.num_train_timesteps, "prediction_type": args.prediction_type,
            **({} if args.beta_schedule == "cosine_logsnr" else {"schedule": schedule_config(args)})}


def schedule_config(args) -> dict:
    """The schedule keys of the teacher's scheduler: the cosine log-SNR table as trained_betas, or a beta schedule."""
    if args.beta_schedule == "cosine_logsnr":
        return {"num_train_timesteps": args.num_train_timesteps, "trained_betas": cosine_trained_betas(args.num_train_timesteps)}
    return {"num_train_timesteps": args.num_train_timesteps, "beta_schedule": args.beta_schedule,
            "beta_start": args.beta_start, "beta_end": args.beta_end}


def check_arguments(args) -> None:
    """The checks of the arguments alone (numbers, output folders, Hub)."""
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "save_images_steps", "num_inference_steps", "num_grid_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1.")
    if not 0 <= (args.ema_decay or 0) < 1:
        raise ValueError(f"--ema_decay {args.ema_decay} must be in [0, 1).")
    if args.num_train_timesteps < 2:
        raise ValueError("--num_train_timesteps must be at least 2.")
    if args.num_inference_steps > args.num_train_timesteps:
        raise ValueError(
            f"--num_inference_steps {args.num_inference_steps} exceeds --num_train_timesteps {args.num_train_timesteps}."
        )
    checkpoints.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                              leftovers=checkpoints.run_leftovers(args.logging_dir, "metrics.jsonl", "samples"))
    training.check_hub_args(args)
    teacher_dir = Path(args.teacher_dir or Path(args.output_dir) / "teacher")
    if args.teacher_dir and teacher_dir.is_dir() and any(teacher_dir.iterdir()):
        if not (teacher_dir / "model_index.json").is_file():
            raise ValueError(f"--teacher_dir {teacher_dir} is a non-empty folder but no pipeline: pass another one.")
        if not (args.overwrite_output_dir or args.resume_from_checkpoint):
            raise ValueError(f"--teacher_dir {teacher_dir} holds a pipeline: pass --overwrite_output_dir to replace it.")
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError(
            "Pass the training data: --dataset_name NAME (`digits`, `fashion_mnist` or a Hub data set) or --train_data_dir DIR."
        )
    if args.push_to_hub:  # the token and the repo, now: not after hours of training
        from diffusers_pd.hub import check_push_access

        check_push_access(args.hub_model_id, args.hub_token, args.hub_private_repo)


def build_unet(args) -> UNet2DModel:
    """The freshly initialised UNet2DModel: from a config file or from the shape arguments, never both."""
    given = [name for name in SHAPE_ARGS if getattr(args, name) is not None]
    if args.model_config_name_or_path and given:
        raise ValueError(f"--model_config_name_or_path sets the model; drop --{', --'.join(given)}.")
    template = load_model_config(args.model_config_name_or_path) if args.model_config_name_or_path else {}
    resolution = args.resolution or template.get("sample_size")
    if resolution is None:
        raise ValueError("Pass --resolution (the image size the teacher is trained at).")
    num_channels = template.get("in_channels") or args.num_channels or (1 if args.dataset_name in GRAYSCALE_DATASETS else 3)
    if args.num_channels and args.num_channels != num_channels:
        raise ValueError(f"--num_channels {args.num_channels} contradicts the model config's in_channels {num_channels}.")
    config = unet_config(args, template, resolution, num_channels)
    levels = len(config.get("block_out_channels", ()))
    if resolution % 2 ** max(levels - 1, 0):
        raise ValueError(f"--resolution {resolution} must be divisible by {2 ** (levels - 1)} for {levels} resolution levels.")
    try:
        unet = UNet2DModel.from_config(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"Cannot build the UNet2DModel: {first_line(error)}") from error
    if unet.config.in_channels != unet.config.out_channels:
        raise ValueError(
            f"The model outputs {unet.config.out_channels} channels for {unet.config.in_channels} inputs: they must match."
        )
    args.resolution, args.num_channels = resolution, num_channels
    return unet


def validate(args):
    """Every check that can fail, before anything is written: returns (unet, dataset, checkpoint or None)."""
    check_arguments(args)
    unet = build_unet(args)
    # the data: decode the first image through the training transform
    dataset, image_column = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split, args.image_column, args.cache_dir
    )
    validate_image_dataset(dataset, image_column, args.num_channels, args.resolution)
    transform = preprocess_batch_fn(image_column, args.resolution, args.num_channels, args.center_crop, random_flip=False)
    dataset.set_transform(transform)

    # the checkpoint to resume, made by a run with the same model and diffusion
    checkpoint = checkpoints.find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        made_by = checkpoints.read_progress(checkpoint).get("run")
        if made_by != run_signature(unet, args):
            raise ValueError(f"{checkpoint} was made with another model or diffusion: pass the arguments of that run.")
    return unet, dataset, checkpoint


MODEL_CARD = """{front_matter}
# Diffusion teacher: {dataset}, {resolution}x{resolution}

An unconditional diffusion model (`UNet2DModel`, {parameters:,} parameters) trained from scratch with Algorithm 1
of Salimans & Ho, *Progressive Distillation for Fast Sampling of Diffusion Models* (ICLR 2022), using
`diffusers_pd` {version}. It is a **teacher**: the model that progressive distillation
(`examples/train_distill.py --teacher {where}`) halves into students of fewer and fewer sampling steps.

It predicts `{prediction_type}` on {schedule_text}

![samples](samples.png)

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{where}")
images = pipe(batch_size=16, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).images
```

{sampler_text}

## Training

```bash
{command}
```

| | |
|---|---|
{rows}
"""

# indexed by "is it the cosine log-SNR table": (beta schedule, cosine table)
SCHEDULE_TEXT = (
    """the `{args.beta_schedule}` beta schedule ({betas}T =
{args.num_train_timesteps}), saved as a stock `DDPMScheduler` config, the shape of the Hub's DDPM checkpoints.""",
    """the paper's cosine log-SNR schedule lambda(t) = -2 log tan(a t + b), clipped
to [-20, 20], tabulated at T = {args.num_train_timesteps} points t_i = (i + 1) / T and stored as `trained_betas`, so every stock
diffusers scheduler reproduces it.""",
)
SAMPLER_TEXT = (
    """The saved `DDPMScheduler` samples ancestrally (1000 steps by default); for few deterministic steps load a
`DDIMScheduler` from its config, or use `diffusers_pd.ProgressiveDistillationPipeline`, which samples any step
count exactly.""",
    """The saved `DDIMScheduler` samples deterministic DDIM on the trailing grid, exactly when `num_inference_steps`
divides {T} (e.g. {steps}); `diffusers_pd.ProgressiveDistillationPipeline` samples any step count exactly.
Always pass `num_inference_steps` (the `DDPMPipeline` default, 1000, does not divide {T}).""",
)


def schedule_text(args) -> str:
    """The card's schedule sentence; beta_start / beta_end only where they define the schedule (linear, scaled_linear)."""
    if args.beta_schedule == "cosine_logsnr":
        return SCHEDULE_TEXT[1].format(args=args)
    betas = f"beta from {args.beta_start} to {args.beta_end}, " if args.beta_schedule in ("linear", "scaled_linear") else ""
    return SCHEDULE_TEXT[0].format(args=args, betas=betas)


def model_card(args, where: str, command: str, parameters: int, cost: dict, final_loss) -> str:
    """The teacher's Hub model card."""
    rows = {
        "data": args.dataset_name or public_name(args.train_data_dir), "resolution, channels": f"{args.resolution}, {args.num_channels}",
        "prediction type": args.prediction_type, "loss weighting": args.loss_weighting,
        "optimizer updates": cost["optimizer_updates"], "global batch": cost["global_batch_size"],
        "images seen": f"{cost['images_seen']:,}",
        "learning rate": f"{args.learning_rate} (Adam, {args.lr_warmup_steps} warmup updates, then constant)",
        "EMA decay": args.ema_decay or "none (raw weights)", "final loss (last 10 updates)": final_loss,
        "training wall time": f"{cost['train_wall_time_s'] / 60:.1f} min on {cost['num_processes']} x {cost['device']}",
    }
    steps = max(d for d in range(1, args.num_inference_steps + 1) if args.num_train_timesteps % d == 0)
    return MODEL_CARD.format(
        front_matter=card_front_matter("progressive-distillation-teacher"), dataset=args.dataset_name or public_name(args.train_data_dir), resolution=args.resolution, parameters=parameters,
        version=__version__, where=where, prediction_type=args.prediction_type,
        schedule_text=schedule_text(args),
        sampler_text=SAMPLER_TEXT[args.beta_schedule == "cosine_logsnr"].format(T=args.num_train_timesteps, steps=steps),
        steps=steps, command=command, rows="\n".join(f"| {k} | {v} |" for k, v in rows.items()),
    )


def stock_scheduler(scheduler_config):
    """The teacher folder's scheduler: a deterministic trailing DDIMScheduler for the cosine log-SNR table, a stock
    DDPMScheduler (as Hub DDPM checkpoints) for a beta schedule."""
    if scheduler_config.get("trained_betas") is not None:
        return ddim_scheduler(scheduler_config)
    return ddpm_scheduler(scheduler_config)


def grid_model(unet, scheduler_config):
    """The UNet as its sample grids show it: x-hat clamped where distillation will clamp it (`teacher_clip_range`)."""
    stock_config = dict(stock_scheduler(scheduler_config).config)
    return clipped_teacher(unet, stock_config, teacher_clip_range(stock_config))


def save_teacher(folder: Path, unet, scheduler_config, files: dict) -> None:
    """Write the teacher as a stock DDPMPipeline folder (`stock_scheduler`) with `files`, atomically."""
    if scheduler_config.get("trained_betas") is not None:
        metadata = {"method": "teacher", "schedule": "cosine_logsnr", "logsnr_min": LOGSNR_MIN, "logsnr_max": LOGSNR_MAX}
    else:
        metadata = {"method": "teacher", "schedule": scheduler_config["beta_schedule"]}
    stock = stock_scheduler(scheduler_config)
    save_pipeline_folder(folder, unet, stock, {**metadata, "diffusers_pd_version": __version__}, files)


def push_teacher(folder: Path, args) -> str:
    """Upload the teacher folder to `main` of --hub_model_id; returns the commit URL."""
    from huggingface_hub import HfApi

    from diffusers_pd.hub import IGNORE_PATTERNS, resolve_token

    api = HfApi(token=resolve_token(args.hub_token))
    api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True)
    info = api.upload_folder(repo_id=args.hub_model_id, folder_path=folder, commit_message="Upload teacher",
                             ignore_patterns=list(IGNORE_PATTERNS), delete_patterns=["*"])
    return info.commit_url


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return train(parse_args(argv), argv)
    except checkpoints.NonFiniteLossError as error:  # every process sees the same gathered loss, so all stop here
        sys.exit(f"error: {error}")


def train(args, argv) -> int:
    """Validate, train, save (and push) the teacher; returns the exit status."""
    set_seed(args.seed)  # the initial weights (and dropout); every other draw comes from data.step_generator
    # 1. check every input before writing anything
    try:
        unet, dataset, checkpoint = validate(args)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {first_line(error)}")
    output_dir = Path(args.output_dir)
    teacher_dir = Path(args.teacher_dir or output_dir / "teacher")

    # 2. accelerate, trackers, logging
    try:
        accelerator = launch.make_accelerator(args, "train_teacher")
    except ValueError as error:
        sys.exit(f"error: {error}")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 3. schedule, loss, model, optimizer, EMA; resume from a checkpoint
    scheduler = ProgressiveDistillationScheduler(**schedule_config(args), prediction_type=args.prediction_type)
    loss_fn = DiffusionLoss(scheduler, args.loss_weighting)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = training.make_optimizer(training.param_groups(unet.named_parameters()), args)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay) if args.ema_decay else None
    progress = {"global_step": 0, "images_seen": 0, "train_time_s": 0.0, "run": run_signature(unet, args)}
    if checkpoint is not None:
        progress = checkpoints.read_progress(checkpoint)
        checkpoints.load_checkpoint(accelerator, checkpoint, {"unet": unet}, optimizer, ema)
        logger.info(f"Resuming from {checkpoint} at update {progress['global_step']}", main_process_only=True)
    if ema is not None:
        ema.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    parameters = sum(p.numel() for p in unet.parameters())

    # 4. the data stream, from the exact micro-batch where training stopped
    accumulation = args.gradient_accumulation_steps
    sampler = data.GlobalBatchSampler(len(dataset), args.train_batch_size, rank, world, args.seed,
                                          start=progress["global_step"] * accumulation)
    # (its own generator: creating the iterator must not draw from the global RNG that a checkpoint restores)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                         collate_fn=collate_pixel_values, generator=torch.Generator().manual_seed(args.seed))
    batches = iter(loader)
    micro_batch = args.train_batch_size * world
    global_batch = micro_batch * accumulation
    shape = (micro_batch, args.num_channels, args.resolution, args.resolution)
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process and metrics_path.exists():  # drop updates after the checkpoint (they are redone)
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= progress["global_step"]]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))

    # 5. the updates: every random draw is a function of (seed, micro-step) for the global batch; take this slice
    stop = interrupt.StopSignals().install()  # Ctrl-C / SIGTERM: checkpoint at the current update, then stop
    bar = tqdm(total=args.max_train_steps, initial=progress["global_step"], desc="teacher",
               disable=not accelerator.is_local_main_process)
    session_start = time.time()
    for step in range(progress["global_step"], args.max_train_steps):
        lr = training.linear_warmup_lr(step, args.lr_warmup_steps, args.learning_rate)
        training.set_lr(optimizer, lr)
        update_loss = 0.0
        for micro in range(accumulation):
            generator = data.step_generator(args.seed, step * accumulation + micro)
            noise, timesteps = draw_noise_and_grid_indices(shape, args.num_train_timesteps, generator)
            flips = torch.rand(micro_batch, generator=generator) < 0.5
            images = next(batches)["pixel_values"].to(device)
            if args.random_flip:
                images = data.random_flips(images, data.rank_slice(flips, rank, args.train_batch_size))
            with accelerator.accumulate(unet):
                loss = loss_fn(RawOutput(unet), images, data.rank_slice(noise, rank, args.train_batch_size).to(device),
                               data.rank_slice(timesteps, rank, args.train_batch_size)).mean()
                global_loss = accelerator.gather(loss.detach()).mean()
                checkpoints.check_finite(global_loss, step + 1, output_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            update_loss += global_loss.item() / accumulation
        if ema is not None:
            ema.step(unet.parameters())
        global_step = step + 1
        progress.update(global_step=global_step, images_seen=progress["images_seen"] + global_batch)

        # 6. log, sample, checkpoint
        bar.update(1)
        bar.set_postfix(loss=f"{update_loss:.4f}", lr=f"{lr:.2e}")
        accelerator.log({"loss": update_loss, "lr": lr}, step=global_step)
        if accelerator.is_main_process:
            with metrics_path.open("a") as metrics:
                metrics.write(json.dumps({"step": global_step, "loss": update_loss, "lr": lr}) + "\n")
        if global_step % args.save_images_steps == 0 and accelerator.is_main_process:
            model = accelerator.unwrap_model(unet)
            if ema is not None:
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
            grid = sample_grid(grid_model(model, scheduler.config), scheduler.config, args.num_inference_steps,
                               args.num_grid_images, device)
            if ema is not None:
                ema.restore(model.parameters())
            training.log_grid(accelerator, grid, global_step)
            atomic_write_bytes(output_dir / "samples" / f"step-{global_step:07d}.png", training.png_bytes(grid))
        signum = stop.requested(accelerator) if global_step < args.max_train_steps else None
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps or signum:
            progress["train_time_s"] += time.time() - session_start
            session_start = time.time()
            saved = checkpoints.save_checkpoint(accelerator, output_dir, global_step, progress, {"unet": unet}, optimizer,
                                             ema, args.checkpoints_total_limit)
        if signum:
            bar.close()
            interrupt.stop_run(accelerator, signum, global_step, saved, training.resume_command(__file__, argv, world))
    bar.close()
    stop.restore()
    progress["train_time_s"] += time.time() - session_start

    # 7. the final teacher (EMA weights): a stock-loadable pipeline folder with card, samples and training cost
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    status = 0
    if accelerator.is_main_process:
        # from metrics.jsonl, which holds every update of the run, also those before a resume
        logged = [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()[-10:]]
        final_loss = f"{training.mean_or_nan(logged):.4f}"
        cost = {"optimizer_updates": progress["global_step"], "global_batch_size": global_batch,
                "images_seen": progress["images_seen"], "train_wall_time_s": round(progress["train_time_s"], 1),
                "parameters": parameters, "num_processes": world, "device": device.type,
                "mixed_precision": accelerator.mixed_precision}
        command = training.command_line(__file__, argv, world, public=True)
        grid = sample_grid(grid_model(unet, scheduler.config), scheduler.config, args.num_inference_steps,
                           args.num_grid_images, device)
        training.log_grid(accelerator, grid, progress["global_step"])
        card = ModelCard(model_card(args, args.hub_model_id or teacher_dir.resolve().name, command, parameters, cost, final_loss))
        save_teacher(teacher_dir, unet, scheduler.config, {
            "README.md": str(card).encode(), "samples.png": training.png_bytes(grid),
            "training_cost.json": (json.dumps(cost, indent=2) + "\n").encode(),
        })
        hub = "-"
        if args.push_to_hub:
            try:
                hub = push_teacher(teacher_dir, args)
            except Exception as error:  # the teacher is safe on disk: report, and exit non-zero at the end
                hub = (f"push failed ({type(error).__name__}: {first_line(error)}); "
                       f"retry: hf upload {args.hub_model_id} {teacher_dir}")
                status = 1

        # 8. summary
        print(f"\nTeacher trained: {progress['global_step']} updates x {global_batch} images "
              f"({progress['images_seen']:,} images seen) in {progress['train_time_s'] / 60:.1f} min; "
              f"final loss {final_loss}.\n  teacher:    {teacher_dir}\n  checkpoints, metrics.jsonl, logs: {output_dir}\n"
              f"  hub:        {hub}")
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
