"""Float64 identities of the parameterization module against independent formulas."""

import math

import pytest
import torch

from diffusers_pd.parameterization import (
    EPSILON_SWITCH_STEPS,
    convert_output,
    ddim_noise_std,
    ddim_step,
    ddim_stochastic_step,
    eps_from_v,
    eps_from_x,
    loss_weight,
    output_from_x,
    v_from_x_eps,
    x_eps_from_output,
    x_from_both,
    x_from_ddim_endpoints,
    x_from_eps,
    x_from_v,
    stage_plan,
    student_learning_rate,
    student_loss_weighting,
)

torch.manual_seed(0)


def point(shape=(5, 3, 4, 4)):
    """Random x, eps, and (alpha, sigma) on the unit circle, in float64."""
    x, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    angle = torch.rand(shape[0], 1, 1, 1, dtype=torch.float64) * (math.pi / 2 - 0.02) + 0.01
    return x, eps, torch.cos(angle), torch.sin(angle)


def test_x_eps_v_round_trips():
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    torch.testing.assert_close(x_from_eps(z=z, eps=eps, alpha=alpha, sigma=sigma), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma), eps, rtol=1e-12, atol=1e-12)
    v = v_from_x_eps(x=x, eps=eps, alpha=alpha, sigma=sigma)
    # v is the time-derivative of z along the circle: dz/dphi with alpha = cos(phi), sigma = sin(phi)
    torch.testing.assert_close(v, -sigma * x + alpha * eps)
    torch.testing.assert_close(x_from_v(z=z, v=v, alpha=alpha, sigma=sigma), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_v(z=z, v=v, alpha=alpha, sigma=sigma), eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_output_from_x_inverts_x_eps_from_output(prediction_type):
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    output = output_from_x(x=x, z=z, alpha=alpha, sigma=sigma, prediction_type=prediction_type)
    x_back, eps_back = x_eps_from_output(output=output, z=z, alpha=alpha, sigma=sigma, prediction_type=prediction_type)
    torch.testing.assert_close(x_back, x, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(eps_back, eps, rtol=1e-11, atol=1e-11)


def test_both_merges_with_weights_sigma2_and_alpha2():
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    x_pred, eps_pred = torch.randn_like(x), torch.randn_like(x)
    expected = sigma**2 * x_pred + alpha**2 * (z - sigma * eps_pred) / alpha
    torch.testing.assert_close(x_from_both(z=z, x_pred=x_pred, eps_pred=eps_pred, alpha=alpha, sigma=sigma), expected)
    # consistent heads merge to the shared x
    torch.testing.assert_close(x_from_both(z=z, x_pred=x, eps_pred=eps, alpha=alpha, sigma=sigma), x)


def test_ddim_endpoints_recover_x():
    x, eps, alpha_t, sigma_t = point()
    _, _, alpha_s, sigma_s = point()
    z_t = alpha_t * x + sigma_t * eps
    # DDIM keeps the implied eps: z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t
    z_s = ddim_step(x=x, eps=(z_t - alpha_t * x) / sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)
    recovered = x_from_ddim_endpoints(z_t=z_t, z_s=z_s, alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)


def test_loss_weights():
    _, _, alpha, sigma = point((200, 1, 1, 1))
    snr = (alpha / sigma) ** 2
    torch.testing.assert_close(loss_weight(alpha=alpha, sigma=sigma, weighting="truncated_snr"), torch.maximum(snr, torch.ones_like(snr)))
    torch.testing.assert_close(loss_weight(alpha=alpha, sigma=sigma, weighting="snr_plus_one"), snr + 1)
    torch.testing.assert_close(loss_weight(alpha=alpha, sigma=sigma, weighting="snr"), snr)
    assert torch.equal(loss_weight(alpha=alpha, sigma=sigma, weighting="constant"), torch.ones_like(snr))


def test_snr_plus_one_weighted_x_mse_is_v_mse():
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    x_hat = x + 0.3 * torch.randn_like(x)
    v = v_from_x_eps(x=x, eps=eps, alpha=alpha, sigma=sigma)
    v_hat = output_from_x(x=x_hat, z=z, alpha=alpha, sigma=sigma, prediction_type="v_prediction")
    weight = loss_weight(alpha=alpha, sigma=sigma, weighting="snr_plus_one")
    torch.testing.assert_close(weight * (x - x_hat) ** 2, (v - v_hat) ** 2, rtol=1e-10, atol=1e-12)


def test_bad_names_raise_one_line_errors():
    x, eps, alpha, sigma = point()
    with pytest.raises(ValueError, match="use one of epsilon, sample, v_prediction"):
        x_eps_from_output(output=x, z=x, alpha=alpha, sigma=sigma, prediction_type="eps")
    with pytest.raises(ValueError, match="truncated_snr"):
        loss_weight(alpha=alpha, sigma=sigma, weighting="min_snr")


def test_ddim_noise_std_and_stochastic_step():
    """eta = 1 gives DDPM's posterior std sqrt(beta~) (Ho et al. eq. 7); std = 0 is the deterministic DDIM step."""
    x, eps, alpha_t, sigma_t = point()
    alpha_s = alpha_t + (1 - alpha_t) * torch.rand_like(alpha_t)  # s is less noisy than t
    sigma_s = (1 - alpha_s**2).sqrt()
    abar_t, abar_s = alpha_t**2, alpha_s**2
    posterior_std = ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
    std = ddim_noise_std(alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s, eta=1.0)
    torch.testing.assert_close(std, posterior_std, rtol=1e-12, atol=1e-14)
    assert torch.equal(ddim_noise_std(alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s, eta=0.0), torch.zeros_like(std))
    noise = torch.randn_like(x)
    zero = torch.zeros_like(std)
    torch.testing.assert_close(
        ddim_stochastic_step(x=x, eps=eps, noise=noise, alpha_s=alpha_s, sigma_s=sigma_s, std=zero),
        ddim_step(x=x, eps=eps, alpha_s=alpha_s, sigma_s=sigma_s), rtol=1e-12, atol=1e-12,
    )


# closed forms of every conversion, written out independently of the module (z = alpha x + sigma eps)
CLOSED_FORMS = {
    ("epsilon", "v_prediction"): lambda eps, z, a, s: (eps - s * z) / a,
    ("epsilon", "sample"): lambda eps, z, a, s: (z - s * eps) / a,
    ("v_prediction", "epsilon"): lambda v, z, a, s: s * z + a * v,
    ("v_prediction", "sample"): lambda v, z, a, s: a * z - s * v,
    ("sample", "epsilon"): lambda x, z, a, s: (z - a * x) / s,
    ("sample", "v_prediction"): lambda x, z, a, s: (a * z - x) / s,
}


@pytest.mark.parametrize("from_type,to_type", sorted(CLOSED_FORMS))
def test_convert_output_matches_the_float64_closed_form(from_type, to_type):
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    output = {"epsilon": eps, "sample": x, "v_prediction": alpha * eps - sigma * x}[from_type]
    converted = convert_output(output=output, z=z, alpha=alpha, sigma=sigma, from_type=from_type, to_type=to_type)
    torch.testing.assert_close(converted, CLOSED_FORMS[from_type, to_type](output, z, alpha, sigma), rtol=1e-11, atol=1e-11)
    # an arbitrary output (not consistent with z) converts by the same formula, and back
    other = torch.randn_like(output)
    there = convert_output(output=other, z=z, alpha=alpha, sigma=sigma, from_type=from_type, to_type=to_type)
    torch.testing.assert_close(there, CLOSED_FORMS[from_type, to_type](other, z, alpha, sigma), rtol=1e-11, atol=1e-11)
    back = convert_output(output=there, z=z, alpha=alpha, sigma=sigma, from_type=to_type, to_type=from_type)
    torch.testing.assert_close(back, other, rtol=1e-10, atol=1e-10)


def plan_table(plan):
    return [(e["steps"], e["prediction_type"], e["conversion"]) for e in plan]


def test_stage_plan_keeps_stable_teachers_and_switches_epsilon_late():
    steps = [32, 16, 8, 4, 2, 1]
    for teacher in ("v_prediction", "sample"):  # students keep the teacher's head: nothing to re-learn
        assert {e["prediction_type"] for e in stage_plan(stage_steps=steps, teacher_prediction_type=teacher)} == {teacher}
    plan = plan_table(stage_plan(stage_steps=steps, teacher_prediction_type="epsilon"))
    assert plan == [(n, "epsilon" if n > EPSILON_SWITCH_STEPS else "v_prediction", False) for n in steps]
    # an explicit parameterization switches at once (the behaviour before "auto"), or where asked
    assert {e["prediction_type"] for e in stage_plan(stage_steps=steps, teacher_prediction_type="epsilon",
                                                    prediction_type="v_prediction")} == {"v_prediction"}
    assert plan_table(stage_plan(stage_steps=steps, teacher_prediction_type="sample", prediction_type="v_prediction",
                                 switch_steps=2))[3:] == [(4, "sample", False), (2, "v_prediction", False), (1, "v_prediction", False)]


def test_stage_plan_conversion_stage_sits_at_the_switching_teachers_steps():
    plan = plan_table(stage_plan(stage_steps=[32, 16, 8], teacher_prediction_type="epsilon", prediction_type="v_prediction",
                                 conversion_stage=True))
    assert plan == [(64, "v_prediction", True), (32, "v_prediction", False), (16, "v_prediction", False), (8, "v_prediction", False)]
    plan = plan_table(stage_plan(stage_steps=[8, 4, 2], teacher_prediction_type="epsilon", switch_steps=4, conversion_stage=True))
    assert plan == [(8, "epsilon", False), (8, "v_prediction", True), (4, "v_prediction", False), (2, "v_prediction", False)]
    # nothing to convert: no conversion stage
    assert not any(e["conversion"] for e in stage_plan(stage_steps=[8, 4], teacher_prediction_type="v_prediction",
                                                       conversion_stage=True))


def test_per_stage_budgets_give_each_stage_its_updates_and_one_unbroken_data_stream():
    from diffusers_pd.method import LoopContext, stage_budgets
    from diffusers_pd.progressive import ProgressiveDistillation

    assert stage_budgets(300, 3) == [300] * 3 and stage_budgets([1200, 600, 300], 5) == [1200, 600, 300, 300, 300]
    with pytest.raises(ValueError, match="gives 3 budgets for 2 stages"):
        stage_budgets([1, 2, 3], 2)
    with pytest.raises(ValueError, match="each stage needs at least 1 update"):
        stage_budgets([2, 0], 2)
    config = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    method = ProgressiveDistillation(config, [], (1, 8, 8), start_steps=16, end_steps=4, iterations_per_stage=[5, 2],
                                     prediction_type="v_prediction", loss_weighting="auto", learning_rate=1e-4,
                                     conversion_stage=True)  # 16: eps -> v, then 16 -> 8 -> 4: three stages
    stages = method.stages()
    assert [(stage.name, stage.iterations) for stage in stages] == [("16: epsilon -> v_prediction", 5), ("16 -> 8 (v_prediction)", 2),
                                                                     ("8 -> 4 (v_prediction)", 2)]
    ctx = LoopContext(torch.device("cpu"), 0, 1, 4, 3, 0)  # 3 micro-batches per update
    drawn = [method.micro_step(stage, i, m, ctx) for stage in stages for i in range(stage.iterations) for m in range(3)]
    assert drawn == list(range(3 * 9))  # every micro-batch of the run once, in order: resume anywhere continues it
    uniform = ProgressiveDistillation(config, [], (1, 8, 8), start_steps=16, end_steps=4, iterations_per_stage=4,
                                      prediction_type="v_prediction", loss_weighting="auto", learning_rate=1e-4)
    assert [uniform.micro_step(stage, 1, 2, ctx) for stage in uniform.stages()] == [5, 17]  # as before: index x 4 x 3 + 3 + 2


def test_epsilon_students_regress_their_eps_mse_and_others_the_truncated_snr_x_mse():
    """auto: an eps student's x-MSE weight is SNR, so its loss IS its eps-MSE (float64); v / x students keep max(SNR, 1)."""
    assert student_loss_weighting(prediction_type="epsilon") == "snr"
    assert {student_loss_weighting(prediction_type=p) for p in ("v_prediction", "sample")} == {"truncated_snr"}
    assert student_loss_weighting(prediction_type="epsilon", loss_weighting="truncated_snr") == "truncated_snr"  # explicit wins
    x, eps, alpha, sigma = point()
    z = alpha * x + sigma * eps
    eps_hat = eps + 0.3 * torch.randn_like(eps)
    x_hat = x_from_eps(z=z, eps=eps_hat, alpha=alpha, sigma=sigma)
    weight = loss_weight(alpha=alpha, sigma=sigma, weighting=student_loss_weighting(prediction_type="epsilon"))
    torch.testing.assert_close(weight * (x - x_hat) ** 2, (eps - eps_hat) ** 2, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="use one of truncated_snr"):
        student_loss_weighting(prediction_type="epsilon", loss_weighting="eps_mse")


def test_epsilon_and_x_students_learning_rate_falls_as_one_over_their_steps_down_to_the_switch():
    """lr_N = lr * min(1, 4 / N) for an eps or x student (its target moves by the teacher's O(1/N) DDIM error); v
    students, and --no-scale_lr_with_steps, keep lr."""
    steps = [512, 32, 16, 8, 4, 2, 1]
    for prediction_type in ("epsilon", "sample"):
        rates = [student_learning_rate(learning_rate=3e-4, steps=n, prediction_type=prediction_type) for n in steps]
        assert rates == pytest.approx([3e-4 / 128, 3e-4 / 8, 3e-4 / 4, 3e-4 / 2, 3e-4, 3e-4, 3e-4], rel=1e-12)
        assert [n * r for n, r in zip(steps, rates) if n >= EPSILON_SWITCH_STEPS] == pytest.approx([1.2e-3] * 5, rel=1e-12)
        assert {student_learning_rate(learning_rate=3e-4, steps=n, prediction_type=prediction_type, scale=False)
                for n in steps} == {3e-4}
    assert {student_learning_rate(learning_rate=3e-4, steps=n, prediction_type="v_prediction") for n in steps} == {3e-4}


def test_stage_plan_refuses_a_switch_below_one_step():
    with pytest.raises(ValueError, match="parameterization_switch_steps"):
        stage_plan(stage_steps=[2, 1], teacher_prediction_type="epsilon", switch_steps=0)
    with pytest.raises(ValueError, match="v_prediction"):
        stage_plan(stage_steps=[2, 1], teacher_prediction_type="eps")
