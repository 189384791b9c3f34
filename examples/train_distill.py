#!/usr/bin/env python
"""Distil a UNet2DModel teacher into few-step students with accelerate: progressive distillation or SFD.

    accelerate launch examples/train_distill.py \\
        --teacher google/ddpm-cifar10-32 --dataset_name cifar10 \\
        --start_steps 1024 --end_steps 4 --iterations_per_stage 50000 --train_batch_size 128 \\
        --output_dir ddpm-cifar10-pd --push_to_hub --hub_model_id you/ddpm-cifar10-pd

    accelerate launch examples/train_distill.py --method sfd \\
        --teacher google/ddpm-cifar10-32 --nfe 2 3 4 5 --num_trajectories 200000 --train_batch_size 128 \\
        --second_stage --output_dir ddpm-cifar10-sfd

Progressive distillation (Salimans & Ho, ICLR 2022): each stage halves the student's steps (N -> N/2) on the
teacher's training data. SFD (Zhou et al., NeurIPS 2024): the student follows a DPM-Solver++ teacher's trajectories
from pure noise (no data; a conditional teacher's captions or labels only, distilled at s = 1 and guided at
sampling), one model for several NFEs with several --nfe. Every finished student is written to
`output_dir/student-{N}steps/` as a pipeline folder that `DiffusionPipeline.from_pretrained` loads without this
package. With no arguments it runs an offline CPU demo: the committed reference teacher (trained on scikit-learn's
8x8 digits) distilled from 64 to 1 step in about 4 minutes.
"""

import argparse
import sys
from pathlib import Path

from diffusers_pd import arguments  # standard library only: --help answers before the heavy imports below

REFERENCE_TEACHER = Path(__file__).resolve().parent / "reference_teacher"


DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "split", "cache_dir", "resolution",
              "center_crop", "random_flip", "dataloader_num_workers")
PD_ONLY_FLAGS = ("start_steps", "end_steps", "iterations_per_stage", "loss_weighting", "scale_lr_with_steps",
                 "prediction_type", "parameterization_switch_steps", "conversion_stage")
PD_FLAGS = (*PD_ONLY_FLAGS, *DATA_FLAGS)
GUIDED_FLAGS = ("guidance_scale_min", "guidance_scale_max", "guidance_iterations", "guidance_embedding_dim",
                "guidance_embedding_lr_scale", "fold_guidance_scale")  # not SFD's
GUIDANCE_FLAGS = ("guidance_scale_min", "guidance_scale_max", "guidance_iterations", "label_column", "null_class")
TEXT_FLAGS = ("guidance_embedding_dim", "guidance_embedding_lr_scale", "caption_column", "proportion_empty_prompts")
SFD_FLAGS = ("nfe", "teacher_solver", "teacher_steps_per_step", "afs", "loss", "num_trajectories", "grid", "second_stage",
             "second_stage_trajectories", "second_stage_learning_rate")
DEFAULT_LEARNING_RATE = {"progressive": 3e-4, "sfd": 5e-5}
# flags of unconditional distillation that the distillation of a conditional teacher does not read
UNCONDITIONAL_PD_FLAGS = ("scale_lr_with_steps", "conversion_stage")


def refuse_unconditional_flags(args) -> None:
    """One clear line for a flag of unconditional progressive distillation given with a conditional teacher."""
    for name in UNCONDITIONAL_PD_FLAGS:
        if name in args.given:
            raise ValueError(f"--{name} applies to unconditional teachers only; distillation of this conditional "
                             "teacher does not read it: drop it.")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments; defaults run the offline demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("distillation")
    group.add_argument("--method", type=str, default="progressive", choices=["progressive", "sfd"],
                       help="Progressive distillation (halving stages, needs the teacher's data) or SFD (teacher "
                       "trajectories from pure noise, no data).")
    group.add_argument("--teacher", "--pretrained_teacher_model", "--pretrained_model_name_or_path", dest="teacher",
                       type=str, default=str(REFERENCE_TEACHER),
                       help="Hub id or folder: a pipeline (unet/ + scheduler/) or a UNet2DModel folder.")
    group.add_argument("--teacher_scheduler", type=str, default=None,
                       help="Scheduler folder or pipeline for a bare UNet folder; None: the teacher's own scheduler.")
    group.add_argument("--teacher_revision", type=str, default=None, help="Branch, tag or commit of a Hub teacher; None: main.")
    group.add_argument("--num_validation_samples", type=int, default=64,
                       help="Fixed noises on which each student is compared with the teacher (0: off).")
    group = parser.add_argument_group("progressive distillation (--method progressive)")
    group.add_argument("--start_steps", type=int, default=64, help="The teacher's sampling steps (the first stage's 2N).")
    group.add_argument("--end_steps", type=int, default=1, help="Steps of the last student.")
    group.add_argument("--iterations_per_stage", type=int, nargs="+", default=[300],
                       help="Updates per stage (the paper's K: 50000); several: one per stage in order, the last "
                       "repeating (e.g. 1200 1200 300: 4x the updates for the first two stages).")
    group.add_argument("--loss_weighting", type=str, default="auto", choices=["auto", "truncated_snr", "snr_plus_one", "snr"],
                       help="x-MSE weight: max(SNR, 1) (the paper's), SNR + 1 (= the v-MSE) or SNR (= the eps-MSE); auto: "
                       "SNR for epsilon students, max(SNR, 1) otherwise.")
    group.add_argument("--scale_lr_with_steps", action=argparse.BooleanOptionalAction, default=True,
                       help="An N-step epsilon or x student trains at --learning_rate x min(1, 4 / N) (its target "
                       "differs from its teacher by the DDIM error, O(1/N)); v students at --learning_rate.")
    group.add_argument("--prediction_type", type=str, default="auto", choices=["auto", "epsilon", "sample", "v_prediction"],
                       help="The students' parameterization; auto: the teacher's, except that an epsilon teacher's "
                       "students predict v from --parameterization_switch_steps on.")
    group.add_argument("--parameterization_switch_steps", type=int, default=None,
                       help="Students with more steps keep the teacher's parameterization; None: 4 for auto on an epsilon "
                       "teacher, else the first stage (switch at once).")
    group.add_argument("--conversion_stage", action="store_true",
                       help="Before the switch, one stage at the teacher's own steps regresses its prediction in the new "
                       "parameterization (one teacher call per sample).")
    group.add_argument("--teacher_clip_sample", type=str, default="auto", choices=["auto", "on", "off"],
                       help="Clamp the original teacher's x-hat to [-clip_sample_range, clip_sample_range] in its DDIM "
                       "steps (targets, references, baselines; a conditional teacher's classifier-free-guided x-hat after "
                       "the combination) and, with --method sfd, in its solver (conditional teachers at s = 1); auto: "
                       "where its scheduler config says clip_sample (the Hub's DDPM checkpoints do) and an eps teacher "
                       "breaks without it (alpha < 1e-3 at t = T); for other clip_sample eps teachers, progressive distillation "
                       "clamps the teacher of the halving where its students leave eps (4 steps by default). Students are "
                       "never clipped; a clipped eps teacher's students predict v from the first stage (--prediction_type auto).")
    group = parser.add_argument_group("SFD (--method sfd)")
    group.add_argument("--nfe", type=int, nargs="+", default=[4],
                       help="The student's network calls per sample; several (e.g. 2 3 4 5) train one SFD-v student for all.")
    group.add_argument("--teacher_solver", type=str, default="dpm_solver_3m",
                       choices=["dpm_solver_3m", "dpm_solver_2m", "heun", "ddim"], help="The teacher's ODE solver.")
    group.add_argument("--teacher_steps_per_step", type=int, default=None,
                       help="K: teacher solver steps per student step (the paper's M + 1). None: the grid's setting "
                       "(4; 8 for --grid auto's trailing).")
    group.add_argument("--afs", action=argparse.BooleanOptionalAction, default=None,
                       help="Analytic first step: the first step uses eps = x, saving one network call. None: the grid's "
                       "setting (on; off for --grid auto's trailing).")
    group.add_argument("--loss", type=str, default="l1", choices=["l1", "l2", "pseudo_huber"], help="Trajectory distance.")
    group.add_argument("--num_trajectories", type=int, default=4096,
                       help="Budget: teacher trajectories drawn in all (each iteration a global batch of them).")
    group.add_argument("--grid", type=str, default="auto", choices=["auto", "trailing", "karras", "lu", "sfd"],
                       help="Student grid: auto picks the measured best for the smallest --nfe (from 4 NFE: lu with AFS "
                       "and K = 4; below: trailing without AFS, K = 32); lu (uniform log-SNR) / karras / trailing sample "
                       "exactly in stock diffusers; sfd is the paper's (sampled by diffusers_pd only).")
    group.add_argument("--second_stage", action="store_true",
                       help="Then distil the largest-NFE student into a 1-NFE student (its own sampler as the teacher).")
    group.add_argument("--second_stage_trajectories", type=int, default=None,
                       help="The second stage's budget; None: --num_trajectories.")
    group.add_argument("--second_stage_learning_rate", type=float, default=5e-4, help="The second stage's learning rate.")
    group = parser.add_argument_group("conditional teachers (a Stable Diffusion pipeline, or a UNet2DModel with num_class_embeds)")
    group.add_argument("--guidance_scale_min", type=float, default=1.0,
                       help="Smallest classifier-free guidance scale s the students learn (diffusers' scale; 1 = none).")
    group.add_argument("--guidance_scale_max", type=float, default=5.0, help="Largest guidance scale s the students learn.")
    group.add_argument("--guidance_iterations", type=int, default=None,
                       help="Updates of the guided stage (the student learns the teacher's guided output); None: "
                       "the first --iterations_per_stage.")
    group.add_argument("--label_column", type=str, default="label", help="Column holding a class-conditional teacher's labels.")
    group.add_argument("--null_class", type=int, default=None,
                       help="A class-conditional teacher's unconditional label (for guidance); None: its last class embedding.")
    group.add_argument("--guidance_embedding_dim", type=int, default=256,
                       help="Size of the students' guidance embedding (`time_cond_proj_dim`).")
    group.add_argument("--guidance_embedding_lr_scale", type=float, default=10.0,
                       help="The guided stage's learning rate for the new, zero-initialised guidance embedding "
                       "(time_embedding.cond_proj) is this x --learning_rate (it learns from scratch); the halvings train "
                       "it like every other weight. 1: one learning rate for all.")
    group.add_argument("--fold_guidance_scale", action="store_true",
                       help="Text-to-image, with --guidance_scale_min = --guidance_scale_max: save each student with that "
                       "scale folded into its time-embedding bias, a plain UNet2DConditionModel (no time_cond_proj_dim) "
                       "that StableDiffusionPipeline runs at guidance_scale=1, one UNet call per step.")
    group.add_argument("--caption_column", type=str, default="text", help="Column holding the captions.")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="Share of captions replaced by the empty prompt, drawn per batch.")
    arguments.add_data_args(parser, resolution_help="None: the teacher's (the UNet's sample_size x the VAE's factor).")
    arguments.add_optimization_args(parser, learning_rate=None,
                                    learning_rate_help="None: 3e-4 for progressive, 5e-5 (the paper's, for "
                                    "~200k trajectories) for sfd; at a few thousand trajectories 2e-4 measured better")
    arguments.add_memory_args(parser)
    arguments.add_output_args(parser, output_dir="pd-output")
    args = parser.parse_args(argv)
    given = arguments.given_flags(parser, sys.argv[1:] if argv is None else argv)
    # SFD takes the data flags (a conditional teacher's captions or labels); `validate` refuses them for an unconditional one
    foreign = [name for name in (SFD_FLAGS if args.method == "progressive" else PD_ONLY_FLAGS + GUIDED_FLAGS) if name in given]
    args.given = given
    if foreign:
        other = "sfd" if args.method == "progressive" else "progressive"
        hint = ("(SFD distils a conditional teacher at s = 1; pass guidance_scale when sampling its students)"
                if foreign[0] in GUIDED_FLAGS else f"or pass --method {other}")
        parser.error(f"--{foreign[0]} is not a flag of --method {args.method}: drop it {hint}.")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.method]
    if args.method == "progressive" and args.dataset_name is None and args.train_data_dir is None \
            and Path(args.teacher) == REFERENCE_TEACHER:
        args.dataset_name = "digits"  # the embedded demo's data
    return args


if __name__ == "__main__":  # --help and argument errors answer here, before the heavy imports below
    parse_args()

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusers_pd import ProgressiveDistillationScheduler, checkpoints, interrupt, launch, training  # noqa: E402
from diffusers_pd.atomic import atomic_write_text  # noqa: E402
from diffusers_pd.data import load_image_dataset, preprocess_batch_fn, validate_image_dataset  # noqa: E402
from diffusers_pd.guidance import check_foldable_range, check_guidance_range  # noqa: E402
from diffusers_pd.conditioning import ClassConditioning, TextConditioning  # noqa: E402
from diffusers_pd.guided import GuidedDistillation  # noqa: E402
from diffusers_pd.lora import add_lora, fuse_lora  # noqa: E402
from diffusers_pd.loading import is_text_to_image_pipeline, load_sd_teacher, load_teacher, public_name  # noqa: E402
from diffusers_pd.method import DistillationMethod, FinishedStudent, LoopContext, Stage, stage_budgets  # noqa: E402
from diffusers_pd.pipeline import mean_squared_distance, sampler_grid  # noqa: E402
from diffusers_pd.progressive import ProgressiveDistillation, stage_steps  # noqa: E402
from diffusers_pd.sfd import SimpleFastDistillation  # noqa: E402
from diffusers_pd.text_image_data import (  # noqa: E402
    check_resolution, encode_text_image_dataset, load_text_image_dataset, vae_scale_factor,
)

logger = get_logger(__name__)
SUMMARY_NOTE = (
    "first_loss / final_loss: mean loss of the stage's first / last 10 updates (SFD: of each iteration's last student "
    "step). mse_to_teacher: mean squared "
    "distance of the student's samples to the original teacher's reference samples from the same noise (progressive: "
    "its start_steps DDIM; sfd: its solver on the largest student's fine grid); teacher_ddim_mse: the same for the "
    "teacher's own DDIM at the student's steps (the student should be below it)."
)


def validate(args):
    """Every check that can fail, before anything is written: returns (teacher unet, its scheduler config, dataset)."""
    checkpoints.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                              leftovers=checkpoints.run_leftovers(args.logging_dir, "encoded_data.safetensors"))
    training.check_hub_args(args)
    training.check_memory_args(args)
    if args.method == "progressive":
        stage_steps(args.start_steps, args.end_steps)
    names = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"]
    names += [] if args.method == "progressive" else ["num_trajectories"]
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1.")
    if args.push_to_hub:  # the token and the repo, now: not after the first stage
        from diffusers_pd.hub import check_push_access

        check_push_access(args.hub_model_id, args.hub_token, args.hub_private_repo)
    if is_text_to_image_pipeline(args.teacher, args.teacher_revision):
        return validate_text_to_image(args)
    text_only = [name for name in TEXT_FLAGS if name in args.given]
    if text_only:
        raise ValueError(f"--{text_only[0]} is for text-to-image teachers: {args.teacher} is no Stable Diffusion pipeline.")
    teacher, scheduler_config = load_teacher(args.teacher, args.teacher_scheduler, args.teacher_revision)
    if args.method == "progressive" and args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Pass the teacher's training data: --dataset_name NAME (or `digits`, `fashion_mnist`) or --train_data_dir DIR.")
    if teacher.config.out_channels != teacher.config.in_channels:
        raise ValueError(
            f"The teacher outputs {teacher.config.out_channels} channels for {teacher.config.in_channels} input channels "
            "(learned variance?): only plain epsilon / sample / v outputs can be distilled."
        )
    # scheduler checks: prediction types, zero-SNR
    ProgressiveDistillationScheduler.from_config(scheduler_config)
    if "fold_guidance_scale" in args.given:
        raise ValueError("--fold_guidance_scale is for text-to-image teachers: " + (
            "a class-conditional UNet2DModel has no guidance input, so its students already build their one scale "
            "(--guidance_scale_min = --guidance_scale_max) into their weights; drop it."
            if teacher.config.num_class_embeds is not None else f"{args.teacher} is an unconditional UNet2DModel; drop it."))
    if teacher.config.num_class_embeds is not None:
        return validate_class_conditional(args, teacher, dict(scheduler_config))
    guidance_only = [name for name in GUIDANCE_FLAGS if name in args.given]
    if guidance_only:
        raise ValueError(f"--{guidance_only[0]} is for conditional teachers: {args.teacher} is an unconditional UNet2DModel "
                         "(no num_class_embeds, no text encoder).")
    if args.method == "sfd":
        data_flags = [name for name in DATA_FLAGS if name in args.given]
        if data_flags:
            raise ValueError(f"--{data_flags[0]} is not a flag of --method sfd for an unconditional teacher: drop it (SFD needs "
                             "no data; only a conditional teacher's captions or labels).")
        return teacher, dict(scheduler_config), None
    check_start_steps(args.start_steps, scheduler_config)
    return teacher, dict(scheduler_config), load_pixel_dataset(args, teacher)


def check_start_steps(start_steps: int, scheduler_config) -> None:
    """The first stage's teacher needs 2 x start_steps distinct timesteps: one clear error if the schedule has fewer."""
    num_train_timesteps = int(scheduler_config["num_train_timesteps"])
    if start_steps > num_train_timesteps // 2:
        raise ValueError(
            f"--start_steps {start_steps}: the first stage's teacher needs 2 x {start_steps} distinct timesteps "
            f"but the teacher has num_train_timesteps={num_train_timesteps}; use --start_steps {num_train_timesteps // 2} or less."
        )


def load_pixel_dataset(args, teacher, label_column=None):
    """The teacher's image data at its sample_size, checked, transformed to pixel_values (`label_column`: must exist)."""
    sample_size = teacher.config.sample_size
    args.resolution = args.resolution or sample_size
    if args.resolution != sample_size:
        raise ValueError(f"--resolution {args.resolution} differs from the teacher's sample_size {sample_size}: drop it or pass {sample_size}.")
    dataset, image_column = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split, args.image_column, args.cache_dir
    )
    if label_column is not None and label_column not in dataset.column_names:
        raise ValueError(f"label column {label_column!r} not found; columns are {dataset.column_names}: pass the "
                         "classes' column with `--label_column`.")
    validate_image_dataset(dataset, image_column, teacher.config.in_channels, args.resolution)
    dataset.set_transform(preprocess_batch_fn(image_column, args.resolution, teacher.config.in_channels, args.center_crop, random_flip=False))
    return dataset


def validate_text_to_image(args):
    """The checks of a Stable Diffusion teacher: returns (its unet, scheduler config, (components, image-caption data)).
    SFD reads the same data for its captions (the trajectories' conditions)."""
    components, scheduler_config = load_sd_teacher(args.teacher, args.teacher_revision)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Pass the teacher's image-caption data: --train_data_dir DIR (an imagefolder with metadata.jsonl) "
                         "or --dataset_name NAME, with --caption_column.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise ValueError(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}.")
    ProgressiveDistillationScheduler.from_config(scheduler_config)  # schedule and prediction-type checks
    refuse_unconditional_flags(args)  # SFD refused the others as progressive-only flags already
    if args.method == "progressive":
        check_guidance_range(args.guidance_scale_min, args.guidance_scale_max)
        if args.fold_guidance_scale:
            check_foldable_range(args.guidance_scale_min, args.guidance_scale_max)
        stage_budgets(args.iterations_per_stage, len(stage_steps(args.start_steps, args.end_steps)))  # before encoding
        if (args.guidance_iterations or args.iterations_per_stage[0]) < 1:
            raise ValueError("--guidance_iterations must be at least 1.")
        if args.guidance_embedding_lr_scale <= 0:
            raise ValueError(f"--guidance_embedding_lr_scale must be positive, got {args.guidance_embedding_lr_scale} (1: --learning_rate).")
        check_start_steps(args.start_steps, scheduler_config)
    unet, vae = components["unet"], components["vae"]
    args.resolution = args.resolution or unet.config.sample_size * vae_scale_factor(vae)
    check_resolution(args.resolution, vae)
    if args.resolution // vae_scale_factor(vae) != unet.config.sample_size:
        raise ValueError(f"--resolution {args.resolution} gives {args.resolution // vae_scale_factor(vae)}-pixel latents; the "
                         f"teacher's UNet takes {unet.config.sample_size}: drop it or pass {unet.config.sample_size * vae_scale_factor(vae)}.")
    dataset, image_column, caption_column = load_text_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split, args.image_column, args.caption_column,
        args.cache_dir)
    return unet, dict(scheduler_config), (components, dataset, image_column, caption_column)


def validate_class_conditional(args, teacher, scheduler_config):
    """The checks of a class-conditional UNet2DModel teacher: returns (teacher, config, ClassConditioning of its data).
    SFD reads the same data for its labels (the trajectories' conditions)."""
    if teacher.config.class_embed_type is not None:
        raise ValueError(f"The teacher's class_embed_type is {teacher.config.class_embed_type!r}: only integer labels "
                         "(num_class_embeds, class_embed_type None) are supported.")
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Pass the teacher's labelled training data: --dataset_name NAME (or `digits`, `fashion_mnist`) or "
                         "--train_data_dir DIR, with --label_column.")
    refuse_unconditional_flags(args)  # SFD refused the others as progressive-only flags already
    if args.method == "progressive":
        check_guidance_range(args.guidance_scale_min, args.guidance_scale_max)
        stage_steps(args.start_steps, args.end_steps)
        check_start_steps(args.start_steps, scheduler_config)
    dataset = load_pixel_dataset(args, teacher, label_column=args.label_column)
    labels = torch.tensor(dataset.with_format(columns=[args.label_column])[args.label_column])
    images = torch.cat([torch.stack(dataset[i:i + 1000]["pixel_values"]) for i in range(0, len(dataset), 1000)])
    conditioning = ClassConditioning(images.float().contiguous(), labels, num_class_embeds=teacher.config.num_class_embeds,
                                     null_class=args.null_class)
    return teacher, scheduler_config, conditioning


def encode_data(args, data, accelerator):
    """The teacher's encodings of the image-caption pairs, cached in output_dir (computed once, read on resume)."""
    components, dataset, image_column, caption_column = data
    components = {name: module.to(accelerator.device) if hasattr(module, "to") else module for name, module in components.items()}
    return components, encode_text_image_dataset(
        dataset, image_column=image_column, caption_column=caption_column, vae=components["vae"],
        tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], resolution=args.resolution,
        center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
        cache_path=Path(args.output_dir) / "encoded_data.safetensors")


def make_method(args, scheduler_config, dataset, teacher, num_processes: int) -> DistillationMethod:
    """The distillation method of `--method`, from the arguments (raises ValueError on a bad combination)."""
    if isinstance(dataset, tuple):  # a text-to-image teacher's encodings
        components, data = dataset
        dataset = TextConditioning(components, data, embedding_dim=args.guidance_embedding_dim,
                                   proportion_empty_prompts=args.proportion_empty_prompts,
                                   fold_guidance_scale=args.fold_guidance_scale)
    conditioning = dataset if isinstance(dataset, (TextConditioning, ClassConditioning)) else None
    if conditioning is not None and args.method == "progressive":  # guided distillation, then halvings
        return GuidedDistillation(
            dataset, scheduler_config, guidance_scale_min=args.guidance_scale_min, guidance_scale_max=args.guidance_scale_max,
            guidance_iterations=args.guidance_iterations or args.iterations_per_stage[0],
            iterations_per_stage=args.iterations_per_stage, start_steps=args.start_steps, end_steps=args.end_steps,
            prediction_type=args.prediction_type, learning_rate=args.learning_rate,
            embedding_lr_scale=args.guidance_embedding_lr_scale, teacher_clip_sample=args.teacher_clip_sample,
            switch_steps=args.parameterization_switch_steps,
            loss_weighting="truncated_snr" if args.loss_weighting == "auto" else args.loss_weighting,  # not measured there
        )
    sample_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    if args.method == "progressive":
        return ProgressiveDistillation(
            scheduler_config, dataset, sample_shape, start_steps=args.start_steps, end_steps=args.end_steps,
            iterations_per_stage=args.iterations_per_stage, prediction_type=args.prediction_type,
            loss_weighting=args.loss_weighting, learning_rate=args.learning_rate, random_flip=args.random_flip,
            dataloader_num_workers=args.dataloader_num_workers, switch_steps=args.parameterization_switch_steps,
            conversion_stage=args.conversion_stage, scale_lr_with_steps=args.scale_lr_with_steps,
            teacher_clip_sample=args.teacher_clip_sample,
        )
    global_batch = args.train_batch_size * num_processes
    if args.nfe and len(args.nfe) > 1:
        from diffusers_pd.step_embedding import check_no_class_embedding

        check_no_class_embedding(teacher)
    second = args.second_stage_trajectories or args.num_trajectories
    return SimpleFastDistillation(
        scheduler_config, sample_shape, nfes=args.nfe, iterations=math.ceil(args.num_trajectories / global_batch),
        afs=args.afs, teacher_solver=args.teacher_solver, teacher_steps_per_step=args.teacher_steps_per_step,
        loss=args.loss, grid=args.grid, learning_rate=args.learning_rate, second_stage=args.second_stage,
        second_stage_iterations=math.ceil(second / global_batch), second_stage_learning_rate=args.second_stage_learning_rate,
        conditioning=conditioning, teacher_clip_sample=args.teacher_clip_sample,
    )


@torch.no_grad()
def validation_references(teacher, method: DistillationMethod, args):
    """Fixed noise, the ORIGINAL teacher's reference samples from it, and its own DDIM distance at each step count."""
    if not args.num_validation_samples:
        return None
    shape = (args.num_validation_samples, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(teacher.device, teacher.dtype)
    reference = method.reference_sampler()(teacher, latents)
    steps = sorted({n for stage in method.stages() for n in stage.steps}, reverse=True)
    ddim = {n: mean_squared_distance(method.teacher_baseline(n)(teacher, latents), reference) for n in steps}
    return {"latents": latents, "reference": reference, "ddim": ddim}


def push(args) -> str:
    """Push every finished student not yet on the Hub (this one, and any earlier failed push), newest last."""
    from diffusers_pd.hub import HubPushError, push_pending

    try:
        push_pending(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
        return "pushed"
    except HubPushError as error:
        logger.error(f"{error}", main_process_only=True)  # training goes on: the student is safe on disk
        return "push failed"


def finish_student(done: FinishedStudent, stage: Stage, row: dict, validation, accelerator, method, args, step: int) -> dict:
    """Measure one finished student against the teacher's reference, save it (and push it); returns its summary row."""
    row = {"stage": row["stage"], "steps": done.nfe, "prediction_type": done.prediction_type, **row,
           "student": done.folder_name}
    if validation is not None:
        row["mse_to_teacher"] = mean_squared_distance(done.sampler(done.unet, validation["latents"]), validation["reference"])
        row["teacher_ddim_mse"] = validation["ddim"][done.nfe]
        row["vs_teacher_ddim"] = "better" if row["teacher_ddim_mse"] > 0 else "-"  # 0: the reference's own sampler
        if 0 < row["teacher_ddim_mse"] < row["mse_to_teacher"]:  # the stage did not distil: say what usually helps
            row["vs_teacher_ddim"] = f"WORSE: raise {method.budget_flag}"
            logger.warning(
                f"Stage {stage.name}: the {done.nfe}-step student is further from the teacher's reference samples "
                f"(MSE {row['mse_to_teacher']:.4g}) than the teacher's own {done.nfe}-step DDIM "
                f"({row['teacher_ddim_mse']:.4g}): raise {method.budget_flag} (this stage: {stage.iterations} "
                f"iterations of {row['global_batch']} {method.unit}) for a student worth its steps.",
                main_process_only=True)
    if accelerator.is_main_process and done.saved:
        grid = sampler_grid(done.unet, done.sampler, args.num_grid_images, accelerator.device, decode=method.decode)
        training.log_grid(accelerator, grid, step, f"samples/{done.nfe}steps")
        done.save(
            Path(args.output_dir) / done.folder_name,
            teacher=public_name(args.teacher), teacher_source="local" if Path(args.teacher).exists() else "hub",
            extra_files={"samples.png": training.png_bytes(grid)}, card_repo_id=args.hub_model_id,
            card_training=method.card_training(stage, row["global_batch"]), stage=stage.index + 1,
        )
        row["hub"] = push(args) if args.push_to_hub else "-"
    else:
        row["hub"] = "-"
    return row


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return distill(parse_args(argv), argv)
    except checkpoints.NonFiniteLossError as error:  # every process sees the same reduced loss, so all stop here
        sys.exit(f"error: {error}")


def distill(args, argv) -> dict:
    """Validate, then run every stage of the method; returns the per-student history."""
    # 1. check everything before writing anything
    try:
        teacher, scheduler_config, dataset = validate(args)
        if args.method == "sfd" and args.gradient_accumulation_steps > 1:
            raise ValueError("--gradient_accumulation_steps: SFD updates once per student step along a trajectory; "
                             "raise --train_batch_size or use more processes instead.")
        text_to_image = isinstance(dataset, tuple)
        if not text_to_image:
            method = make_method(args, scheduler_config, dataset, teacher, launch.launched_process_count())
        elif args.method == "sfd":  # SFD's own checks (NFE, grids) now, before encoding the data writes its cache
            make_method(args, scheduler_config, None, teacher, launch.launched_process_count())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    output_dir = Path(args.output_dir)

    # 2. accelerate, trackers, logging
    try:
        accelerator = launch.make_accelerator(args, "train_distill")
    except ValueError as error:
        sys.exit(f"error: {error}")
    device = accelerator.device
    set_seed(args.seed)  # dropout and anything else on the global RNGs (restored from a checkpoint on resume)
    if text_to_image:  # the teacher encodes its training pairs once (latents, text embeddings), cached in output_dir
        try:
            method = make_method(args, scheduler_config, encode_data(args, dataset, accelerator), teacher, accelerator.num_processes)
        except ValueError as error:  # e.g. an image without a caption, found while encoding
            sys.exit(f"error: {error}")

    for note in method.notes():
        logger.warning(note)

    # 3. resume: which stage, which iteration, the teacher of that stage
    stages = method.stages()
    stage_names, budgets = [stage.name for stage in stages], [stage.iterations for stage in stages]
    progress = {"stage": 0, "step": 0, "global_step": 0, "history": []}
    # the original teacher's reference samples (the target of every stage) and its DDIM at each N, on fixed noise
    validation = validation_references(teacher.to(device).eval(), method, args) if accelerator.is_main_process else None
    checkpoint = checkpoints.find_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        progress = checkpoints.read_progress(checkpoint)
        try:
            checkpoints.check_resumable(checkpoint, progress, stage_names, budgets, method.state())
        except ValueError as error:
            sys.exit(f"error: {error}")
        teacher = method.resume_teacher(teacher, progress["stage"])
        checkpoints.load_checkpoint(accelerator, checkpoint, {"teacher": teacher})
        method.load_state(progress)
        if progress["stage"] < len(stages):
            logger.info(f"Resuming from {checkpoint}: stage {progress['stage'] + 1}/{len(stages)}, iteration {progress['step']}")
        else:
            logger.info(f"{checkpoint} ends a finished run: nothing left to train (a smaller --end_steps extends it).")
    teacher.to(device).eval().requires_grad_(False)
    stop = interrupt.StopSignals().install()  # Ctrl-C / SIGTERM: checkpoint at the current iteration, then stop
    ctx = LoopContext(device, accelerator.process_index, accelerator.num_processes, args.train_batch_size,
                      args.gradient_accumulation_steps, args.seed)
    global_batch = ctx.global_batch_size * args.gradient_accumulation_steps
    history = progress["history"]
    for stage in stages[progress["stage"]:]:
        resume_step = progress["step"] if stage.index == progress["stage"] else 0

        # 4. a new student (the teacher's copy); a fresh optimizer every stage (as the reference code)
        student = method.init_student(teacher, stage)
        added = set(dict(student.named_parameters())) - set(dict(teacher.named_parameters()))  # new at this stage
        if args.lora_rank:  # adapters on the attention projections; layers the method added train whole
            student = add_lora(student, args.lora_rank, alpha=args.lora_alpha, trainable=added)
        launch.cast_frozen(teacher, launch.weight_dtype(accelerator.mixed_precision))  # frozen; the student keeps fp32 master weights
        if args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        # a layer new at this stage (the guided stage's zero-initialised guidance embedding) learns from scratch: its own lr
        lr_scales = {name: args.guidance_embedding_lr_scale for name in added}
        optimizer = training.make_optimizer(training.param_groups(student.named_parameters(), lr_scales), args)
        ema = EMAModel(student.parameters(), decay=args.ema_decay) if args.ema_decay else None
        if resume_step:
            checkpoints.load_checkpoint(accelerator, checkpoint, {"student": student}, optimizer, ema)
        if ema is not None:
            ema.to(device)
        student, optimizer = accelerator.prepare(student, optimizer)
        method.start_stage(stage, resume_step, ctx)  # its grids, loss and data stream from where it stopped
        bar = tqdm(total=stage.iterations, initial=resume_step, disable=not accelerator.is_local_main_process,
                   desc=f"stage {stage.index + 1}/{len(stages)}: {stage.name}")
        # a resumed stage goes on with the time and losses of its part before the checkpoint (for the summary)
        resumed = resume_step > 0
        stage_start = time.time() - (progress.get("stage_time_s", 0.0) if resumed else 0.0)
        losses = list(progress.get("stage_losses", [])) if resumed else []
        updates = progress.get("stage_updates", 0) if resumed else 0
        launch.reset_peak_memory(device)

        # 5. the iterations of this stage: each a global batch, one or more optimizer updates
        for step in range(resume_step, stage.iterations):
            lr = method.learning_rate(stage, step)
            training.set_lr(optimizer, lr)
            batch = method.batch(stage, step, teacher, ctx)
            for update in range(batch.num_updates):
                for micro in range(args.gradient_accumulation_steps):
                    with accelerator.accumulate(student), accelerator.autocast():
                        loss = batch.loss(student, update, micro).mean()
                        checkpoints.check_finite(accelerator.reduce(loss.detach(), "sum"), progress["global_step"] + 1, output_dir)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(student.parameters())
                updates += 1
            progress["global_step"] += 1
            losses.append(accelerator.gather(loss.detach()).mean().item())
            bar.update(1)
            seen = (step + 1) * ctx.global_batch_size * args.gradient_accumulation_steps  # this stage's images / trajectories
            bar.set_postfix({"loss": f"{losses[-1]:.4f}", "lr": f"{lr:.2e}", "updates": updates, method.unit: seen})
            accelerator.log({"loss": losses[-1], "lr": lr, "stage": stage.index + 1, "updates": updates, method.unit: seen},
                            step=progress["global_step"])
            if step + 1 < stage.iterations:  # (the stage's last iteration ends in the stage-boundary checkpoint)
                signum = stop.requested(accelerator)
                if progress["global_step"] % args.checkpointing_steps == 0 or signum:
                    saved = checkpoints.save_checkpoint(
                        accelerator, output_dir, progress["global_step"],
                        {**progress, "stage": stage.index, "step": step + 1, "stages": stage_names,
                         "budgets": budgets, **method.state(),
                         "stage_time_s": time.time() - stage_start, "stage_losses": training.first_and_last(losses),
                         "stage_updates": updates},
                        {"student": student, "teacher": teacher}, optimizer, ema, args.checkpoints_total_limit)
                if signum:
                    bar.close()
                    interrupt.stop_run(accelerator, signum, progress["global_step"], saved,
                                       training.resume_command(__file__, argv, accelerator.num_processes))
        bar.close()

        # 6. the student (EMA weights if any) becomes the next teacher; its students saved as stock-loadable folders
        student = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(student.parameters())
        if args.lora_rank:
            student = fuse_lora(student)  # a plain diffusers UNet again: the next teacher, the saved student
        row = {"stage": stage.name, "iterations": stage.iterations, "updates": updates, "global_batch": global_batch,
               "time_s": round(time.time() - stage_start, 1), "peak_memory_mib": launch.peak_memory_mib(device),
               "first_loss": training.mean_or_nan(losses[:10]), "final_loss": training.mean_or_nan(losses[-10:])}
        accelerator.log({"peak_memory_mib": row["peak_memory_mib"], "stage_time_s": row["time_s"]}, step=progress["global_step"])
        teacher, finished = method.finish_stage(stage, student.eval().requires_grad_(False))
        for done in finished:
            history.append(finish_student(done, stage, row, validation, accelerator, method, args, progress["global_step"]))
        progress.update(stage=stage.index + 1, step=0, history=history, stage_time_s=0.0, stage_losses=[], stage_updates=0)
        # a stage boundary is a checkpoint holding only the next stage's teacher; after the last stage, the teacher of
        # the stages a smaller --end_steps (or --second_stage) adds on resume
        saved = checkpoints.save_checkpoint(accelerator, output_dir, progress["global_step"],
                                            {**progress, "stages": stage_names, "budgets": budgets, **method.state()},
                                            {"teacher": teacher}, total_limit=args.checkpoints_total_limit)
        signum = stop.requested(accelerator) if stage.index + 1 < len(stages) else None
        if signum:
            interrupt.stop_run(accelerator, signum, progress["global_step"], saved,
                               training.resume_command(__file__, argv, accelerator.num_processes))
    stop.restore()

    # 7. summary
    accelerator.wait_for_everyone()  # no process may tear down the process group while another still uses it
    accelerator.end_training()
    if accelerator.is_main_process:
        if args.push_to_hub:  # a student whose push failed may have gone up with a later stage's catch-up push
            from diffusers_pd.hub import is_pushed

            for row in history:
                if row["student"] != "-":
                    row["hub"] = "pushed" if is_pushed(output_dir / row["student"], args.hub_model_id) else "push failed"
        table = training.format_table(history) + "\n\n" + SUMMARY_NOTE
        atomic_write_text(output_dir / "summary.json", json.dumps(history, indent=2))
        atomic_write_text(output_dir / "summary.md", table + "\n")
        print(f"\n{method.title(args.teacher)}\n\n{table}\n")
        failed = [r for r in history if r.get("hub") == "push failed"]
        if failed:
            print(f"{len(failed)} push(es) failed; the students are safe locally. Retry without retraining:\n"
                  f"  python -m diffusers_pd.hub push {output_dir} --hub_model_id {args.hub_model_id}")
    return {"history": history}


if __name__ == "__main__":
    main()
