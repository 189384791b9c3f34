"""`examples/train_distill.py` on a Stable Diffusion teacher: guided distillation, then halvings (tiny, offline, CPU).

Checked against independent references:
* every student folder loads with `DiffusionPipeline.from_pretrained` in a process that never imports diffusers_pd,
  as a StableDiffusionPipeline whose `pipe(prompt, num_inference_steps=N, guidance_scale=s)` makes exactly N UNet
  calls of batch = prompts (the guidance embedding makes it skip the unconditional batch) and returns the latents of
  the project's own DDIM over a `Denoiser` with the student's text embeddings and e(s - 1);
* with one scale and `--fold_guidance_scale`, every student is a plain UNet2DConditionModel (no time_cond_proj_dim)
  that differs from the same run's unfolded student only in `time_embedding.linear_1.bias`, equals it fed e(3 - 1) to
  1e-6 (float64), and whose `pipe(prompt, num_inference_steps=N, guidance_scale=1)` in a process without diffusers_pd
  makes N UNet calls of batch = prompts, ignores negative prompts and returns the project's DDIM at s = 3 on the
  unfolded student;
* kill -9 and a rerun of the same command across the guided stage = the uninterrupted run (1e-6);
* the teacher's encodings are cached in output_dir (one file);
* `--method sfd` (SFD-v, AFS, second stage) on the same teacher and captions: its students are stock
  StableDiffusionPipeline folders whose `pipe(prompt, negative_prompt=..., num_inference_steps=N, guidance_scale=2.5)`
  makes N UNet calls of batch 2 x prompts (classifier-free guidance at sampling) and returns the latents of the
  project's own CFG Euler sampler on the student's grid with the same text and negative-text embeddings; the
  project's sampler with the analytic first step makes NFE such calls;
* bad input: one line, nothing written.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_distill_robustness import (
    assert_refused, assert_same_students, checkpoint_folders, distill_command, killed_then_resumed, max_abs_diff,
    one_and_two_processes, run, script_env, unet_weights,
)
from tiny_sd import save_tiny_sd_pipeline

from diffusers_pd import Denoiser
from diffusers_pd.grids import student_grid
from diffusers_pd.guidance import guidance_timestep_cond
from diffusers_pd.sfd import sfd_student_samples
from diffusers_pd.solvers import ddim_trajectory

CAPTIONS = ["a photo of sneaker", "a bag", "a shirt", "a dress", "a photo of bag", "shirt", "a photo of dress", "sneaker"]
TINY = ["--report_to", "none", "--num_grid_images", "1", "--seed", "3", "--num_validation_samples", "2",
        "--train_batch_size", "4", "--guidance_scale_min", "1", "--guidance_scale_max", "3", "--guidance_embedding_dim", "8"]

STOCK_SD = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
torch.set_grad_enabled(False)
prompts = ["a photo of bag", "a dress"]
for folder, steps, guidance_scale in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs=None, output=None: calls.append(args[0].shape[0]))
    sample = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
    latents = pipe(prompts, generator=torch.Generator().manual_seed(0), **sample).images
    negative = pipe(prompts, negative_prompt=["shirt", "a photo of sneaker"], generator=torch.Generator().manual_seed(0),
                    **sample).images
    text, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    np.savez(f"{folder}/stock.npz", latents=latents.numpy(), negative=negative.numpy(), text=text.numpy(),
             calls=np.array(calls))
    print(type(pipe).__name__, type(pipe.scheduler).__name__, type(pipe.unet).__name__, pipe.unet.config.time_cond_proj_dim)
assert "diffusers_pd" not in sys.modules
"""


def stock_sd_run(jobs) -> list:
    """STOCK_SD on [(folder, steps, guidance_scale), ...] in a process without diffusers_pd: its printed words per folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    stock = subprocess.run([sys.executable, "-c", STOCK_SD, json.dumps([[str(f), n, s] for f, n, s in jobs])],
                           capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    assert stock.returncode == 0, stock.stderr[-3000:]
    return [line.split() for line in stock.stdout.splitlines()]


STOCK_SD_CFG = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
torch.set_grad_enabled(False)
prompts, negative = ["a photo of bag", "a dress"], ["shirt", "a photo of sneaker"]
for folder, steps in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    latents = pipe(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=2.5, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    text, negative_text = pipe.encode_prompt(prompts, "cpu", 1, True, negative)
    np.savez(f"{folder}/stock.npz", latents=latents.numpy(), text=text.numpy(), negative_text=negative_text.numpy(),
             calls=np.array(calls))
    print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.unet.config.num_class_embeds)
assert "diffusers_pd" not in sys.modules
"""


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "teacher")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("captions") / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return folder


def test_guided_then_halved_students_run_in_stock_stable_diffusion_at_one_call_per_step(sd_teacher, captions, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", sd_teacher, "--train_data_dir", captions, "--start_steps", 4,
                                 "--end_steps", 2, "--iterations_per_stage", 3, "--guidance_iterations", 4,
                                 "--output_dir", out), script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Guided distillation of" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary] == [4, 2] and summary[0]["stage"].startswith("guided")
    assert (out / "encoded_data.safetensors").is_file()

    folders = [(str(out / "student-4steps"), 4), (str(out / "student-2steps"), 2)]
    printed = stock_sd_run([(folder, steps, 2.5) for folder, steps in folders])
    assert [words[0] for words in printed] == ["StableDiffusionPipeline"] * 2 and [w[-1] for w in printed] == ["8"] * 2

    from diffusers import DiffusionPipeline

    for folder, steps in folders:
        saved = np.load(f"{folder}/stock.npz")
        assert list(saved["calls"]) == [2] * (2 * steps)  # one UNet call of batch = prompts per step, at s = 2.5 (x 2 runs)
        np.testing.assert_array_equal(saved["negative"], saved["latents"])  # the pipeline never evaluates a negative prompt
        pipe = DiffusionPipeline.from_pretrained(folder)
        info = pipe.scheduler.config["_diffusers_pd"]
        assert (info["guidance_scale_min"], info["guidance_scale_max"]) == (1.0, 3.0)
        card = (Path(folder) / "README.md").read_text()
        assert "egative prompts are unsupported" in card
        # the guided stage's card says its new embedding learnt at 10 x the lr (the default scale); halvings' do not
        assert ("| guidance embedding learning rate | 10 x the learning rate" in card) == (steps == 4)
        latents = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(0))
        text = torch.from_numpy(saved["text"])
        grid = student_grid(pipe.scheduler.config, steps, "trailing")
        with torch.no_grad():
            ours = ddim_trajectory(Denoiser(pipe.unet.eval(), pipe.scheduler.config), latents, grid, encoder_hidden_states=text,
                                   timestep_cond=guidance_timestep_cond(2.5, 8, batch_size=2))[-1]
        reference = torch.from_numpy(saved["latents"])
        assert (ours - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), folder


def guidance_response(out: Path, teacher: Path) -> dict:
    """r(s) at s = 2, 3 of the guided stage's student (`out`/student-4steps) on fixed noised latents and the tiny captions."""
    from diffusers import UNet2DConditionModel

    from diffusers_pd.guided_distillation import guidance_liveness
    from diffusers_pd.loading import load_sd_teacher
    from diffusers_pd.text_image_data import encode_prompts

    components, config = load_sd_teacher(str(teacher))
    with torch.no_grad():
        text = encode_prompts(components["tokenizer"], components["text_encoder"], CAPTIONS)
        empty = encode_prompts(components["tokenizer"], components["text_encoder"], [""]).expand_as(text)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 4, 8, 8, generator=generator)
    student = UNet2DConditionModel.from_pretrained(out / "student-4steps" / "unet").eval()
    result = guidance_liveness(
        Denoiser(student, config), Denoiser(components["unet"].eval(), config), latents, noise, torch.linspace(50, 950, 8),
        cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty}, guidance_scales=(2.0, 3.0),
        guidance_cond=lambda s, n: {"timestep_cond": guidance_timestep_cond(s, 8, batch_size=n)})
    return {s: row["ratio"] for s, row in result.items() if s > 1}


def test_the_guided_stage_makes_the_students_output_depend_on_the_guidance_scale(sd_teacher, captions, tmp_path):
    # r(s) = ||student(s) - student(1)|| / ||CFG(s) - CFG(1)||: 0 for the zero-initialised embedding. Measured here
    # after 8 updates: ~0.004 at s = 2 with one learning rate for all (the embedding moves by ~lr per update from 0,
    # its output change is a ~1e-3 fraction of the teacher's), ~0.035 with the default 10x for the new embedding;
    # 0.012 lies a factor 3 from each (the demo's measurements: README, "guidance input").
    ratios = {}
    for scale in (1, None):  # the old setting (one lr for all), then the default
        out = tmp_path / f"scale-{scale}"
        flags = [] if scale is None else ["--guidance_embedding_lr_scale", scale]
        result = run(distill_command(*TINY, "--teacher", sd_teacher, "--train_data_dir", captions, "--start_steps", 4,
                                     "--end_steps", 2, "--iterations_per_stage", 1, "--guidance_iterations", 8,
                                     "--num_validation_samples", 0, *flags, "--output_dir", out), script_env(tmp_path / "hf_home"))
        assert result.returncode == 0, result.stderr[-4000:]
        ratios[scale] = guidance_response(out, sd_teacher)
    assert ratios[None][2.0] > 0.012 > ratios[1][2.0], ratios
    assert all(ratios[None][s] > 3 * ratios[1][s] for s in (2.0, 3.0)), ratios


def test_folded_guidance_scale_students_are_plain_sd_unets_sampled_at_guidance_scale_1(sd_teacher, captions, tmp_path):
    # one scale s = 3 (the later flags win over TINY's range); a large learning rate makes the guidance input matter
    common = [*TINY, "--guidance_scale_min", 3, "--guidance_scale_max", 3, "--teacher", sd_teacher, "--train_data_dir",
              captions, "--start_steps", 4, "--end_steps", 2, "--iterations_per_stage", 2, "--guidance_iterations", 3,
              "--learning_rate", 3e-2]
    folded_out, conditioned_out = tmp_path / "folded", tmp_path / "conditioned"  # the same run, saved folded or not
    for out, extra in ((folded_out, ["--fold_guidance_scale"]), (conditioned_out, [])):
        result = run(distill_command(*common, *extra, "--output_dir", out), script_env(tmp_path / "hf_home"))
        assert result.returncode == 0, result.stderr[-4000:]

    folders = [(folded_out / "student-4steps", 4), (folded_out / "student-2steps", 2)]
    printed = stock_sd_run([(folder, steps, 1) for folder, steps in folders])
    assert printed == [["StableDiffusionPipeline", "DDIMScheduler", "UNet2DConditionModel", "None"]] * 2  # a plain SD UNet

    from diffusers import DiffusionPipeline, UNet2DConditionModel

    for folder, steps in folders:
        saved = np.load(folder / "stock.npz")
        assert list(saved["calls"]) == [2] * (2 * steps)  # N calls of batch = prompts per run: no unconditional batch
        np.testing.assert_array_equal(saved["negative"], saved["latents"])  # negative prompts have no effect
        info = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
        assert (info["guidance_scale_folded"], info["guidance_embedding_dim"], info["guidance_scale_max"]) == (3.0, None, None)
        card = (folder / "README.md").read_text()
        assert "s = 3.0 is built into the weights" in card and "Call the pipeline with `guidance_scale=1`" in card
        assert "Negative prompts have no effect" in card and "guidance_scale=1.0).images" in card

        # the fold is exact: the plain UNet equals the same run's guidance-conditioned student fed e(3 - 1)
        folded = UNet2DConditionModel.from_pretrained(folder / "unet").double()
        conditioned = UNet2DConditionModel.from_pretrained(conditioned_out / folder.name / "unet").double()
        weights, conditioned_weights = unet_weights(folder), unet_weights(conditioned_out / folder.name)
        assert set(conditioned_weights) - set(weights) == {"time_embedding.cond_proj.weight"}
        assert [k for k in weights if not torch.equal(weights[k], conditioned_weights[k])] == ["time_embedding.linear_1.bias"]
        generator = torch.Generator().manual_seed(steps)
        z, text = torch.randn(3, 4, 8, 8, generator=generator).double(), torch.randn(3, 16, 32, generator=generator).double()
        t = torch.tensor([999.0, 500.0, 20.0], dtype=torch.float64)
        cond = guidance_timestep_cond(3.0, 8, batch_size=3).double()
        with torch.no_grad():
            expected, plain = conditioned(z, t, text, timestep_cond=cond).sample, folded(z, t, text).sample
            unfolded = conditioned(z, t, text, timestep_cond=torch.zeros_like(cond)).sample  # cond_proj dropped, bias kept
        torch.testing.assert_close(plain, expected, atol=1e-6, rtol=0)
        assert (unfolded - expected).abs().max() > 1e-3  # the guidance input trained: the fold is not a no-op

        # the stock latents at guidance_scale=1 are the project's student sampler at s = 3 on the unfolded student
        pipe = DiffusionPipeline.from_pretrained(folder)
        latents = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(0))
        grid = student_grid(pipe.scheduler.config, steps, "trailing")
        with torch.no_grad():
            ours = ddim_trajectory(Denoiser(conditioned.float().eval(), pipe.scheduler.config), latents, grid,
                                   encoder_hidden_states=torch.from_numpy(saved["text"]),
                                   timestep_cond=guidance_timestep_cond(3.0, 8, batch_size=2))[-1]
        reference = torch.from_numpy(saved["latents"])
        assert (ours - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), folder


def test_sfd_students_of_a_text_to_image_teacher_apply_guidance_in_stock_stable_diffusion(sd_teacher, captions, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command("--method", "sfd", "--report_to", "none", "--num_grid_images", "1", "--seed", "3",
                                 "--num_validation_samples", "2", "--teacher", sd_teacher, "--train_data_dir", captions,
                                 "--nfe", 2, 3, "--grid", "lu", "--second_stage", "--num_trajectories", 8, "--train_batch_size", 4,
                                 "--teacher_steps_per_step", 2, "--learning_rate", 1e-3, "--output_dir", out),
                 script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SFD-v of" in result.stdout and "distilled at s = 1" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [row["steps"] for row in summary] == [2, 3, 1] and all(np.isfinite(row["mse_to_teacher"]) for row in summary)
    assert (out / "encoded_data.safetensors").is_file()

    steps = {2: 3, 3: 4, 1: 1}  # stock steps: NFE + 1 with AFS (stage one), 1 for the second stage
    folders = [(str(out / f"student-{nfe}steps"), n) for nfe, n in steps.items()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    stock = subprocess.run([sys.executable, "-c", STOCK_SD_CFG, json.dumps(folders)], capture_output=True, text=True,
                           env={**env, "OMP_NUM_THREADS": "1"})
    assert stock.returncode == 0, stock.stderr[-3000:]
    assert stock.stdout.split() == ["StableDiffusionPipeline", "DPMSolverMultistepScheduler", "None"] * 3  # SFD-v folded

    from diffusers import DiffusionPipeline

    teacher = unet_weights(sd_teacher)
    for folder, n in folders:
        saved = np.load(f"{folder}/stock.npz")
        assert list(saved["calls"]) == [4] * n  # one UNet call of batch 2 x prompts per step: CFG at sampling
        pipe = DiffusionPipeline.from_pretrained(folder)
        info = pipe.scheduler.config["_diffusers_pd"]
        assert (info["method"], info["grid"], info["num_inference_steps"], info["stock_exact"]) == ("sfd", "lu", n, True)
        assert info["distilled_guidance_scale"] == 1.0 and pipe.unet.config.time_cond_proj_dim is None
        card = (Path(folder) / "README.md").read_text()
        assert "Negative prompts work" in card and f"{n} UNet calls of 2 x the prompts" in card
        assert max_abs_diff(unet_weights(Path(folder)), teacher) > 1e-6  # it trained
        latents = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", torch.Generator().manual_seed(0))
        text, negative = torch.from_numpy(saved["text"]), torch.from_numpy(saved["negative_text"])
        guided = dict(guidance_scale=2.5, uncond={"encoder_hidden_states": negative}, encoder_hidden_states=text)
        ours = sfd_student_samples(pipe.unet, latents, scheduler_config=pipe.scheduler.config, num_steps=n, grid="lu", **guided)
        reference = torch.from_numpy(saved["latents"])
        assert (ours - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), folder
        if info["afs"]:  # the paper's NFE with the project's sampler: one batched CFG call per network step
            calls = []
            hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
            with_afs = sfd_student_samples(pipe.unet, latents, scheduler_config=pipe.scheduler.config, num_steps=n, grid="lu",
                                           afs=True, **guided)
            hook.remove()
            assert calls == [4] * info["nfe"] and (with_afs - ours).abs().max() > 1e-4
            assert f"makes {info['nfe']} UNet calls" in card


def test_sigkilled_guided_run_resumes_to_the_same_students(sd_teacher, captions, tmp_path):
    common = [*TINY, "--teacher", sd_teacher, "--train_data_dir", captions, "--start_steps", 4, "--end_steps", 2,
              "--iterations_per_stage", 4, "--guidance_iterations", 4]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    env = script_env(tmp_path / "hf_home")
    resumable = [*common, "--output_dir", out_b, "--checkpointing_steps", 3]
    # killed after the stage-boundary checkpoint (update 4) or later: the teacher then has a guidance embedding
    killed_then_resumed(common, resumable, out_a, out_b, env, tmp_path / "b.log",
                        ready=lambda: any(int(p.name.split("-")[1]) >= 4 for p in checkpoint_folders(out_b)
                                          if (p / "progress.json").is_file()))
    for steps in (4, 2):
        assert max_abs_diff(unet_weights(out_a / f"student-{steps}steps"), unet_weights(out_b / f"student-{steps}steps")) <= 1e-6


def test_lora_students_are_plain_unets_changed_only_in_attention_and_the_guidance_input(sd_teacher, captions, tmp_path):
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", sd_teacher, "--train_data_dir", captions, "--start_steps", 4,
                                 "--end_steps", 2, "--iterations_per_stage", 2, "--guidance_iterations", 2, "--lora_rank", 2,
                                 "--output_dir", out), script_env(tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    teacher = unet_weights(sd_teacher)
    for steps in (4, 2):
        student = unet_weights(out / f"student-{steps}steps")
        assert set(student) == set(teacher) | {"time_embedding.cond_proj.weight"}  # fused: no adapter left
        changed = {k for k in teacher if not torch.equal(student[k], teacher[k])}
        assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed), changed
        assert student["time_embedding.cond_proj.weight"].abs().max() > 0  # the guidance input trained whole


def test_two_cpu_processes_train_the_same_guided_students_as_one_with_the_global_batch(sd_teacher, captions, tmp_path):
    # Adam's eps=1 makes its updates linear in the gradient (see the progressive-distillation test of the same name).
    common = [*TINY, "--teacher", sd_teacher, "--train_data_dir", captions, "--start_steps", 4, "--end_steps", 2,
              "--iterations_per_stage", 2, "--guidance_iterations", 2, "--adam_epsilon", 1, "--learning_rate", 0.1]
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(common, one, two, 2, script_env(tmp_path / "hf_home"))
    assert_same_students(one, two, unet_weights(sd_teacher), ["student-4steps", "student-2steps"])


BAD_INPUTS = {
    "no_data": ([], r"Pass the teacher's image-caption data: --train_data_dir DIR"),
    "reversed_scales": (["--train_data_dir", "{captions}", "--guidance_scale_min", "4", "--guidance_scale_max", "2"],
                        r"--guidance_scale_min 4.0 exceeds --guidance_scale_max 2.0: swap them"),
    "caption_column": (["--train_data_dir", "{captions}", "--caption_column", "prompt"], r"caption column 'prompt' not found"),
    "unconditional_flag": (["--train_data_dir", "{captions}", "--conversion_stage"],
                           r"--conversion_stage applies to unconditional teachers only"),
    "resolution": (["--train_data_dir", "{captions}", "--resolution", "32"], r"--resolution 32 gives 16-pixel latents"),
    "sfd_without_captions": (["--method", "sfd"], r"Pass the teacher's image-caption data: --train_data_dir DIR"),
    "sfd_guidance_flag": (["--method", "sfd", "--train_data_dir", "{captions}", "--guidance_embedding_dim", "8"],
                          r"--guidance_embedding_dim is not a flag of --method sfd: drop it \(SFD distils a conditional "
                          r"teacher at s = 1; pass guidance_scale when sampling its students\)"),
    "sfd_nfe": (["--method", "sfd", "--train_data_dir", "{captions}", "--nfe", "0"], r"NFE must be a positive integer"),
    "fold_range": (["--train_data_dir", "{captions}", "--guidance_scale_min", "1", "--guidance_scale_max", "5",
                    "--fold_guidance_scale"],
                   r"--fold_guidance_scale builds ONE guidance scale into the students, got the range \[1.0, 5.0\]: pass "
                   r"--guidance_scale_min = --guidance_scale_max"),
    "fold_default_range": (["--train_data_dir", "{captions}", "--fold_guidance_scale"], r"got the range \[1.0, 5.0\]"),
    "sfd_fold": (["--method", "sfd", "--train_data_dir", "{captions}", "--fold_guidance_scale"],
                 r"--fold_guidance_scale is not a flag of --method sfd: drop it \(SFD distils a conditional teacher at s = 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_text_to_image_input_fails_once_clearly_before_writing_anything(case, sd_teacher, captions, tmp_path):
    extra, message = BAD_INPUTS[case]
    extra = [arg.format(captions=captions) for arg in extra]
    out = tmp_path / "out"
    result = run(distill_command("--report_to", "none", "--teacher", sd_teacher, "--output_dir", out, *extra),
                 script_env(tmp_path / "hf_home"))
    assert_refused(result, message, out)


@pytest.mark.parametrize("flags, message", [
    (["--guidance_scale_max", "4"], r"--guidance_scale_max is for conditional teachers"),
    (["--fold_guidance_scale"], r"--fold_guidance_scale is for text-to-image teachers: .* is an unconditional UNet2DModel"),
])
def test_guidance_flags_with_an_unconditional_teacher_are_refused(flags, message, tmp_path):
    from conftest import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "eps")
    result = run(distill_command("--report_to", "none", "--teacher", teacher, "--dataset_name", "digits", *flags,
                                 "--output_dir", tmp_path / "out"), script_env(tmp_path / "hf_home"))
    assert_refused(result, message, tmp_path / "out")
