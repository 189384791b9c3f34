"""GuidedDistillationLoss (stage one of Meng et al. 2023) against a direct formula, at s = 1, and in a few training steps."""

import pytest
import torch
from tiny_sd import SD_SCHEDULER, TEXT_DIM, tiny_cond_unet

from diffusers_pd.denoiser import Denoiser
from diffusers_pd.guidance import add_guidance_embedding, guidance_scale_embedding
from diffusers_pd.guided_distillation import GuidedDistillationLoss, draw_guided_batch, uniform_guidance_scales
from diffusers_pd.schedules import alphas_cumprod_from_config

DIM = 8


def batch(seed=0, size=4):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, 4, 8, 8, generator=generator)
    text = torch.randn(size, 16, TEXT_DIM, generator=generator)
    empty = torch.randn(1, 16, TEXT_DIM, generator=generator).expand(size, -1, -1)  # one null prompt for all
    noise, timesteps, scales = draw_guided_batch(latents.shape, num_train_timesteps=1000, guidance_scale_min=1.0,
                                                 guidance_scale_max=6.0, generator=generator)
    return latents, text, empty, noise, timesteps, scales


def test_draw_guided_batch_covers_all_timesteps_and_the_scale_range():
    noise, timesteps, scales = draw_guided_batch((4000, 1), num_train_timesteps=1000, guidance_scale_min=2.0, guidance_scale_max=5.0,
                                                 generator=torch.Generator().manual_seed(0))
    assert timesteps.min() < 10 and timesteps.max() > 990 and timesteps.dtype == torch.long
    assert 2.0 <= scales.min() < 2.01 and 4.99 < scales.max() < 5.0
    assert abs(noise.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="swap them"):
        uniform_guidance_scales(2, guidance_scale_min=3.0, guidance_scale_max=2.0)


def test_loss_is_the_weighted_x_mse_to_the_two_call_cfg_target():
    teacher_unet = tiny_cond_unet(seed=0).double()
    student_unet = add_guidance_embedding(tiny_cond_unet(seed=1), DIM).double()
    torch.nn.init.normal_(student_unet.time_embedding.cond_proj.weight, std=0.3)
    config = {**SD_SCHEDULER, "prediction_type": "v_prediction"}
    latents, text, empty, noise, timesteps, scales = (t.double() if t.is_floating_point() else t for t in batch(seed=3))
    loss = GuidedDistillationLoss(embedding_dim=DIM)(
        Denoiser(student_unet, config), Denoiser(teacher_unet, config), latents, noise, timesteps, scales,
        cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty},
    )
    # direct formula in float64: alpha, sigma from the table, two teacher calls, x from v
    abar = alphas_cumprod_from_config(config)[timesteps]
    alpha, sigma = abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)
    z = alpha * latents + sigma * noise
    with torch.no_grad():
        x_u = alpha * z - sigma * teacher_unet(z, timesteps, encoder_hidden_states=empty).sample
        x_c = alpha * z - sigma * teacher_unet(z, timesteps, encoder_hidden_states=text).sample
        s = scales.reshape(-1, 1, 1, 1)
        target = x_u + s * (x_c - x_u)
        w = guidance_scale_embedding(scales - 1, DIM).double()
        x_student = alpha * z - sigma * student_unet(z, timesteps, encoder_hidden_states=text, timestep_cond=w).sample
    weight = torch.clamp(alpha.reshape(-1) ** 2 / sigma.reshape(-1) ** 2, min=1.0)
    expected = weight * (x_student - target).pow(2).flatten(1).mean(1)
    assert loss.shape == (4,) and loss.requires_grad
    torch.testing.assert_close(loss.detach().double(), expected, atol=0, rtol=1e-5)


def test_loss_is_exactly_zero_for_the_untrained_student_at_scale_one():
    teacher_unet = tiny_cond_unet()
    student = Denoiser(add_guidance_embedding(teacher_unet, DIM), SD_SCHEDULER)
    latents, text, empty, noise, timesteps, _ = batch()
    loss = GuidedDistillationLoss(embedding_dim=DIM)(
        student, Denoiser(teacher_unet, SD_SCHEDULER), latents, noise, timesteps, torch.ones(4),
        cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty},
    )
    assert torch.equal(loss, torch.zeros(4))
    loss_guided = GuidedDistillationLoss(embedding_dim=DIM)(
        student, Denoiser(teacher_unet, SD_SCHEDULER), latents, noise, timesteps, torch.full((4,), 3.0),
        cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty},
    )
    assert (loss_guided > 0).all()  # at s > 1 the teacher's guided target differs from its conditional output


def test_loss_decreases_in_a_few_training_steps():
    teacher_unet = tiny_cond_unet()
    teacher = Denoiser(teacher_unet, SD_SCHEDULER)
    student_unet = add_guidance_embedding(teacher_unet, DIM).train()
    student = Denoiser(student_unet, SD_SCHEDULER)
    loss_fn = GuidedDistillationLoss(embedding_dim=DIM, weighting="snr_plus_one")
    optimizer = torch.optim.Adam(student_unet.parameters(), lr=5e-4)
    latents, text, empty, noise, timesteps, scales = batch(seed=1, size=8)
    losses = []
    for _ in range(8):
        loss = loss_fn(student, teacher, latents, noise, timesteps, scales,
                       cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty}).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert student_unet.time_embedding.cond_proj.weight.abs().max() > 0  # the guidance input is trained
    assert losses[-1] < 0.4 * losses[0], losses
    assert all(p.grad is None for p in teacher_unet.parameters())


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown loss weighting"):
        GuidedDistillationLoss(embedding_dim=DIM, weighting="l1")
    teacher_unet = tiny_cond_unet()
    other = {**SD_SCHEDULER, "beta_schedule": "linear"}
    latents, text, empty, noise, timesteps, scales = batch()
    with pytest.raises(ValueError, match="share one noise schedule"):
        GuidedDistillationLoss(embedding_dim=DIM)(
            Denoiser(add_guidance_embedding(teacher_unet, DIM), other), Denoiser(teacher_unet, SD_SCHEDULER), latents, noise,
            timesteps, scales, cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty})


def test_stage_two_target_with_conditions_lands_one_student_step_on_the_teachers_two_steps():
    """Guided stage two: Algorithm 2 on a guidance-conditioned teacher, the teacher side conditioned on the same s."""
    from diffusers_pd.grids import Grid
    from diffusers_pd.guidance import guidance_timestep_cond
    from diffusers_pd.loss import RawOutput
    from diffusers_pd.scheduler import ProgressiveDistillationScheduler
    from diffusers_pd.schedules import trailing_timesteps
    from diffusers_pd.solvers import ddim_trajectory

    teacher_unet = add_guidance_embedding(tiny_cond_unet(seed=4), DIM).double()
    torch.nn.init.normal_(teacher_unet.time_embedding.cond_proj.weight, std=0.3)
    scheduler = ProgressiveDistillationScheduler.from_config(SD_SCHEDULER)
    scheduler.set_timesteps(4)  # the student's grid; the teacher steps on the 8-step one
    latents, text, _, noise, _, _ = (t.double() if t.is_floating_point() else t for t in batch(seed=7, size=2))
    grid_index = torch.tensor([1, 3])  # an inner point and the last one (to the clean sample)
    t = scheduler.timesteps[grid_index]
    alpha, sigma = scheduler.alpha_sigma(t, latents)
    z = alpha * latents + sigma * noise
    points = torch.tensor([*trailing_timesteps(1000, 8), -1], dtype=torch.float64)  # the 8-step grid, float64 table
    teacher_grid = Grid(points, *Denoiser(teacher_unet, SD_SCHEDULER).alpha_sigma(points))
    targets = {}
    for s in (1.0, 4.0):
        cond = {"encoder_hidden_states": text, "timestep_cond": guidance_timestep_cond(s, DIM, batch_size=2).double()}
        x_target = scheduler.distillation_target_x(RawOutput(teacher_unet, **cond), z, t)
        targets[s] = x_target
        for i, k in enumerate(grid_index.tolist()):  # the teacher's own two DDIM steps from point 2k to 2k + 2
            two_steps = ddim_trajectory(Denoiser(teacher_unet, SD_SCHEDULER), z[i:i + 1], teacher_grid.subgrid([2 * k, 2 * k + 1, 2 * k + 2]),
                                        encoder_hidden_states=cond["encoder_hidden_states"][i:i + 1], timestep_cond=cond["timestep_cond"][i:i + 1])
            alpha_next, sigma_next = teacher_grid.alphas[2 * k + 2], teacher_grid.sigmas[2 * k + 2]
            if sigma_next > 0:  # one student DDIM step with x~ lands on the teacher's z_t''
                eps = (z[i] - alpha[i] * x_target[i]) / sigma[i]
                torch.testing.assert_close(alpha_next * x_target[i] + sigma_next * eps, two_steps[-1, 0], atol=1e-9, rtol=0)
            else:  # last step: the teacher's x-hat at t'
                torch.testing.assert_close(x_target[i], two_steps[-1, 0], atol=1e-9, rtol=0)
    assert (targets[1.0] - targets[4.0]).abs().max() > 1e-3  # the teacher side is conditioned on s


def test_the_new_guidance_embedding_gets_its_own_learning_rate_and_the_rest_the_schedules():
    from argparse import Namespace

    from diffusers_pd import training
    from diffusers_pd.guidance import COND_PROJ

    teacher_unet = tiny_cond_unet()
    student = add_guidance_embedding(teacher_unet, DIM).train()
    student.conv_in.requires_grad_(False)  # frozen weights join no group
    added = set(dict(student.named_parameters())) - set(dict(teacher_unet.named_parameters()))
    assert added == {COND_PROJ}
    groups = training.param_groups(student.named_parameters(), {name: 30.0 for name in added})
    assert [(group["lr_scale"], len(group["params"])) for group in groups] == [
        (1.0, sum(p.requires_grad for p in student.parameters()) - 1), (30.0, 1)]
    args = Namespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8)
    optimizer = training.make_optimizer(groups, args)
    training.set_lr(optimizer, 2e-4)  # the schedule's lr, e.g. linear decay
    assert [group["lr"] for group in optimizer.param_groups] == [2e-4, 2e-4 * 30.0]
    # the reference: torch's Adam with the two learning rates written out
    reference_student = add_guidance_embedding(teacher_unet, DIM).train()
    reference_student.conv_in.requires_grad_(False)
    cond_proj = reference_student.time_embedding.cond_proj.weight
    reference = torch.optim.Adam([{"params": [p for p in reference_student.parameters() if p.requires_grad and p is not cond_proj]},
                                  {"params": [cond_proj], "lr": 2e-4 * 30.0}], lr=2e-4)
    latents, text, empty, noise, timesteps, scales = batch(seed=2)
    for unet, opt in ((student, optimizer), (reference_student, reference)):
        loss = GuidedDistillationLoss(embedding_dim=DIM)(
            Denoiser(unet, SD_SCHEDULER), Denoiser(teacher_unet, SD_SCHEDULER), latents, noise, timesteps, scales,
            cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty}).mean()
        loss.backward()
        opt.step()
    for (name, ours), theirs in zip(student.state_dict().items(), reference_student.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert student.time_embedding.cond_proj.weight.abs().max() > 10 * 2e-4  # Adam's first step: ~lr x scale per weight
    training.set_lr(torch.optim.Adam(student.parameters()), 1e-3)  # a plain optimizer: lr as given
    with pytest.raises(ValueError, match="No trainable parameter named"):
        training.param_groups(student.named_parameters(), {"conv_in.weight": 2.0})


class CFGStandIn(torch.nn.Module):
    """A 'student' that IS the teacher's classifier-free guidance at the s it is given (s read from its own input)."""

    def __init__(self, teacher_unet, empty):
        super().__init__()
        self.teacher_unet, self.empty = teacher_unet, empty

    def forward(self, z, timesteps, *, encoder_hidden_states, guidance_scale):
        uncond = self.teacher_unet(z, timesteps, encoder_hidden_states=self.empty).sample
        cond = self.teacher_unet(z, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        return type("Output", (), {"sample": uncond + guidance_scale * (cond - uncond)})


def test_guidance_liveness_is_one_for_the_teachers_own_guidance_and_zero_for_the_untrained_student():
    from diffusers_pd.guidance import guidance_timestep_cond
    from diffusers_pd.guided_distillation import guidance_liveness

    teacher_unet = tiny_cond_unet().double()
    latents, text, empty, noise = (t.double() for t in batch(seed=4)[:4])
    timesteps = torch.tensor([50, 300, 600, 950])
    probe = dict(cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty}, guidance_scales=(3.0, 5.0))
    teacher = Denoiser(teacher_unet, SD_SCHEDULER)
    follows = guidance_liveness(Denoiser(CFGStandIn(teacher_unet, empty), SD_SCHEDULER), teacher, latents, noise, timesteps,
                                guidance_cond=lambda s, n: {"guidance_scale": s}, **probe)
    ignores = guidance_liveness(Denoiser(add_guidance_embedding(teacher_unet, DIM), SD_SCHEDULER), teacher, latents, noise,
                                timesteps, guidance_cond=lambda s, n: {"timestep_cond": guidance_timestep_cond(s, DIM, n).double()},
                                **probe)
    for s in (3.0, 5.0):
        assert follows[s]["ratio"] == pytest.approx(1.0, abs=1e-9) and follows[s]["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert follows[s]["student_error"] < 1e-9 < follows[s]["teacher_change"]
        assert ignores[s]["ratio"] == 0.0  # the zero-initialised embedding: the same output at every s
        # an s-blind student's error at s is the teacher's whole change from s = 1
        assert ignores[s]["student_error"] == pytest.approx(ignores[s]["teacher_change"], rel=1e-9)
    assert follows[1.0]["student_error"] < 1e-9 and ignores[1.0]["student_error"] == 0.0
    # the teacher's change is linear in s - 1
    assert follows[5.0]["teacher_change"] == pytest.approx(2 * follows[3.0]["teacher_change"], rel=1e-9)
