"""The teacher's x-hat clipping against diffusers' own DDIMScheduler(clip_sample=True) and the config defaults; for
conditional teachers, the clamp of the classifier-free-guided x-hat against a float64 formula."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_pd.clipping import ClippedTeacher, epsilon_breaks_at_first_step, teacher_clip_range
from diffusers_pd.denoiser import Denoiser, GuidedDenoiser
from diffusers_pd.method import LoopContext
from diffusers_pd.parameterization import clip_x_eps, x_from_eps
from diffusers_pd.pipeline import ddim_samples
from diffusers_pd.schedules import alphas_cumprod_from_config
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


def test_auto_clamps_a_hub_ddpm_shaped_teacher_from_the_halving_where_its_students_leave_eps():
    # The Hub DDPM shape (eps, linear, clip_sample=True): `auto` leaves the original teacher, so the eps stages and the
    # reference, unclamped; the teacher of the first non-eps halving (an eps student) is clamped as diffusers samples it.
    from diffusers_pd.clipping import left_unclamped, switch_clip_note, switch_clip_range
    from diffusers_pd.method import Stage
    from diffusers_pd.progressive import ProgressiveDistillation

    linear = ddpm_config("linear")
    assert left_unclamped(linear) and switch_clip_range(linear) == 1.0
    assert switch_clip_range(ddpm_config("linear", clip_sample_range=2.0)) == 2.0
    assert switch_clip_range(linear, "on") is None and switch_clip_range(linear, "off") is None  # explicit: as asked
    assert switch_clip_range(ddpm_config("squaredcos_cap_v2")) is None  # auto clamps the original teacher already
    assert switch_clip_range(ddpm_config("linear", clip_sample=False)) is None  # the config says no
    assert switch_clip_range(ddpm_config("linear", "v_prediction")) is None  # v students from the start: no switch

    def method(mode="auto", **kwargs):
        return ProgressiveDistillation(linear, [], (1, 8, 8), start_steps=64, end_steps=1, iterations_per_stage=1,
                                       loss_weighting="auto", learning_rate=3e-4, teacher_clip_sample=mode,
                                       **{"prediction_type": "auto", **kwargs})

    auto, unet = method(), tiny_unet()
    assert [entry["prediction_type"] for entry in auto.plan] == ["epsilon"] * 3 + ["v_prediction"] * 3
    assert auto.teacher_clip_range is None and auto.state()["teacher_clip_range"] is None  # the reference: unclamped
    assert [auto.stage_name(i) for i in range(2, 5)] == ["16 -> 8", "8 -> 4 (v_prediction, teacher x-hat clamped)",
                                                         "4 -> 2 (v_prediction)"]  # a resume of the old plan is refused
    teachers = [auto.stage_teacher(unet, stage) for stage in auto.stages()]
    assert [type(t).__name__ for t in teachers] == ["UNet2DModel"] * 3 + ["ClippedTeacher"] + ["UNet2DModel"] * 2
    auto.load_state({"teacher_prediction_type": "epsilon"})  # resumed at the switch: the 8-step eps student's clamp
    switch = auto.stage_teacher(unet, Stage(3, auto.stage_name(3), 1, (4,)))
    assert switch.prediction_type == "epsilon" and switch.clip_range == 1.0
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the clamp acts: x-hat of a random eps net at t = 999 is far outside [-1, 1]
        assert not torch.equal(switch(latents, torch.tensor([999.0])).sample, unet(latents, torch.tensor([999.0])).sample)
    cards = [auto.card_training(stage, 8)["teacher x-hat"] for stage in auto.stages()]
    assert cards[:3] == ["unclipped"] * 3 and cards[3] == cards[5] == (
        "clamped to [-1, 1] (its clip_sample) from the halving to 4 steps on, where students leave epsilon")
    # switching at the first stage (v at once) clamps the original teacher, references too, as `on` does
    v_at_once = method(prediction_type="v_prediction")
    assert v_at_once.teacher_clip_range == 1.0 and v_at_once.switch_clip_index is None
    assert "ClippedTeacher" == type(v_at_once.stage_teacher(unet, v_at_once.stages()[0])).__name__
    # eps to the end, or `off`: nothing clamped anywhere; `on`: the original teacher only, v from the first stage
    for plain in (method(prediction_type="epsilon"), method("off")):
        assert plain.teacher_clip_range is None and plain.switch_clip_index is None
        assert all(type(plain.stage_teacher(unet, stage)).__name__ == "UNet2DModel" for stage in plain.stages())
    on = method("on")
    assert on.teacher_clip_range == 1.0 and on.switch_clip_index is None
    # one warning, only where the clamp starts mid-run: for few-step targets `on` measured better
    assert auto.notes() == [switch_clip_note("the halving to 4 steps")] and "--teacher_clip_sample on" in auto.notes()[0]
    converted = method(conversion_stage=True)  # the conversion stage moves the students off eps: its teacher is clamped
    assert converted.stage_name(3) == "8: epsilon -> v_prediction, teacher x-hat clamped"
    assert converted.notes() == [switch_clip_note("the conversion stage at 8 steps")]
    assert on.notes() == v_at_once.notes() == method("off").notes() == method(prediction_type="epsilon").notes() == []


def test_an_epsilon_teacher_that_breaks_at_the_first_step_gets_v_students_from_the_first_stage():
    from diffusers_pd.parameterization import stage_plan

    types = [entry["prediction_type"] for entry in stage_plan(stage_steps=[32, 16, 8, 4], teacher_prediction_type="epsilon",
                                                              epsilon_breaks_at_first_step=True)]
    assert types == ["v_prediction"] * 4


def test_a_clipped_linear_epsilon_teacher_gets_v_students_from_the_first_stage_and_unclipped_keeps_eps_until_4():
    # linear T = 1000 does not break at t = T, but an unclipped eps student cannot follow a clamped teacher
    from diffusers_pd.progressive import ProgressiveDistillation

    def plan(mode):
        method = ProgressiveDistillation(ddpm_config("linear"), [], (1, 8, 8), start_steps=64, end_steps=2,
                                         iterations_per_stage=1, prediction_type="auto", loss_weighting="auto",
                                         learning_rate=3e-4, teacher_clip_sample=mode)
        return [entry["prediction_type"] for entry in method.plan]

    assert plan("on") == ["v_prediction"] * 5
    assert plan("auto") == plan("off") == ["epsilon"] * 3 + ["v_prediction"] * 2


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
    assert (auto.grid_kind, auto.afs, auto.teacher_steps_per_step) == ("trailing", True, 32)  # K = 32 below 4 NFE (sfd.AUTO_SETTINGS)
    SimpleFastDistillation(ddpm_config("linear"), shape, nfes=[2], iterations=1, afs=False)  # not clipped: as before


# ------------------------------------------------------------------------------------- conditional teachers (issue)
def class_unet(seed: int = 0):
    """A tiny class-conditional UNet2DModel (10 classes and the null class 10) whose class input matters."""
    unet = tiny_unet(seed, num_class_embeds=11)
    with torch.no_grad():
        unet.class_embedding.weight.normal_(0, 1.0)
    return unet


def direct_clamped_cfg(unet, z, timesteps, labels, null, scale, config, clip_range):
    """Float64 by hand: x_u, x_c of an eps teacher from two calls, x_s = clamp(x_u + s (x_c - x_u)), eps_s from x_s;
    also the combination of the separately clamped halves, which a clamp per pass would give."""
    abar = alphas_cumprod_from_config(config)[timesteps]
    alpha, sigma = abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        x_u = (z - sigma * unet(z, timesteps, class_labels=null).sample) / alpha
        x_c = (z - sigma * unet(z, timesteps, class_labels=labels).sample) / alpha
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = (x_u + s * (x_c - x_u)).clamp(-clip_range, clip_range)
    halves = x_u.clamp(-clip_range, clip_range) + s * (x_c.clamp(-clip_range, clip_range) - x_u.clamp(-clip_range, clip_range))
    return x, (z - alpha * x) / sigma, halves


def test_the_guided_x_hat_is_clamped_after_the_combination_not_per_half():
    config = ddpm_config("squaredcos_cap_v2")
    unet = class_unet().double()
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([100, 400, 700, 950])  # x-hat in range at low noise, far outside at high noise
    labels, null = torch.tensor([1, 3, 5, 7]), torch.full((4,), 10)
    scales = torch.tensor([1.0, 2.0, 3.0, 4.5], dtype=torch.float64)
    x_direct, eps_direct, halves = direct_clamped_cfg(unet, z, timesteps, labels, null, scales, config, 1.5)
    guided = GuidedDenoiser(Denoiser(unet, config), clip_range=1.5)
    with torch.no_grad():
        x, eps = guided(z, timesteps, guidance_scale=scales, uncond={"class_labels": null}, class_labels=labels)
        alpha, sigma = guided.alpha_sigma(timesteps.double())  # the caller's (alpha, sigma) give the same
        x_given, _ = guided(z, timesteps, alpha=alpha, sigma=sigma, guidance_scale=scales, uncond={"class_labels": null},
                            class_labels=labels)
        x_plain, _ = GuidedDenoiser(Denoiser(unet, config))(z, timesteps, guidance_scale=scales,
                                                            uncond={"class_labels": null}, class_labels=labels)
    torch.testing.assert_close(x, x_direct, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(eps, eps_direct, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_given, x_direct, atol=1e-12, rtol=1e-12)
    assert x.abs().max() == 1.5 and (x.abs() < 1.5).float().mean() > 0.2  # the clamp acts, and not everywhere
    assert x_plain.abs().max() > 10  # unclamped: the guided x-hat leaves the range by far
    assert (halves - x).abs().max() > 0.5  # clamping each pass first is another prediction: not what is done
    # the pure function: eps re-derived from the clamped x-hat, in the parameterization's own terms
    x_pure, eps_pure = clip_x_eps(x=x_plain, z=z, alpha=alpha.reshape(-1, 1, 1, 1), sigma=sigma.reshape(-1, 1, 1, 1),
                                  clip_range=1.5)
    torch.testing.assert_close(x_from_eps(z=z, eps=eps_pure, alpha=alpha.reshape(-1, 1, 1, 1),
                                          sigma=sigma.reshape(-1, 1, 1, 1)), x_pure, atol=1e-10, rtol=1e-10)


def test_clipped_teacher_passes_class_labels_and_text_embeddings_through():
    from tiny_sd import TEXT_DIM, tiny_cond_unet

    config = ddpm_config("squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(2)
    timesteps = torch.tensor([500.0, 990.0])
    for unet, cond, other in (
        (class_unet(), {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([7, 8])}),
        (tiny_cond_unet(), {"encoder_hidden_states": torch.randn(2, 16, TEXT_DIM, generator=generator)},
         {"encoder_hidden_states": torch.randn(2, 16, TEXT_DIM, generator=generator)}),
    ):
        z = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
        clipped = ClippedTeacher(unet, config, 1.0)
        with torch.no_grad():
            x, _ = Denoiser(clipped, config)(z, timesteps, **cond)
            x_raw, _ = Denoiser(unet, config)(z, timesteps, **cond)
            x_other, _ = Denoiser(clipped, config)(z, timesteps, **other)
        torch.testing.assert_close(x, x_raw.clamp(-1, 1), atol=1e-4, rtol=1e-4)  # float32 round trip through eps
        assert x_raw.abs().max() > 1.5 and (x - x_other).abs().max() > 1e-3  # clamped, and the condition reached the UNet


def test_guided_distillation_clips_a_class_conditional_cosine_eps_teacher_and_not_a_linear_one():
    from diffusers_pd.conditioning import ClassConditioning
    from diffusers_pd.guided import GuidedDistillation, guided_ddim_samples
    from diffusers_pd.guided_distillation import GuidedDistillationLoss

    generator = torch.Generator().manual_seed(3)
    conditioning = ClassConditioning(torch.rand(20, 1, 8, 8, generator=generator) * 2 - 1, torch.arange(20) % 10,
                                     num_class_embeds=11)

    def method(config, **kwargs):
        return GuidedDistillation(conditioning, config, guidance_scale_min=3.0, guidance_scale_max=3.0, guidance_iterations=1,
                                  iterations_per_stage=1, start_steps=16, end_steps=8, prediction_type="auto",
                                  loss_weighting="truncated_snr", learning_rate=1e-3, **kwargs)

    cosine, linear = ddpm_config("squaredcos_cap_v2"), ddpm_config("linear")
    clipped, plain = method(cosine), method(linear)
    assert clipped.teacher_clip_range == 1.0 and plain.teacher_clip_range is None  # auto: its clip_sample, alpha_T 4.9e-5
    assert method(linear, teacher_clip_sample="on").teacher_clip_range == 1.0
    assert method(cosine, teacher_clip_sample="off").teacher_clip_range is None
    assert clipped.state()["teacher_clip_range"] == 1.0 and plain.state()["teacher_clip_range"] is None
    stage = clipped.stages()[0]
    assert clipped.card_training(stage, 8)["teacher x-hat"] == "clamped to [-1, 1] (its clip_sample)"
    assert plain.card_training(stage, 8)["teacher x-hat"] == "unclipped"
    # the cosine eps teacher's students predict v from the first stage, the guided one included; a linear one keeps eps
    assert clipped.guided_prediction_type == "v_prediction" and [e["prediction_type"] for e in clipped.plan] == ["v_prediction"]
    assert plain.guided_prediction_type == "epsilon" and [e["prediction_type"] for e in plain.plan] == ["epsilon"]
    forced = method(linear, teacher_clip_sample="on")  # clipped by request: an eps student could not follow it either
    assert forced.guided_prediction_type == "v_prediction" and [e["prediction_type"] for e in forced.plan] == ["v_prediction"]
    assert clipped.guided_loss.teacher_clip_range == 1.0 and plain.guided_loss.teacher_clip_range is None

    unet = class_unet()
    latents = torch.randn(10, 1, 8, 8, generator=generator)
    reference = clipped.reference_sampler()(unet, latents)
    unclipped = method(cosine, teacher_clip_sample="off").reference_sampler()(unet, latents)
    assert reference.abs().max() <= 1.0 + 1e-5 < unclipped.abs().max()
    assert clipped.teacher_baseline(8)(unet, latents).abs().max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="Students are never clipped"):
        guided_ddim_samples(unet, latents, scheduler_config=cosine, num_steps=8, conditioning=conditioning,
                            guidance_scale=3.0, student=True, clip_range=1.0)

    # stage one's target: the guided x-hat clamped after the combination (float64 by hand)
    teacher = unet.double()
    x0 = torch.rand(4, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    timesteps, scales = torch.tensor([50, 500, 900, 999]), torch.full((4,), 3.0, dtype=torch.float64)
    labels, null = torch.tensor([0, 4, 6, 9]), torch.full((4,), 10)
    student = class_unet(seed=5).double()
    loss = GuidedDistillationLoss(teacher_clip_range=1.0)(
        Denoiser(student, cosine, "v_prediction"), Denoiser(teacher, cosine), x0, noise, timesteps, scales,
        cond={"class_labels": labels}, uncond={"class_labels": null}, student_cond={})
    abar = alphas_cumprod_from_config(cosine)[timesteps]
    alpha, sigma = abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)
    z = alpha * x0 + sigma * noise
    target, _, _ = direct_clamped_cfg(teacher, z, timesteps, labels, null, scales, cosine, 1.0)
    with torch.no_grad():
        x_student = alpha * z - sigma * student(z, timesteps, class_labels=labels).sample
    weight = torch.clamp(alpha.reshape(-1) ** 2 / sigma.reshape(-1) ** 2, min=1.0)
    torch.testing.assert_close(loss.detach().double(), weight * (x_student - target).pow(2).flatten(1).mean(1), rtol=1e-5, atol=0)


def test_guided_halvings_switch_parameterization_where_parameterization_switch_steps_says_and_name_it():
    """Guided distillation's eps students predict v from GUIDED_EPSILON_SWITCH_STEPS (2) unless `switch_steps` says
    otherwise (`stage_plan`); a halving whose student predicts other than the teacher names it, so a resume with
    another plan is refused as one with other stages."""
    from diffusers_pd.conditioning import ClassConditioning
    from diffusers_pd.guided import GuidedDistillation

    conditioning = ClassConditioning(torch.zeros(20, 1, 8, 8), torch.arange(20) % 10, num_class_embeds=11)

    def method(prediction_type="auto", **kwargs):
        return GuidedDistillation(conditioning, ddpm_config("linear"), guidance_scale_min=3.0, guidance_scale_max=3.0,
                                  guidance_iterations=1, iterations_per_stage=1, start_steps=16, end_steps=2,
                                  prediction_type=prediction_type, loss_weighting="truncated_snr", learning_rate=1e-3, **kwargs)

    default, early = method(), method(switch_steps=4)
    assert [e["prediction_type"] for e in default.plan] == ["epsilon", "epsilon", "v_prediction"]  # guided: v from 2 steps
    assert [e["prediction_type"] for e in early.plan] == ["epsilon", "v_prediction", "v_prediction"]
    names = lambda m: [stage.name for stage in m.stages()]  # noqa: E731
    assert names(default)[1:] == ["16 -> 8", "8 -> 4", "4 -> 2 (v_prediction)"]
    assert names(early)[1:] == ["16 -> 8", "8 -> 4 (v_prediction)", "4 -> 2 (v_prediction)"]
    assert default.guided_prediction_type == early.guided_prediction_type == "epsilon"
    assert [e["prediction_type"] for e in method(prediction_type="v_prediction").plan] == ["v_prediction"] * 3  # at once
    # a checkpoint keeps the current teacher's prediction type (after the switch: v) under progressive's key; a resumed
    # run restores it, also from checkpoints that named it guided_prediction_type
    default.config = {**default.config, "prediction_type": "v_prediction"}
    assert default.state()["teacher_prediction_type"] == "v_prediction"
    for state in (default.state(), {"guided_prediction_type": "v_prediction"}):
        resumed = method()
        resumed.load_state(state)
        assert resumed.config["prediction_type"] == "v_prediction"
    untouched = method()
    untouched.load_state({})
    assert untouched.config["prediction_type"] == "epsilon"
