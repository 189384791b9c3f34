"""Fidelity to the teacher on PD's own yardstick: mean squared distance of samples to the teacher's START-step DDIM
samples from the same noise, the `mse_to_teacher` column of the PD benchmark's distillation_summary.json.

    python benchmarks/sfd_fidelity.py --teacher benchmarks/results/fashion-mnist-cpu/teacher \
        --students runs/fashion-sfd/sfd-4/student-4steps ... --output runs/fashion-sfd/fidelity.json

The noise is the one train_distill.py validates on (`--num_validation_samples` images from seed `--seed` + 1), so a
student distilled by either method at `--seed 0` is measured on the very noise and reference PD's summary used, and
the numbers sit next to PD's. Each SFD student is sampled as it was trained (its grid, its analytic first step); the
teacher's DDIM at each student NFE is listed as the baseline. Cheap (no FID): 64 samples per row by default.
"""

import argparse
import json

import torch
from diffusers import DiffusionPipeline

from diffusers_pd.atomic import atomic_write_text
from diffusers_pd.pipeline import ddim_samples, mean_squared_distance
from diffusers_pd.scheduler import METADATA_KEY
from diffusers_pd.grids import student_grid, teacher_grid
from diffusers_pd.sfd import sfd_student_samples, solver_samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", nargs="+", required=True)
    parser.add_argument("--start_steps", type=int, default=64, help="The reference: the teacher's DDIM at this many steps.")
    parser.add_argument("--num_validation_samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="train_distill.py's --seed (the noise is seed + 1).")
    parser.add_argument("--target_k", type=int, nargs="*", default=[],
                        help="Also the training targets' distance at these K (teacher sub-steps per student step).")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    teacher = DiffusionPipeline.from_pretrained(args.teacher)
    unet, config = teacher.unet.eval(), teacher.scheduler.config
    shape = (args.num_validation_samples, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1))
    reference = ddim_samples(unet, latents, scheduler_config=config, num_steps=args.start_steps)
    rows, baselines, targets = [], {}, {}
    for path in args.students:
        student = DiffusionPipeline.from_pretrained(path)
        info = student.scheduler.config[METADATA_KEY]
        samples = sfd_student_samples(student.unet.eval(), latents, scheduler_config=student.scheduler.config,
                                      num_steps=info["num_inference_steps"], grid=info.get("grid", "trailing"),
                                      afs=info.get("afs", False))
        nfe = info.get("nfe", info["num_inference_steps"])
        if nfe not in baselines:
            baselines[nfe] = mean_squared_distance(ddim_samples(unet, latents, scheduler_config=config, num_steps=nfe),
                                                   reference)
        rows.append(dict(student=path, nfe=nfe, grid=info.get("grid"), afs=info.get("afs"),
                         mse_to_teacher=mean_squared_distance(samples, reference), teacher_ddim_mse=baselines[nfe]))
        if info.get("teacher_steps_per_step") and not info.get("second_stage"):  # stage one: the teacher's targets
            grid = student_grid(config, info["num_inference_steps"], info["grid"])

            def target(k, key=(info["teacher_solver"], info["num_inference_steps"], info["grid"])):
                """The targets' distance, once per (solver, steps, grid, K): students of one setting share it."""
                if key + (k,) not in targets:
                    targets[key + (k,)] = mean_squared_distance(solver_samples(
                        unet, latents, scheduler_config=config, solver=key[0], grid=teacher_grid(grid, k, config)), reference)
                return targets[key + (k,)]
            rows[-1].update(teacher_steps_per_step=info["teacher_steps_per_step"],
                            target_mse=target(info["teacher_steps_per_step"]),
                            target_mse_k={k: target(k) for k in args.target_k})
        print(f"{path}: NFE {nfe}, mse to the teacher's {args.start_steps}-step DDIM {rows[-1]['mse_to_teacher']:.4g} "
              f"(teacher DDIM at {nfe}: {baselines[nfe]:.4g}; its targets: {rows[-1].get('target_mse', float('nan')):.4g}"
              f"{''.join(f', K {k}: {v:.4g}' for k, v in rows[-1].get('target_mse_k', {}).items())})")
    report = dict(reference=f"teacher DDIM, {args.start_steps} steps", noise_seed=args.seed + 1,
                  num_samples=args.num_validation_samples, rows=rows)
    atomic_write_text(args.output, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
