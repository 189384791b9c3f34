"""`examples/train_distill.py` on a class-conditional UNet2DModel teacher (tiny, offline digits, CPU).

A UNet2DModel has no guidance input, so the guided stage distils the teacher's classifier-free-guided output at ONE
scale s into the student's weights, then the halvings follow with the same labels. Checked: the students' samples
from `ProgressiveDistillationPipeline(class_labels=...)` equal an independent DDIM loop of diffusers' own
DDIMScheduler over the student with those labels; bad input is refused in one line. (The guided loss itself is tested
against a direct two-call formula, exactly 0 for the untrained student at s = 1, in tests/test_guided_distillation.py.)

`--method sfd` on the same teacher distils at s = 1 (each trajectory conditioned on a label of the data) and guides at
sampling: `ProgressiveDistillationPipeline(class_labels=..., guidance_scale=s)` makes NFE UNet calls of batch 2 x labels
(the analytic first step, then labels and null class in one forward) and equals an independent loop: the analytic
step written out (eps-hat = z) and diffusers' own DPMSolverMultistepScheduler of the folder, guiding the raw outputs.

A squaredcos_cap_v2 eps teacher (clip_sample=True) is clipped by both methods: its guided x-hat clamped after the
combination, its solver's x-hat at s = 1; a resume with another --teacher_clip_sample is refused (the clamp itself
against a float64 formula: tests/test_clipping.py).
"""

import json
import math
import random

import pytest
import torch
from conftest import tiny_unet
from safetensors.torch import load_file
from test_train_distill_robustness import (
    UNET_WEIGHTS, assert_refused, assert_same_students, checkpoint_folders, distill_command, killed_then_resumed,
    max_abs_diff, one_and_two_processes, run, script_env, snapshot, unet_weights,
)

from diffusers_pd import ProgressiveDistillationPipeline

TINY = ["--report_to", "none", "--num_grid_images", "2", "--seed", "3", "--num_validation_samples", "10",
        "--train_batch_size", "8", "--dataset_name", "digits"]


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    """A tiny class-conditional eps teacher (T = 1000 linear) with 11 class embeddings: digits 0-9 and the null class 10."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("teacher") / "classes"
    unet = tiny_unet(0, num_class_embeds=11)
    with torch.no_grad():  # make the class input matter
        unet.class_embedding.weight.normal_(0, 1.0)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def test_guided_stage_at_one_scale_then_halvings_give_class_conditional_students(class_teacher, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", class_teacher, "--guidance_scale_min", 3, "--guidance_scale_max", 3,
                                 "--start_steps", 8, "--end_steps", 4, "--iterations_per_stage", 4, "--guidance_iterations", 20,
                                 "--learning_rate", 1e-3, "--output_dir", out), script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary] == [8, 4] and summary[0]["stage"] == "guided: s in [3.0, 3.0]"

    from diffusers import DDIMScheduler

    for steps in (8, 4):
        folder = out / f"student-{steps}steps"
        info = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
        assert info["class_conditional"] and info["null_class"] == 10 and info["guidance_scale_folded"] == 3.0
        assert "class_labels=torch.tensor" in (folder / "README.md").read_text()
        pipe = ProgressiveDistillationPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        labels = torch.tensor([1, 7])
        latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        ours = pipe(latents=latents, class_labels=labels, num_inference_steps=steps, output_type="pt").images
        # an independent loop: diffusers' DDIMScheduler (trailing, as exported) over the student with the labels
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        scheduler.set_timesteps(steps)
        z = latents
        with torch.no_grad():
            for t in scheduler.timesteps:
                z = scheduler.step(pipe.unet(z, t, class_labels=labels).sample, t, z).prev_sample
        assert (ours - (z / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5, steps
        # guidance on top (the pipeline's stock-scheduler path): labels and null class in one forward per step
        guided = pipe(latents=latents, class_labels=labels, num_inference_steps=steps, guidance_scale=2.0, output_type="pt").images
        z = latents
        with torch.no_grad():
            for t in scheduler.timesteps:
                uncond, cond = pipe.unet(torch.cat([z, z]), t, class_labels=torch.tensor([10, 10, 1, 7])).sample.chunk(2)
                z = scheduler.step(uncond + 2.0 * (cond - uncond), t, z).prev_sample
        assert (guided - (z / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5 and (guided - ours).abs().max() > 1e-4, steps
        with pytest.raises(ValueError, match="Pass class_labels"):
            pipe(latents=latents, num_inference_steps=steps)


def test_sfd_student_of_a_class_conditional_teacher_is_guided_at_sampling(class_teacher, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--method", "sfd", "--teacher", class_teacher, "--nfe", 2, "--grid", "lu", "--num_trajectories", 16,
                                 "--teacher_steps_per_step", 2, "--learning_rate", 1e-3, "--output_dir", out),
                 script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary] == [2] and math.isfinite(summary[0]["mse_to_teacher"])

    from diffusers import DPMSolverMultistepScheduler

    folder = out / "student-2steps"
    info = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
    assert (info["method"], info["class_conditional"], info["null_class"], info["guidance_scale_folded"]) == ("sfd", True, 10, None)
    assert (info["afs"], info["num_inference_steps"], info["grid"]) == (True, 3, "lu")
    card = (folder / "README.md").read_text()
    assert "guidance_scale=s)" in card and "null class 10" in card
    pipe = ProgressiveDistillationPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    labels, s = torch.tensor([1, 7]), 3.0
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    ours = pipe(latents=latents, class_labels=labels, guidance_scale=s, output_type="pt").images
    assert calls == [4, 4]  # NFE 2: the analytic first step, then one forward of labels + null class per step
    calls.clear()
    plain = pipe(latents=latents, class_labels=labels, output_type="pt").images
    assert calls == [2, 2] and (plain - ours).abs().max() > 1e-3  # s = 1: no guidance, and guidance matters

    scheduler = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(3)
    edm = scheduler.sigmas.double()
    alpha, sigma = 1 / (1 + edm**2).sqrt(), edm / (1 + edm**2).sqrt()
    z = latents.double()
    x = (z - sigma[0] * z) / alpha[0]  # the analytic first step: eps-hat = z
    z = (alpha[1] * x + sigma[1] * z).float()
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        for t in scheduler.timesteps[1:]:
            uncond, cond = pipe.unet(torch.cat([z, z]), t, class_labels=torch.cat([null, labels])).sample.chunk(2)
            z = scheduler.step(uncond + s * (cond - uncond), t, z).prev_sample
    assert (ours - (z / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5


def test_sigkilled_class_conditional_sfd_run_resumes_to_the_same_student(class_teacher, tmp_path):
    # each trajectory's label is drawn from the data by (seed, iteration): the resumed run must draw the same ones
    common = [*TINY, "--method", "sfd", "--teacher", class_teacher, "--nfe", 2, "--num_trajectories", 48,
              "--train_batch_size", 4, "--teacher_steps_per_step", 2, "--learning_rate", 1e-3]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    resumable = [*common, "--output_dir", out_b, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1]
    killed_then_resumed(common, resumable, out_a, out_b, script_env(tmp_path / "hf_home"), tmp_path / "b.log",
                        delay=random.Random().uniform(0.0, 0.3),
                        ready=lambda: any((p / "progress.json").is_file() for p in checkpoint_folders(out_b)))
    a, b = unet_weights(out_a / "student-2steps"), unet_weights(out_b / "student-2steps")
    assert max_abs_diff(a, b) <= 1e-6
    assert max_abs_diff(a, load_file(class_teacher / UNET_WEIGHTS)) > 1e-5  # it trained: equality is not vacuous


def test_two_cpu_processes_train_the_same_class_conditional_sfd_student_as_one(class_teacher, tmp_path):
    # Adam's eps=1 makes its updates linear in the gradient (see the progressive-distillation test of the same name)
    common = [*TINY, "--method", "sfd", "--teacher", class_teacher, "--nfe", 2, "--num_trajectories", 24,
              "--teacher_steps_per_step", 2, "--adam_epsilon", 1, "--learning_rate", 0.1]
    one, two = tmp_path / "one", tmp_path / "two"
    multi = one_and_two_processes(common, one, two, 4, script_env(tmp_path / "hf_home"))
    assert_same_students(one, two, load_file(class_teacher / UNET_WEIGHTS), ["student-2steps"])
    assert multi.stdout.count("SFD of") == 1


SFD_BAD_INPUTS = {
    "sfd_v": (["--nfe", "2", "3"], r"This UNet already has a class embedding .*: SFD-v needs that slot for the step count; "
                                   r"distil one student per NFE instead"),
    "guidance_flag": (["--guidance_scale_max", "3"], r"--guidance_scale_max is not a flag of --method sfd: drop it \(SFD "
                                                     r"distils a conditional teacher at s = 1"),
    "no_null_class": (["--null_class", "9"], r"needs a null class that no image has"),
}


@pytest.mark.parametrize("case", list(SFD_BAD_INPUTS))
def test_bad_class_conditional_sfd_input_fails_once_clearly_before_writing_anything(case, class_teacher, tmp_path):
    extra, message = SFD_BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--method", "sfd", "--teacher", class_teacher, "--output_dir", out, *extra),
                 script_env(tmp_path / "hf_home"))
    assert_refused(result, message, out)


BAD_INPUTS = {
    "two_scales": (["--guidance_scale_min", "1", "--guidance_scale_max", "3"],
                   r"This teacher's UNet has no guidance input: pass one scale"),
    "no_null_class": (["--null_class", "9"], r"needs a null class that no image has"),
    "label_column": (["--label_column", "digit"], r"label column 'digit' not found"),
    "unconditional_flag": (["--conversion_stage"], r"--conversion_stage applies to unconditional teachers only"),
    "text_flag": (["--caption_column", "text"], r"--caption_column is for text-to-image teachers"),
    "fold_flag": (["--guidance_scale_min", "3", "--guidance_scale_max", "3", "--fold_guidance_scale"],
                  r"--fold_guidance_scale is for text-to-image teachers: a class-conditional UNet2DModel has no guidance "
                  r"input, so its students already build their one scale"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_class_conditional_input_fails_once_clearly_before_writing_anything(case, class_teacher, tmp_path):
    extra, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", class_teacher, "--start_steps", 8, "--end_steps", 4, "--output_dir", out,
                                 *extra), script_env(tmp_path / "hf_home"))
    assert_refused(result, message, out)


# ------------------------------------------------------------------ a clipped teacher: squaredcos_cap_v2, eps, clip_sample
@pytest.fixture(scope="module")
def cosine_class_teacher(tmp_path_factory):
    """The class-conditional teacher on squaredcos_cap_v2 (alpha_T = 4.9e-5; DDPMScheduler saves clip_sample=True):
    unclipped, its x-hat = (z - sigma eps) / alpha multiplies eps errors by 20,000 at t = 999."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("teacher") / "cosine-classes"
    unet = tiny_unet(0, num_class_embeds=11)
    with torch.no_grad():
        unet.class_embedding.weight.normal_(0, 1.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert scheduler.config.clip_sample and scheduler.config.prediction_type == "epsilon"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def test_guided_distillation_clamps_a_clipped_teachers_guided_x_hat_and_a_resume_must_keep_the_setting(cosine_class_teacher,
                                                                                                        tmp_path):
    """--teacher_clip_sample on is read for a class-conditional teacher: the teacher's guided x-hat is clamped, so its
    reference samples (8-step DDIM) lie in [-1, 1], and its students predict v from the guided stage on, so theirs stay
    O(1): every distance is below 4 (measured 0.36; unclamped, the reference reaches |x| ~ 10^4 and the distance 4e8)."""
    out = tmp_path / "out"
    env = script_env(tmp_path / "hf_home")
    common = [*TINY, "--teacher", cosine_class_teacher, "--guidance_scale_min", 3, "--guidance_scale_max", 3,
              "--start_steps", 8, "--end_steps", 4, "--iterations_per_stage", 2, "--guidance_iterations", 2,
              "--learning_rate", 1e-3, "--output_dir", out]
    result = run(distill_command(*common, "--teacher_clip_sample", "on"), env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(row["steps"], row["prediction_type"]) for row in summary] == [(8, "v_prediction"), (4, "v_prediction")]
    assert all(math.isfinite(row["mse_to_teacher"]) and math.isfinite(row["teacher_ddim_mse"]) for row in summary), summary
    assert all(row["mse_to_teacher"] < 4.0 for row in summary), summary
    for steps in (8, 4):
        folder = out / f"student-{steps}steps"
        assert "| teacher x-hat | clamped to [-1, 1] (its clip_sample) |" in (folder / "README.md").read_text()
        info = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert info["prediction_type"] == "v_prediction", steps  # an eps student would break at t = 999 unclipped

    before = snapshot(out)
    again = run(distill_command(*common, "--teacher_clip_sample", "off", "--resume_from_checkpoint", "latest"), env)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].endswith(
        "was made with the teacher's x-hat clamped to [-1, 1] (its clip_sample), these arguments give unclipped: pass "
        "the run's --teacher_clip_sample again.")
    assert snapshot(out) == before


def test_sfd_of_a_clipped_class_conditional_teacher_clamps_its_solver(cosine_class_teacher, tmp_path):
    """Conditional SFD (s = 1) reads --teacher_clip_sample: auto clips this teacher in its solver (the reference) and its
    DDIM baseline, both then in [-1, 1] with a distance at most 4 (measured 0.034; off: 2e5); the card says so."""
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--method", "sfd", "--teacher", cosine_class_teacher, "--nfe", 2,
                                 "--num_trajectories", 16, "--teacher_steps_per_step", 2, "--learning_rate", 1e-3,
                                 "--teacher_clip_sample", "auto", "--output_dir", out), script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = json.loads((out / "summary.json").read_text())
    assert math.isfinite(row["mse_to_teacher"]) and 0 < row["teacher_ddim_mse"] <= 4.0, row
    assert "| teacher x-hat | clamped to [-1, 1] (its clip_sample) |" in (out / "student-2steps" / "README.md").read_text()
