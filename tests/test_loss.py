"""Losses: the weighting identities and the zero of the distillation loss, against independent formulas."""

import pytest
import torch
from conftest import tiny_unet

from diffusers_pd import ProgressiveDistillationScheduler
from diffusers_pd.loss import DiffusionLoss, ParameterizationConversionLoss, ProgressiveDistillationLoss, draw_noise_and_grid_indices
from diffusers_pd.parameterization import convert_output


def batch(seed=0, n=6):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    return images, torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64), generator


def net64(z, t):
    """A float64 stand-in network."""
    return torch.sin(z) * (1 + t.reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize(
    "prediction_type,weighting,reference",
    [
        ("v_prediction", "snr_plus_one", lambda out, x, eps, a, s: (out - (a * eps - s * x)) ** 2),
        ("epsilon", "snr", lambda out, x, eps, a, s: (out - eps) ** 2),
        ("sample", "constant", lambda out, x, eps, a, s: (out - x) ** 2),
    ],
)
def test_diffusion_loss_is_the_plain_mse_of_its_parameterization(prediction_type, weighting, reference):
    scheduler = ProgressiveDistillationScheduler(prediction_type=prediction_type)
    images, noise, generator = batch()
    t = torch.randint(1000, (len(images),), generator=generator)
    loss = DiffusionLoss(scheduler, weighting)(net64, images, noise, t)
    a, s = scheduler.alpha_sigma(t, images)
    z = a * images + s * noise
    expected = reference(net64(z, t), images, noise, a, s).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_truncated_snr_weight_on_x_error():
    scheduler = ProgressiveDistillationScheduler(prediction_type="sample")
    images, noise, _ = batch()
    t = torch.tensor([0, 100, 400, 600, 800, 999])
    loss = DiffusionLoss(scheduler, "truncated_snr")(net64, images, noise, t)
    a, s = scheduler.alpha_sigma(t, images)
    z = a * images + s * noise
    mse = (net64(z, t) - images).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), torch.clamp((a / s).reshape(-1) ** 2, min=1) * mse, rtol=1e-5, atol=1e-7)


def test_distillation_loss_vanishes_for_the_ideal_student_only():
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(8)
    images, noise, generator = batch(1)
    indices = torch.randint(8, (len(images),), generator=generator)
    loss_fn = ProgressiveDistillationLoss(scheduler, "truncated_snr", teacher_prediction_type="epsilon")

    def ideal_student(z, t):
        return scheduler.distillation_target(net64, z, t, teacher_prediction_type="epsilon")

    assert loss_fn(ideal_student, net64, images, noise, indices).abs().max() < 1e-12
    assert loss_fn(net64, net64, images, noise, indices).min() > 1e-6


@pytest.mark.parametrize("teacher_type,student_type", [("epsilon", "v_prediction"), ("sample", "v_prediction"), ("epsilon", "sample")])
def test_conversion_loss_vanishes_for_the_converted_teacher_only(teacher_type, student_type):
    """The student whose output is the teacher's converted to its parameterization samples the same: zero loss."""
    scheduler = ProgressiveDistillationScheduler(prediction_type=student_type)
    scheduler.set_timesteps(16)
    images, noise, generator = batch(2)
    indices = torch.randint(16, (len(images),), generator=generator)
    loss_fn = ParameterizationConversionLoss(scheduler, "snr_plus_one", teacher_prediction_type=teacher_type)

    def converted(z, t):
        alpha, sigma = scheduler.alpha_sigma(t, z)
        return convert_output(output=net64(z, t), z=z, alpha=alpha, sigma=sigma, from_type=teacher_type, to_type=student_type)

    assert loss_fn(converted, net64, images, noise, indices).abs().max() < 1e-12
    assert loss_fn(net64, net64, images, noise, indices).min() > 1e-6  # the copied head, read in the other parameterization


def test_teacher_gets_no_gradient_and_student_does():
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(4)
    teacher, student = tiny_unet(seed=0), tiny_unet(seed=1).train()
    noise, indices = draw_noise_and_grid_indices((3, 1, 8, 8), 4, torch.Generator().manual_seed(0))
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    loss = ProgressiveDistillationLoss(scheduler)(
        lambda z, t: student(z, t).sample, lambda z, t: teacher(z, t).sample, images, noise, indices
    )
    loss.mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_bad_weighting_and_missing_grid_fail_early():
    with pytest.raises(ValueError, match="truncated_snr"):
        DiffusionLoss(ProgressiveDistillationScheduler(), "p2")
    with pytest.raises(ValueError, match="set_timesteps"):
        ProgressiveDistillationLoss(ProgressiveDistillationScheduler())
