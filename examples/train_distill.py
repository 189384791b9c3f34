#!/usr/bin/env python
"""Progressive distillation (Algorithm 2 of Salimans & Ho, ICLR 2022) of a UNet2DModel teacher, with accelerate.

    accelerate launch examples/train_distill.py \\
        --teacher google/ddpm-cifar10-32 --dataset_name cifar10 \\
        --start_steps 1024 --end_steps 4 --iterations_per_stage 50000 --train_batch_size 128 \\
        --output_dir ddpm-cifar10-pd --push_to_hub --hub_model_id you/ddpm-cifar10-pd

Each stage halves the student's steps (N -> N/2); the finished student of every stage is written to
`output_dir/student-{N}steps/` as a pipeline folder that `DiffusionPipeline.from_pretrained` loads without this
package. With no arguments it runs an offline CPU demo: the committed reference teacher (trained on scikit-learn's
8x8 digits) distilled from 64 to 1 step in about 4 minutes.
"""

import argparse
import sys
from pathlib import Path

from diffusers_pd import arguments  # standard library only: --help answers before the heavy imports below

REFERENCE_TEACHER = Path(__file__).resolve().parent / "reference_teacher"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments; defaults run the offline demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", "--pretrained_teacher_model", "--pretrained_model_name_or_path", dest="teacher",
                       type=str, default=str(REFERENCE_TEACHER),
                       help="Hub id or folder: a pipeline (unet/ + scheduler/) or a UNet2DModel folder.")
    group.add_argument("--teacher_scheduler", type=str, default=None,
                       help="Scheduler folder or pipeline for a bare UNet folder; None: the teacher's own scheduler.")
    group.add_argument("--teacher_revision", type=str, default=None, help="Branch, tag or commit of a Hub teacher; None: main.")
    group.add_argument("--start_steps", type=int, default=64, help="The teacher's sampling steps (the first stage's 2N).")
    group.add_argument("--end_steps", type=int, default=1, help="Steps of the last student.")
    group.add_argument("--iterations_per_stage", type=int, default=300, help="Updates per halving (the paper's K: 50000).")
    group.add_argument("--loss_weighting", type=str, default="truncated_snr", choices=["truncated_snr", "snr_plus_one"],
                       help="x-MSE weight: max(SNR, 1) (the paper's) or SNR + 1 (= the v-MSE).")
    group.add_argument("--prediction_type", type=str, default="v_prediction", choices=["epsilon", "sample", "v_prediction"],
                       help="The student's parameterization (works from any teacher's).")
    group.add_argument("--num_validation_samples", type=int, default=64,
                       help="Fixed noises on which each student is compared with the teacher (0: off).")
    arguments.add_data_args(parser, resolution_help="None: the teacher's sample_size (the only one that works).")
    arguments.add_optimization_args(parser, learning_rate=3e-4)
    arguments.add_output_args(parser, output_dir="pd-output")
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None and Path(args.teacher) == REFERENCE_TEACHER:
        args.dataset_name = "digits"  # the embedded demo's data
    return args


if __name__ == "__main__":  # --help and argument errors answer here, before the heavy imports below
    parse_args()

import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusers_pd import ProgressiveDistillationScheduler, interrupt, save_student, training  # noqa: E402
from diffusers_pd.atomic import atomic_write_text  # noqa: E402
from diffusers_pd.data import collate_pixel_values, load_image_dataset, preprocess_batch_fn, validate_image_dataset  # noqa: E402
from diffusers_pd.loading import load_teacher, public_name  # noqa: E402
from diffusers_pd.loss import ProgressiveDistillationLoss, RawOutput, draw_noise_and_grid_indices  # noqa: E402
from diffusers_pd.pipeline import denoise, fidelity_to_reference, sample_grid  # noqa: E402

logger = get_logger(__name__)
SUMMARY_NOTE = (
    "first_loss / final_loss: mean loss of the stage's first / last 10 updates. mse_to_teacher: mean squared distance "
    "of the student's samples to the original teacher's start_steps samples from the same noise; teacher_ddim_mse: "
    "the same for the teacher's own DDIM at the student's steps (the student should be below it)."
)


def stage_steps(start_steps: int, end_steps: int) -> list:
    """Student step counts of each stage: start/2, start/4, ..., end; one clear error if that is not a halving chain."""
    for name, value in (("start_steps", start_steps), ("end_steps", end_steps)):
        if value < 1:
            raise ValueError(f"--{name} {value} is not a step count: pass 1 or more.")
    if start_steps <= end_steps or start_steps % end_steps or (start_steps // end_steps) & (start_steps // end_steps - 1):
        raise ValueError(
            f"--start_steps {start_steps} must be a power-of-two multiple (>= 2x) of --end_steps {end_steps}, e.g. 1024 and 4."
        )
    steps = [start_steps // 2]
    while steps[-1] > end_steps:
        steps.append(steps[-1] // 2)
    return steps


def validate(args):
    """Every check that can fail, before anything is written: returns (teacher unet, its scheduler config, dataset)."""
    training.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint,
                              leftovers=training.run_leftovers(args.logging_dir))
    training.check_hub_args(args)
    stage_steps(args.start_steps, args.end_steps)
    for name in ("iterations_per_stage", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1.")
    if args.push_to_hub:  # the token and the repo, now: not after the first stage
        from diffusers_pd.hub import check_push_access

        check_push_access(args.hub_model_id, args.hub_token, args.hub_private_repo)
    teacher, scheduler_config = load_teacher(args.teacher, args.teacher_scheduler, args.teacher_revision)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Pass the teacher's training data: --dataset_name NAME (or `digits`, `fashion_mnist`) or --train_data_dir DIR.")
    if teacher.config.out_channels != teacher.config.in_channels:
        raise ValueError(
            f"The teacher outputs {teacher.config.out_channels} channels for {teacher.config.in_channels} input channels "
            "(learned variance?): only plain epsilon / sample / v outputs can be distilled."
        )
    # scheduler checks: prediction types, zero-SNR, 2 x start_steps <= T
    ProgressiveDistillationScheduler.from_config(scheduler_config)
    student_scheduler = ProgressiveDistillationScheduler.from_config(scheduler_config, prediction_type=args.prediction_type)
    num_train_timesteps = student_scheduler.config.num_train_timesteps
    if args.start_steps > num_train_timesteps // 2:
        raise ValueError(
            f"--start_steps {args.start_steps}: the first stage's teacher needs 2 x {args.start_steps} distinct timesteps "
            f"but the teacher has num_train_timesteps={num_train_timesteps}; use --start_steps {num_train_timesteps // 2} or less."
        )
    sample_size = teacher.config.sample_size
    args.resolution = args.resolution or sample_size
    if args.resolution != sample_size:
        raise ValueError(f"--resolution {args.resolution} differs from the teacher's sample_size {sample_size}: drop it or pass {sample_size}.")
    dataset, image_column = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split, args.image_column, args.cache_dir
    )
    validate_image_dataset(dataset, image_column, teacher.config.in_channels, args.resolution)
    dataset.set_transform(preprocess_batch_fn(image_column, args.resolution, teacher.config.in_channels, args.center_crop, random_flip=False))
    return teacher, dict(scheduler_config), dataset


@torch.no_grad()
def validation_references(teacher, scheduler_config, stages, args):
    """Fixed noise, the teacher's samples from it at start_steps, and the teacher's own DDIM distance at each N."""
    if not args.num_validation_samples:
        return None
    shape = (args.num_validation_samples, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(teacher.device, teacher.dtype)
    reference = denoise(teacher, ProgressiveDistillationScheduler.from_config(scheduler_config), latents, args.start_steps)
    ddim = {n: fidelity_to_reference(teacher, scheduler_config, n, latents, reference) for n in stages}
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


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return distill(parse_args(argv), argv)
    except training.NonFiniteLossError as error:  # every process sees the same reduced loss, so all stop here
        sys.exit(f"error: {error}")


def distill(args, argv) -> dict:
    """Validate, then run every stage; returns the per-stage history."""
    # 1. check everything before writing anything
    try:
        teacher, scheduler_config, dataset = validate(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    stages = stage_steps(args.start_steps, args.end_steps)
    output_dir = Path(args.output_dir)

    # 2. accelerate, trackers, logging
    try:
        accelerator = training.make_accelerator(args, "train_distill")
    except ValueError as error:
        sys.exit(f"error: {error}")
    device = accelerator.device
    set_seed(args.seed)  # dropout and anything else on the global RNGs (restored from a checkpoint on resume)

    # 3. resume: which stage, which update, the teacher of that stage
    progress = {"stage": 0, "step": 0, "global_step": 0, "teacher_prediction_type": scheduler_config["prediction_type"], "history": []}
    # the original teacher's samples at start_steps (the target of every stage) and its DDIM at each N, on fixed noise
    validation = validation_references(teacher.to(device), scheduler_config, stages, args) if accelerator.is_main_process else None
    checkpoint = training.find_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        progress = training.read_progress(checkpoint)
        if progress.get("stages") != stages:
            sys.exit(f"error: {checkpoint} was made for stages {progress.get('stages')}, these arguments give {stages}.")
        training.load_checkpoint(accelerator, checkpoint, {"teacher": teacher})
        logger.info(f"Resuming from {checkpoint}: stage {progress['stage'] + 1}/{len(stages)}, update {progress['step']}")
    teacher.to(device).eval().requires_grad_(False)
    stop = interrupt.StopSignals().install()  # Ctrl-C / SIGTERM: checkpoint at the current update, then stop

    global_batch = args.train_batch_size * accelerator.num_processes
    shape = (global_batch, teacher.config.in_channels, args.resolution, args.resolution)
    history = progress["history"]
    for stage in range(progress["stage"], len(stages)):
        num_steps = stages[stage]
        resume_step = progress["step"] if stage == progress["stage"] else 0
        teacher_prediction_type = progress["teacher_prediction_type"] if stage == progress["stage"] else args.prediction_type

        # 4. the student starts as a copy of the teacher; a fresh optimizer every stage (as the reference code)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        if args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        optimizer = torch.optim.Adam(student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                     weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        ema = EMAModel(student.parameters(), decay=args.ema_decay) if args.ema_decay else None
        if resume_step:
            training.load_checkpoint(accelerator, checkpoint, {"student": student}, optimizer, ema)
        if ema is not None:
            ema.to(device)
        student, optimizer = accelerator.prepare(student, optimizer)
        scheduler = ProgressiveDistillationScheduler.from_config(scheduler_config, prediction_type=args.prediction_type)
        scheduler.set_timesteps(num_steps)
        loss_fn = ProgressiveDistillationLoss(scheduler, args.loss_weighting, teacher_prediction_type)

        # 5. the data stream of this stage, from the exact micro-batch where it stopped
        micro_steps_per_stage = args.iterations_per_stage * args.gradient_accumulation_steps
        first_micro_step = stage * micro_steps_per_stage + resume_step * args.gradient_accumulation_steps
        sampler = training.GlobalBatchSampler(len(dataset), args.train_batch_size, accelerator.process_index,
                                              accelerator.num_processes, args.seed, start=first_micro_step)
        batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                                   collate_fn=collate_pixel_values,  # its own generator: creating the
                                                   generator=torch.Generator().manual_seed(args.seed)))  # iterator must not consume the global RNG (dropout)
        bar = tqdm(total=args.iterations_per_stage, initial=resume_step, disable=not accelerator.is_local_main_process,
                   desc=f"stage {stage + 1}/{len(stages)}: {2 * num_steps} -> {num_steps} steps")
        # a resumed stage goes on with the time and losses of its part before the checkpoint (for the summary)
        resumed = resume_step > 0
        stage_start = time.time() - (progress.get("stage_time_s", 0.0) if resumed else 0.0)
        losses = list(progress.get("stage_losses", [])) if resumed else []

        # 6. the updates of this stage
        for step in range(resume_step, args.iterations_per_stage):
            lr = training.linear_decay_lr(step, args.iterations_per_stage, args.learning_rate)
            training.set_lr(optimizer, lr)
            for micro in range(args.gradient_accumulation_steps):
                micro_step = stage * micro_steps_per_stage + step * args.gradient_accumulation_steps + micro
                generator = training.step_generator(args.seed, micro_step)
                noise, grid_indices = draw_noise_and_grid_indices(shape, num_steps, generator)
                flips = torch.rand(global_batch, generator=generator) < 0.5
                rank, per_process = accelerator.process_index, args.train_batch_size
                images = next(batches)["pixel_values"].to(device)
                if args.random_flip:
                    images = training.random_flips(images, training.rank_slice(flips, rank, per_process))
                with accelerator.accumulate(student), accelerator.autocast():
                    loss = loss_fn(RawOutput(student), RawOutput(teacher), images,
                                   training.rank_slice(noise, rank, per_process).to(device),
                                   training.rank_slice(grid_indices, rank, per_process)).mean()
                    training.check_finite(accelerator.reduce(loss.detach(), "sum"), progress["global_step"] + 1, output_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(student.parameters())
            progress["global_step"] += 1
            losses.append(accelerator.gather(loss.detach()).mean().item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": losses[-1], "lr": lr, "student_steps": num_steps}, step=progress["global_step"])
            if step + 1 < args.iterations_per_stage:  # (the stage's last update ends in the stage-boundary checkpoint)
                signum = stop.requested(accelerator)
                if progress["global_step"] % args.checkpointing_steps == 0 or signum:
                    models = {"student": student, "teacher": teacher}
                    saved = training.save_checkpoint(
                        accelerator, output_dir, progress["global_step"],
                        {**progress, "stage": stage, "step": step + 1, "stages": stages,
                         "teacher_prediction_type": teacher_prediction_type,
                         "stage_time_s": time.time() - stage_start, "stage_losses": training.first_and_last(losses)},
                        models, optimizer, ema, args.checkpoints_total_limit)
                if signum:
                    bar.close()
                    interrupt.stop_run(accelerator, signum, progress["global_step"], saved,
                                       training.resume_command(__file__, argv, accelerator.num_processes))
        bar.close()

        # 7. the student (EMA weights if any) becomes the next teacher; save it as a stock-loadable folder
        student = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(student.parameters())
        teacher = student.eval().requires_grad_(False)
        scheduler_config = {**scheduler_config, "prediction_type": args.prediction_type}
        row = {"stage": f"{2 * num_steps} -> {num_steps}", "steps": num_steps, "updates": args.iterations_per_stage,
               "global_batch": global_batch * args.gradient_accumulation_steps,
               "time_s": round(time.time() - stage_start, 1),
               "first_loss": training.mean_or_nan(losses[:10]), "final_loss": training.mean_or_nan(losses[-10:]),
               "student": f"student-{num_steps}steps"}
        if validation is not None:
            row["mse_to_teacher"] = fidelity_to_reference(teacher, scheduler_config, num_steps, validation["latents"], validation["reference"])
            row["teacher_ddim_mse"] = validation["ddim"][num_steps]
            row["vs_teacher_ddim"] = "better"
            if row["mse_to_teacher"] > row["teacher_ddim_mse"]:  # the stage did not distil: say what usually helps
                row["vs_teacher_ddim"] = "WORSE: raise --iterations_per_stage"
                logger.warning(
                    f"Stage {row['stage']}: the {num_steps}-step student is further from the teacher's "
                    f"{args.start_steps}-step samples (MSE {row['mse_to_teacher']:.4g}) than the teacher's own "
                    f"{num_steps}-step DDIM ({row['teacher_ddim_mse']:.4g}): raise --iterations_per_stage "
                    f"(now {args.iterations_per_stage}) for a student worth its steps.", main_process_only=True)
        if accelerator.is_main_process:
            grid = sample_grid(teacher, scheduler_config, num_steps, args.num_grid_images, device)
            training.log_grid(accelerator, grid, progress["global_step"], f"samples/{num_steps}steps")
            save_student(
                output_dir / f"student-{num_steps}steps", teacher, scheduler, num_steps,
                teacher=public_name(args.teacher), teacher_prediction_type=teacher_prediction_type,
                teacher_source="local" if Path(args.teacher).exists() else "hub",
                extra_files={"samples.png": training.png_bytes(grid)}, card_repo_id=args.hub_model_id,
                card_training={"iterations per stage": args.iterations_per_stage, "global batch size": global_batch * args.gradient_accumulation_steps,
                               "learning rate": f"{args.learning_rate} (linear decay to 0 per stage)", "loss weighting": args.loss_weighting},
                stage=stage + 1, loss_weighting=args.loss_weighting,
            )
            row["hub"] = push(args) if args.push_to_hub else "-"
        history.append(row)
        progress.update(stage=stage + 1, step=0, teacher_prediction_type=args.prediction_type, history=history,
                        stage_time_s=0.0, stage_losses=[])
        if stage + 1 < len(stages):  # a stage boundary is a checkpoint: the next stage needs only its teacher
            saved = training.save_checkpoint(accelerator, output_dir, progress["global_step"],
                                             {**progress, "stages": stages}, {"teacher": teacher},
                                             total_limit=args.checkpoints_total_limit)
            signum = stop.requested(accelerator)
            if signum:
                interrupt.stop_run(accelerator, signum, progress["global_step"], saved,
                                   training.resume_command(__file__, argv, accelerator.num_processes))
    stop.restore()

    # 8. summary
    accelerator.wait_for_everyone()  # no process may tear down the process group while another still uses it
    accelerator.end_training()
    if accelerator.is_main_process:
        if args.push_to_hub:  # a student whose push failed may have gone up with a later stage's catch-up push
            from diffusers_pd.hub import is_pushed

            for row in history:
                row["hub"] = "pushed" if is_pushed(output_dir / row["student"], args.hub_model_id) else "push failed"
        table = training.format_table(history) + "\n\n" + SUMMARY_NOTE
        atomic_write_text(output_dir / "summary.json", json.dumps(history, indent=2))
        atomic_write_text(output_dir / "summary.md", table + "\n")
        print(f"\nProgressive distillation of {args.teacher}: {args.start_steps} -> {args.end_steps} steps\n\n{table}\n")
        failed = [r for r in history if r.get("hub") == "push failed"]
        if failed:
            print(f"{len(failed)} push(es) failed; the students are safe locally. Retry without retraining:\n"
                  f"  python -m diffusers_pd.hub push {output_dir} --hub_model_id {args.hub_model_id}")
    return {"history": history}


if __name__ == "__main__":
    main()
