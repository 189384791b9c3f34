"""Classifier-free guidance as one batched forward (`GuidedDenoiser`, `cfg_combine`) against two-call references."""

import pytest
import torch
from conftest import tiny_unet
from tiny_sd import SD_SCHEDULER, TEXT_DIM, tiny_cond_unet

from diffusers_pd.denoiser import Denoiser, GuidedDenoiser
from diffusers_pd.grids import student_grid
from diffusers_pd.guidance import (
    add_guidance_embedding,
    cfg_combine,
    check_guidance_range,
    fold_guidance_embedding,
    guidance_scale_embedding,
    guidance_timestep_cond,
)
from diffusers_pd.parameterization import x_eps_from_output
from diffusers_pd.solvers import ddim_trajectory


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def text_inputs(batch=3, seed=0):
    """(latents, conditional text embeddings, unconditional ones) of a tiny SD batch."""
    return randn(batch, 4, 8, 8, seed=seed), randn(batch, 16, TEXT_DIM, seed=seed + 1), randn(batch, 16, TEXT_DIM, seed=seed + 2)


class CallCounter:
    """Counts a module's forward calls and the batch size of each."""

    def __init__(self, module):
        self.batches = []
        module.register_forward_hook(lambda _module, args, _output: self.batches.append(args[0].shape[0]))


def test_cfg_combine_is_diffusers_formula_and_exact_at_one():
    uncond, cond = randn(4, 3, dtype=torch.float64), randn(4, 3, seed=1, dtype=torch.float64)
    for s in (0.0, 1.0, 2.5, 7.5):
        torch.testing.assert_close(cfg_combine(uncond=uncond, cond=cond, guidance_scale=s), uncond + s * (cond - uncond), atol=1e-14, rtol=0)
    scales = torch.tensor([1.0, 2.0, 3.0, 4.5])
    expected = torch.stack([u + s * (c - u) for u, c, s in zip(uncond, cond, scales)])
    torch.testing.assert_close(cfg_combine(uncond=uncond, cond=cond, guidance_scale=scales), expected, atol=1e-14, rtol=0)
    assert torch.equal(cfg_combine(uncond=uncond.float(), cond=cond.float(), guidance_scale=1.0), cond.float())


@pytest.mark.parametrize("guidance_scale", [3.0, torch.tensor([1.0, 2.0, 7.5])], ids=["scalar", "per-sample"])
def test_eps_teacher_guided_eps_is_stable_diffusion_noise_pred_in_one_call(guidance_scale):
    unet = tiny_cond_unet()
    counter = CallCounter(unet)
    guided = GuidedDenoiser(Denoiser(unet, SD_SCHEDULER))
    z, text, empty = text_inputs()
    with torch.no_grad():
        x, eps = guided(z, 500, guidance_scale=guidance_scale, uncond={"encoder_hidden_states": empty}, encoder_hidden_states=text)
        assert counter.batches == [6]  # [uncond; cond] as one forward
        # StableDiffusionPipeline's two halves and its guidance line, computed here by two separate calls
        noise_pred_uncond = unet(z, 500, encoder_hidden_states=empty).sample
        noise_pred_text = unet(z, 500, encoder_hidden_states=text).sample
    scale = torch.as_tensor(guidance_scale).reshape(-1, 1, 1, 1)
    noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
    assert (noise_pred_text - noise_pred_uncond).abs().max() > 1e-3  # the text matters
    torch.testing.assert_close(eps, noise_pred, atol=1e-5, rtol=0)
    alpha, sigma = guided.alpha_sigma(torch.tensor(500.0))
    torch.testing.assert_close(x, ((z - sigma * noise_pred) / alpha).float(), atol=1e-5, rtol=1e-5)


def test_v_teacher_combines_x_hat_and_eps_hat_alike():
    unet = tiny_cond_unet(seed=1).double()
    config = {**SD_SCHEDULER, "prediction_type": "v_prediction"}
    guided = GuidedDenoiser(Denoiser(unet, config))
    z, text, empty = (tensor.double() for tensor in text_inputs(seed=3))
    t = torch.tensor([999.0, 420.5, 3.0])
    x, eps = guided(z, t, guidance_scale=4.0, uncond={"encoder_hidden_states": empty}, encoder_hidden_states=text)
    alpha, sigma = guided.alpha_sigma(t)
    alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    halves = [x_eps_from_output(output=unet(z, t, encoder_hidden_states=e).sample, z=z, alpha=alpha, sigma=sigma,
                                prediction_type="v_prediction") for e in (empty, text)]
    (x_u, eps_u), (x_c, eps_c) = halves
    torch.testing.assert_close(x, x_u + 4.0 * (x_c - x_u), atol=1e-10, rtol=0)
    torch.testing.assert_close(eps, eps_u + 4.0 * (eps_c - eps_u), atol=1e-10, rtol=0)
    torch.testing.assert_close(alpha * x + sigma * eps, z, atol=1e-10, rtol=0)  # still a consistent (x, eps) pair


def test_class_conditional_unet_with_null_class_and_shared_inputs():
    unet = tiny_unet(num_class_embeds=5)
    torch.nn.init.normal_(unet.class_embedding.weight)
    config = dict(num_train_timesteps=1000, prediction_type="epsilon")
    guided = GuidedDenoiser(Denoiser(unet, config))
    z, labels, null = randn(2, 1, 8, 8), torch.tensor([1, 3]), torch.tensor([4, 4])
    with torch.no_grad():
        _, eps = guided(z, 250, guidance_scale=2.0, uncond={"class_labels": null}, class_labels=labels)
        eps_u, eps_c = unet(z, 250, class_labels=null).sample, unet(z, 250, class_labels=labels).sample
    torch.testing.assert_close(eps, eps_u + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=0)


def test_guidance_embedding_input_is_shared_by_both_halves():
    unet = tiny_cond_unet(time_cond_proj_dim=8)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    guided = GuidedDenoiser(Denoiser(unet, SD_SCHEDULER))
    z, text, empty = text_inputs(batch=2)
    w = randn(2, 8, seed=9)
    with torch.no_grad():
        _, eps = guided(z, 700, guidance_scale=1.5, uncond={"encoder_hidden_states": empty}, encoder_hidden_states=text, timestep_cond=w)
        eps_u = unet(z, 700, encoder_hidden_states=empty, timestep_cond=w).sample
        eps_c = unet(z, 700, encoder_hidden_states=text, timestep_cond=w).sample
    torch.testing.assert_close(eps, eps_u + 1.5 * (eps_c - eps_u), atol=1e-5, rtol=0)


def test_solvers_pass_guidance_through_and_match_a_two_call_denoiser():
    unet = tiny_cond_unet(seed=2)
    denoiser = Denoiser(unet, SD_SCHEDULER)
    z, text, empty = text_inputs(batch=2, seed=5)
    grid = student_grid(SD_SCHEDULER, 4)

    def two_calls(z, t, *, alpha, sigma, guidance_scale, uncond, **cond):
        x_u, eps_u = denoiser(z, t, alpha=alpha, sigma=sigma, **uncond)
        x_c, eps_c = denoiser(z, t, alpha=alpha, sigma=sigma, **cond)
        return x_u + guidance_scale * (x_c - x_u), eps_u + guidance_scale * (eps_c - eps_u)

    with torch.no_grad():
        kwargs = dict(guidance_scale=5.0, uncond={"encoder_hidden_states": empty}, encoder_hidden_states=text)
        ours = ddim_trajectory(GuidedDenoiser(denoiser), z, grid, **kwargs)
        reference = ddim_trajectory(two_calls, z, grid, **kwargs)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)


def test_bad_unconditional_inputs():
    guided = GuidedDenoiser(Denoiser(tiny_cond_unet(), SD_SCHEDULER))
    z, text, empty = text_inputs(batch=1)
    with pytest.raises(ValueError, match="uncond must give"):
        guided(z, 10, guidance_scale=2.0, uncond={}, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="uncond must give"):
        guided(z, 10, guidance_scale=2.0, uncond={"class_labels": torch.tensor([0])}, encoder_hidden_states=text)


def guidance_inputs(seed=0):
    z, text, _ = text_inputs(batch=3, seed=seed)
    return z, torch.tensor([999.0, 412.5, 7.0]), text


@pytest.mark.parametrize("dim", [8, 256, 7])
def test_guidance_scale_embedding_is_the_pipelines(dim):
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    w = torch.tensor([0.0, 0.5, 2.0, 6.5, 13.0])
    ours = guidance_scale_embedding(w, dim)
    assert torch.equal(ours, StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim))
    assert torch.equal(ours, LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim))
    # what StableDiffusionPipeline.__call__ computes for guidance_scale s and batch 3: e(s - 1), repeated
    pipeline_cond = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(7.5 - 1).repeat(3), embedding_dim=dim)
    assert torch.equal(guidance_timestep_cond(7.5, dim, batch_size=3), pipeline_cond)
    per_sample = guidance_timestep_cond(torch.tensor([1.0, 7.5]), dim)
    assert torch.equal(per_sample[1], pipeline_cond[0]) and torch.equal(per_sample[0], guidance_scale_embedding(torch.zeros(1), dim)[0])


def test_untrained_guidance_conditioned_student_equals_the_teacher_bit_for_bit(tmp_path):
    teacher = tiny_cond_unet()
    student = add_guidance_embedding(teacher, 8)
    assert student.config.time_cond_proj_dim == 8 and teacher.config.time_cond_proj_dim is None
    assert type(student) is type(teacher)
    z, t, text = guidance_inputs()
    with torch.no_grad():
        expected = teacher(z, t, encoder_hidden_states=text).sample
        for s in (1.0, 3.0, 12.0):
            cond = guidance_timestep_cond(s, 8, batch_size=3)
            assert torch.equal(student(z, t, encoder_hidden_states=text, timestep_cond=cond).sample, expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_folded_unet_equals_the_conditioned_one_at_its_scale(tmp_path, guidance_scale):
    from diffusers import UNet2DConditionModel

    student = add_guidance_embedding(tiny_cond_unet(seed=1), 8)
    with torch.no_grad():
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)
    z, t, text = guidance_inputs(seed=2)

    def conditioned(unet, s, dtype):
        cond = guidance_timestep_cond(s, 8, 3).to(dtype)
        return unet(z.to(dtype), t.to(dtype), encoder_hidden_states=text.to(dtype), timestep_cond=cond).sample

    with torch.no_grad():
        expected = conditioned(student.double(), guidance_scale, torch.float64)
        assert (expected - conditioned(student, guidance_scale + 2, torch.float64)).abs().max() > 1e-3  # the embedding matters
        folded = fold_guidance_embedding(student, guidance_scale)
        assert folded.config.time_cond_proj_dim is None and folded.time_embedding.cond_proj is None
        folded_output = folded(z.double(), t.double(), encoder_hidden_states=text.double()).sample
        torch.testing.assert_close(folded_output, expected, atol=1e-10, rtol=0)

        student = student.float()
        folded = fold_guidance_embedding(student, guidance_scale)
        folded.save_pretrained(tmp_path / "unet")  # a plain float32 folder that stock diffusers loads
        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
        assert reloaded.config.time_cond_proj_dim is None
        torch.testing.assert_close(reloaded(z, t, encoder_hidden_states=text).sample, conditioned(student, guidance_scale, torch.float32),
                                   atol=1e-5, rtol=1e-5)


def test_bad_guidance_input():
    with pytest.raises(ValueError, match="needs a UNet2DConditionModel"):
        add_guidance_embedding(tiny_unet(), 8)
    with pytest.raises(ValueError, match="already takes a guidance embedding"):
        add_guidance_embedding(tiny_cond_unet(time_cond_proj_dim=4), 8)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        fold_guidance_embedding(tiny_cond_unet(), 2.0)
    with pytest.raises(ValueError, match="swap them"):
        check_guidance_range(5.0, 1.0)
    with pytest.raises(ValueError, match="below 1"):
        check_guidance_range(0.5, 3.0)
    check_guidance_range(1.0, 1.0)


def test_null_class_labels_of_a_class_conditional_teacher():
    from diffusers_pd.guidance import null_class_labels

    unet = tiny_unet(num_class_embeds=11)
    assert torch.equal(null_class_labels(unet, 3), torch.tensor([10, 10, 10]))
    assert torch.equal(null_class_labels(unet, 2, null_class=0), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside the teacher's class embedding 0..10"):
        null_class_labels(unet, 2, null_class=11)
    with pytest.raises(ValueError, match="needs a conditional teacher"):
        null_class_labels(tiny_unet(), 2)
