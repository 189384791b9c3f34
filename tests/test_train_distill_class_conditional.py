"""`examples/train_distill.py` on a class-conditional UNet2DModel teacher (tiny, offline digits, CPU).

A UNet2DModel has no guidance input, so the guided stage distils the teacher's classifier-free-guided output at ONE
scale s into the student's weights, then the halvings follow with the same labels. Checked: the students' samples
from `ProgressiveDistillationPipeline(class_labels=...)` equal an independent DDIM loop of diffusers' own
DDIMScheduler over the student with those labels; bad input is refused in one line. (The guided loss itself is tested
against a direct two-call formula, exactly 0 for the untrained student at s = 1, in tests/test_guided_distillation.py.)
"""

import json

import pytest
import torch
from conftest import tiny_unet
from test_train_distill_robustness import assert_refused, distill_command, run, script_env

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
        with pytest.raises(ValueError, match="Pass class_labels"):
            pipe(latents=latents, num_inference_steps=steps)


BAD_INPUTS = {
    "two_scales": (["--guidance_scale_min", "1", "--guidance_scale_max", "3"],
                   r"This teacher's UNet has no guidance input: pass one scale"),
    "no_null_class": (["--null_class", "9"], r"needs a null class that no image has"),
    "label_column": (["--label_column", "digit"], r"label column 'digit' not found"),
    "text_flag": (["--caption_column", "text"], r"--caption_column is for text-to-image teachers"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_class_conditional_input_fails_once_clearly_before_writing_anything(case, class_teacher, tmp_path):
    extra, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", class_teacher, "--start_steps", 8, "--end_steps", 4, "--output_dir", out,
                                 *extra), script_env(tmp_path / "hf_home"))
    assert_refused(result, message, out)
