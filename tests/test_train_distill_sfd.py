"""`examples/train_distill.py --method sfd` end to end on a tiny eps T=1000 teacher (CPU, seconds per run).

What is checked against what:
* stock loading: each student folder is loaded with `DiffusionPipeline.from_pretrained` in a process that never
  imports diffusers_pd, and its images equal the project's own Euler sampler (`sfd_sample` over a `Denoiser`) on
  the student's grid WITHOUT the analytic first step, at the folder's step count (an AFS student's stock folder calls
  the network at every step: NFE + 1 calls);
* the project's pipeline samples an AFS student with its paper NFE (UNet calls counted) and equals `sfd_sample` with
  `afs=True`;
* SFD-v: one folder per NFE, each a plain UNet2DModel (step embedding folded), the folds differ;
* kill -9 at a random moment + rerun of the same command = the uninterrupted run (1e-6);
* 2 processes = 1 process at the same global batch;
* bad input: one line, nothing written.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_teacher
from safetensors.torch import load_file
from test_train_distill_robustness import (
    UNET_WEIGHTS, assert_refused, assert_same_students, checkpoint_folders, distill_command, killed_then_resumed,
    max_abs_diff, one_and_two_processes, run, script_env, unet_weights,
)

from diffusers_pd import Denoiser, ProgressiveDistillationPipeline, sfd_sample, student_grid

TINY = ["--method", "sfd", "--report_to", "none", "--num_grid_images", "1", "--seed", "3", "--num_validation_samples", "4"]

STOCK_SAMPLER = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
torch.set_grad_enabled(False)
for folder, steps in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(sys.argv[2]))  # DDPMPipeline's own loop, from given noise
    pipe.scheduler.set_timesteps(steps)
    z = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        z = pipe.scheduler.step(pipe.unet(pipe.scheduler.scale_model_input(z, t), t).sample, t, z).prev_sample
    np.save(f"{folder}/stock.npy", z.numpy())
    print(type(pipe.scheduler).__name__, pipe.unet.config.num_class_embeds)
assert "diffusers_pd" not in sys.modules
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "eps")


def metadata(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]


def project_samples(folder: Path, latents: torch.Tensor, afs: bool) -> torch.Tensor:
    """The project's sampler on the student's recorded grid (the reference of the stock load)."""
    pipe = ProgressiveDistillationPipeline.from_pretrained(folder)
    info = metadata(folder)
    grid = student_grid(pipe.scheduler.config, info["num_inference_steps"], info["grid"])
    with torch.no_grad():
        return sfd_sample(Denoiser(pipe.unet.eval(), pipe.scheduler.config), grid, latents, afs=afs)


def stock_samples(tmp_path: Path, folders_and_steps: list, latents: torch.Tensor) -> dict:
    np.save(tmp_path / "latents.npy", latents.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", STOCK_SAMPLER, json.dumps([[str(f), n] for f, n in folders_and_steps]),
                             str(tmp_path / "latents.npy")], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {Path(f): torch.from_numpy(np.load(Path(f) / "stock.npy")) for f, _ in folders_and_steps}, result.stdout


def test_sfd_v_with_afs_and_a_second_stage_give_stock_folders_that_sample_as_trained(teacher, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", teacher, "--nfe", 2, 3, "--grid", "lu", "--num_trajectories", 8,
                                 "--train_batch_size", 4, "--second_stage", "--teacher_steps_per_step", 2, "--output_dir", out),
                 script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SFD-v of" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary] == [2, 3, 1]
    assert all(row["updates"] > 0 and np.isfinite(row["mse_to_teacher"]) for row in summary)

    folders = {nfe: out / f"student-{nfe}steps" for nfe in (1, 2, 3)}
    infos = {nfe: metadata(folder) for nfe, folder in folders.items()}
    for nfe in (2, 3):  # stage one: AFS, so N = NFE + 1 stock steps
        assert infos[nfe] | {} and infos[nfe]["method"] == "sfd" and infos[nfe]["afs"] is True
        assert infos[nfe]["nfe"] == nfe and infos[nfe]["num_inference_steps"] == nfe + 1 and infos[nfe]["stock_exact"]
        assert infos[nfe]["sfd_v"] == [2, 3]
        card = (folders[nfe] / "README.md").read_text()
        assert f"makes {nfe} network calls" in card and f"{nfe + 1} calls" in card
    assert infos[1]["afs"] is False and infos[1]["num_inference_steps"] == 1 and infos[1]["second_stage"] is True
    # the SFD-v folds are different plain UNets
    two, three = unet_weights(folders[2]), unet_weights(folders[3])
    assert "class_embedding.weight" not in two and max_abs_diff(two, three) > 0

    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    stock, printed = stock_samples(tmp_path, [(folders[n], infos[n]["num_inference_steps"]) for n in (1, 2, 3)], latents)
    assert printed.split()[1::2] == ["None"] * 3  # plain UNets: no step-count embedding left
    for nfe in (1, 2, 3):  # stock = the project's Euler sampler on the same grid, network at every step
        reference = project_samples(folders[nfe], latents, afs=False)
        assert (stock[folders[nfe]] - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), nfe

    # the project's pipeline: the paper's NFE (the analytic first step), equal to sfd_sample with afs=True
    pipe = ProgressiveDistillationPipeline.from_pretrained(folders[2])
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    ours = pipe(latents=latents, output_type="pt").images
    assert len(calls) == 2
    calls.clear()
    reference = project_samples(folders[2], latents, afs=True)
    assert (ours - (reference / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5
    assert (reference - stock[folders[2]]).abs().max() > 1e-3  # AFS really differs from the stock network call


def test_karras_grid_student_without_afs_samples_exactly_in_plain_diffusers(teacher, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", teacher, "--nfe", 3, "--no-afs", "--grid", "karras", "--num_trajectories", 8,
                                 "--train_batch_size", 4, "--teacher_solver", "heun", "--output_dir", out),
                 script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    folder = out / "student-3steps"
    info = metadata(folder)
    assert (info["grid"], info["num_inference_steps"], info["afs"], info["stock_exact"]) == ("karras", 3, False, True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["use_karras_sigmas"] is True
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    stock, _ = stock_samples(tmp_path, [(folder, 3)], latents)
    reference = project_samples(folder, latents, afs=False)
    assert (stock[folder] - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())
    assert max_abs_diff(unet_weights(folder), load_file(teacher / UNET_WEIGHTS)) > 1e-6  # it trained


def test_sigkilled_sfd_run_resumes_to_the_same_students(teacher, tmp_path):
    common = [*TINY, "--teacher", teacher, "--nfe", 2, 3, "--num_trajectories", 32, "--train_batch_size", 4,
              "--teacher_steps_per_step", 2, "--second_stage", "--second_stage_trajectories", 16]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    env = script_env(tmp_path / "hf_home")
    resumable = [*common, "--output_dir", out_b, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1]
    killed_then_resumed(common, resumable, out_a, out_b, env, tmp_path / "b.log", delay=random.Random().uniform(0.0, 0.3),
                        ready=lambda: any((p / "progress.json").is_file() for p in checkpoint_folders(out_b)))
    teacher_weights = load_file(teacher / UNET_WEIGHTS)
    for nfe in (3, 2, 1):
        a, b = unet_weights(out_a / f"student-{nfe}steps"), unet_weights(out_b / f"student-{nfe}steps")
        assert max_abs_diff(a, b) <= 1e-6, nfe
        assert max_abs_diff(a, teacher_weights) > 1e-5  # they trained: equality is not vacuous


def test_a_finished_sfd_run_resumed_with_second_stage_adds_the_one_nfe_student_of_one_run(teacher, tmp_path):
    common = [*TINY, "--teacher", teacher, "--nfe", 2, "--num_trajectories", 16, "--train_batch_size", 4,
              "--teacher_steps_per_step", 2, "--checkpointing_steps", 2]
    second = ["--second_stage", "--second_stage_trajectories", 16]
    env = script_env(tmp_path / "hf_home")
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    first = run(distill_command(*common, "--output_dir", extended), env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (extended / "student-1steps").exists()
    more = run(distill_command(*common, *second, "--output_dir", extended, "--resume_from_checkpoint", "latest"), env)
    assert more.returncode == 0, more.stderr[-3000:]
    single = run(distill_command(*common, *second, "--output_dir", whole), env)
    assert single.returncode == 0, single.stderr[-3000:]
    for nfe in (2, 1):
        assert max_abs_diff(unet_weights(whole / f"student-{nfe}steps"), unet_weights(extended / f"student-{nfe}steps")) <= 1e-6
    assert max_abs_diff(unet_weights(extended / "student-1steps"), unet_weights(extended / "student-2steps")) > 1e-5
    assert [row["stage"] for row in json.loads((extended / "summary.json").read_text())] == [
        row["stage"] for row in json.loads((whole / "summary.json").read_text())]


def test_two_cpu_processes_train_the_same_sfd_student_as_one_with_the_global_batch(teacher, tmp_path):
    # Adam's eps=1 makes its updates linear in the gradient (see the progressive-distillation test of the same name).
    common = [*TINY, "--teacher", teacher, "--nfe", 2, "--num_trajectories", 24, "--teacher_steps_per_step", 2,
              "--adam_epsilon", 1, "--learning_rate", 0.1]
    one, two = tmp_path / "one", tmp_path / "two"
    multi = one_and_two_processes(common, one, two, 4, script_env(tmp_path / "hf_home"))
    assert_same_students(one, two, load_file(teacher / UNET_WEIGHTS), ["student-2steps"])
    assert multi.stdout.count("SFD of") == 1


BAD_INPUTS = {
    "nfe_zero": (["--nfe", "0"], r"NFE must be a positive integer, got 0"),
    "nfe_repeated": (["--nfe", "2", "2"], r"--nfe 2 2: pass one or more distinct step counts"),
    "nfe_too_large": (["--nfe", "1000"], r"NFE 1000 needs 1001 steps, more than the teacher's 1000 timesteps"),
    "afs_with_one_nfe": (["--nfe", "1", "--afs"], r"AFS with NFE 1 leaves no network call to train: use --no-afs"),
    "k_zero": (["--teacher_steps_per_step", "0"], r"--teacher_steps_per_step 0: K must be at least 1"),
    "second_stage_without_stage_one": (["--nfe", "1", "--no-afs", "--second_stage"],
                                       r"--second_stage distils stage one's student into 1 NFE: stage one needs --nfe 2 or more"),
    "accumulation": (["--gradient_accumulation_steps", "2"], r"--gradient_accumulation_steps: SFD updates once per student step"),
    "pd_flag": (["--start_steps", "8"], r"--start_steps is not a flag of --method sfd: drop it or pass --method progressive"),
    "data_flag": (["--dataset_name", "digits"], r"--dataset_name is not a flag of --method sfd for an unconditional teacher: "
                                                r"drop it \(SFD needs no data; only a conditional teacher's captions or labels\)"),
    "guidance_flag": (["--guidance_scale_max", "3"], r"--guidance_scale_max is not a flag of --method sfd: drop it \(SFD "
                                                     r"distils a conditional teacher at s = 1"),
    "label_flag": (["--label_column", "label"], r"--label_column is for conditional teachers"),
    "sfd_flag_with_pd": (["--method", "progressive", "--dataset_name", "digits", "--nfe", "4"],
                         r"--nfe is not a flag of --method progressive"),
    "unknown_solver": (["--teacher_solver", "euler"], r"argument --teacher_solver: invalid choice: 'euler'"),
    "unknown_method": (["--method", "consistency"], r"argument --method: invalid choice: 'consistency'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_sfd_input_fails_once_clearly_before_writing_anything(case, teacher, tmp_path):
    extra, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", teacher, "--num_trajectories", 8, "--output_dir", out, *extra),
                 script_env(tmp_path / "hf_home"))
    assert_refused(result, message, out)
    assert "stage 1/" not in result.stderr + result.stdout
