"""The teacher's x-hat clipping against diffusers' own DDIMScheduler(clip_sample=True) and the config defaults."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_pd.clipping import ClippedTeacher, epsilon_breaks_at_first_step, teacher_clip_range
from diffusers_pd.method import LoopContext
from diffusers_pd.pipeline import ddim_samples
from diffusers_pd.sfd import SimpleFastDistillation, solver_samples


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_clipped_teacher_samples_as_ddim_with_clip_sample_and_the_clipped_output(prediction_type, beta_schedule):
    config = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type).config)
    unet = tiny_unet().double()  # float64 on both sides: x-hat = (z - sigma eps) / alpha at alpha ~ 5e-5 (cosine, t = 999)
    with torch.no_grad():
        unet.conv_out.bias.add_(3.0)  # outputs far off the data range: x-hat leaves [-1, 1] at every step
    latents = torch.randn(4, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = ddim_samples(ClippedTeacher(unet, config, 1.0), latents, scheduler_config=config, num_steps=8)
    config.pop("_use_default_values", None)  # else from_config skips the keys DDPM left at its defaults
    stock = DDIMScheduler.from_config({**config, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                       "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0})
    stock.set_timesteps(8)
    assert stock.timesteps.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    z = latents.clone()
    with torch.no_grad():
        for t in stock.timesteps:
            z = stock.step(unet(z, t).sample, t, z, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, z, atol=1e-6, rtol=1e-5)
    unclipped = ddim_samples(unet, latents, scheduler_config=config, num_steps=8)
    assert ours.abs().max() <= 1.0 + 1e-5 < unclipped.abs().max()  # the property: the last x-hat is in range


def ddpm_config(beta_schedule: str, prediction_type: str = "epsilon", **overrides) -> dict:
    """A DDPMScheduler config as a file holds it: keys left at DDPM's defaults are absent."""
    config = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type).config)
    defaults = set(config.pop("_use_default_values", []))
    return {"_class_name": "DDPMScheduler", **{k: v for k, v in config.items() if k not in defaults}, **overrides}


def test_auto_clips_only_an_epsilon_teacher_that_breaks_at_the_first_step_and_reads_class_defaults():
    cosine, linear = ddpm_config("squaredcos_cap_v2"), ddpm_config("linear")
    assert "clip_sample" not in cosine  # DDPM's default, True, read from the class
    assert epsilon_breaks_at_first_step(cosine) and not epsilon_breaks_at_first_step(linear)  # alpha_T 4.9e-5, 0.0064
    assert teacher_clip_range(cosine) == 1.0
    assert teacher_clip_range(linear) is None  # measured: distils unclipped (results.md)
    assert teacher_clip_range(ddpm_config("squaredcos_cap_v2", clip_sample_range=2.0)) == 2.0
    assert teacher_clip_range(ddpm_config("squaredcos_cap_v2", clip_sample=False)) is None  # the config says no
    assert teacher_clip_range(ddpm_config("squaredcos_cap_v2", "v_prediction")) is None  # v does not break there
    assert teacher_clip_range({"_class_name": "PNDMScheduler"}, "on") == 1.0
    assert teacher_clip_range(cosine, "off") is None
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        teacher_clip_range({}, "yes")


def test_an_epsilon_teacher_that_breaks_at_the_first_step_gets_v_students_from_the_first_stage():
    from diffusers_pd.parameterization import stage_plan

    types = [entry["prediction_type"] for entry in stage_plan(stage_steps=[32, 16, 8, 4], teacher_prediction_type="epsilon",
                                                              epsilon_breaks_at_first_step=True)]
    assert types == ["v_prediction"] * 4


def test_sfd_clips_the_teachers_solver_and_refuses_an_eps_student_whose_first_call_breaks():
    config = ddpm_config("squaredcos_cap_v2")  # eps, alpha_T 4.9e-5, clip_sample True by DDPM's default
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.add_(3.0)  # x-hat far outside [-1, 1]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    method = SimpleFastDistillation(config, shape, nfes=[2], iterations=1, afs=True, grid="trailing")
    assert method.teacher_clip_range == 1.0
    assert method.card_training(method.stages()[0], 4)["teacher x-hat"] == "clamped to [-1, 1] (its clip_sample)"
    latents = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    fine = method.losses[2].teacher_grid
    reference = method.reference_sampler()(unet, latents)  # DPM-Solver++(3M) ends on the clamped x-hat
    torch.testing.assert_close(reference, solver_samples(ClippedTeacher(unet, config, 1.0), latents,
                                                         scheduler_config=config, solver="dpm_solver_3m", grid=fine))
    unclipped = solver_samples(unet, latents, scheduler_config=config, solver="dpm_solver_3m", grid=fine)
    assert reference.abs().max() <= 1.0 + 1e-5 < unclipped.abs().max()
    ctx = LoopContext(torch.device("cpu"), 0, 1, 4, 1, 0)
    assert isinstance(method.batch(method.stages()[0], 0, unet, ctx).teacher, ClippedTeacher)  # the training targets too
    assert SimpleFastDistillation(config, shape, nfes=[2], iterations=1, teacher_clip_sample="off").teacher_clip_range is None
    # the student is eps and sampled unclipped: a first call at t = T would divide its error by alpha_T
    with pytest.raises(ValueError, match=r"trailing grid starts at alpha 4.9e-05.*keep --afs .* or pass --grid sfd"):
        SimpleFastDistillation(config, shape, nfes=[2], iterations=1, afs=False, grid="trailing")
    SimpleFastDistillation(config, shape, nfes=[2], iterations=1, afs=False, grid="sfd")  # starts at sigma 80
    auto = SimpleFastDistillation(config, shape, nfes=[2], iterations=1)  # --grid auto keeps AFS for such a teacher
    assert (auto.grid_kind, auto.afs, auto.teacher_steps_per_step) == ("trailing", True, 8)
    SimpleFastDistillation(ddpm_config("linear"), shape, nfes=[2], iterations=1, afs=False)  # not clipped: as before
