"""Pure math of the variance-preserving diffusion z_t = alpha_t x + sigma_t eps (Salimans & Ho 2022).

Notation (paper -> code):

| paper            | code        |
|------------------|-------------|
| z_t              | `z`         |
| x, x-hat         | `x`         |
| epsilon          | `eps`       |
| v                | `v`         |
| alpha_t, sigma_t | `alpha`, `sigma` (broadcastable tensors, alpha^2 + sigma^2 = 1) |
| alpha_s, sigma_s | `alpha_s`, `sigma_s` (the point the DDIM step lands on)      |

Every function is keyword-only and works on any dtype (the tests run them in float64).
`prediction_type` strings follow diffusers: ``"epsilon"``, ``"sample"``, ``"v_prediction"``.
"""

from typing import Dict, List, Optional, Tuple

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "constant")


def check_prediction_type(prediction_type: str) -> str:
    """Return `prediction_type` or raise a one-line error listing the valid ones."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}.")
    return prediction_type


def x_from_eps(*, z, eps, alpha, sigma):
    """x = (z - sigma * eps) / alpha."""
    return (z - sigma * eps) / alpha


def eps_from_x(*, z, x, alpha, sigma):
    """eps = (z - alpha * x) / sigma."""
    return (z - alpha * x) / sigma


def x_from_v(*, z, v, alpha, sigma):
    """x = alpha * z - sigma * v."""
    return alpha * z - sigma * v


def eps_from_v(*, z, v, alpha, sigma):
    """eps = sigma * z + alpha * v."""
    return sigma * z + alpha * v


def v_from_x_eps(*, x, eps, alpha, sigma):
    """v = alpha * eps - sigma * x."""
    return alpha * eps - sigma * x


def x_from_both(*, z, x_pred, eps_pred, alpha, sigma):
    """x = sigma^2 * x_pred + alpha * (z - sigma * eps_pred), the paper's merge of a two-headed output."""
    return sigma**2 * x_pred + alpha * (z - sigma * eps_pred)


def x_eps_from_output(*, output, z, alpha, sigma, prediction_type: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x-hat, eps-hat) of a raw network output in `prediction_type`."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x_from_eps(z=z, eps=output, alpha=alpha, sigma=sigma), output
    if prediction_type == "sample":
        return output, eps_from_x(z=z, x=output, alpha=alpha, sigma=sigma)
    return x_from_v(z=z, v=output, alpha=alpha, sigma=sigma), eps_from_v(z=z, v=output, alpha=alpha, sigma=sigma)


def output_from_x(*, x, z, alpha, sigma, prediction_type: str):
    """The network output in `prediction_type` that corresponds to x-hat at (z, alpha, sigma)."""
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return x
    eps = eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma)
    if prediction_type == "epsilon":
        return eps
    return v_from_x_eps(x=x, eps=eps, alpha=alpha, sigma=sigma)


def clip_output(*, output, z, alpha, sigma, prediction_type: str, clip_range: float):
    """The output in `prediction_type` whose x-hat is clamp(x-hat, -clip_range, clip_range), eps-hat re-derived from it
    (diffusers' `clip_sample=True` with `use_clipped_model_output=True`)."""
    x, _ = x_eps_from_output(output=output, z=z, alpha=alpha, sigma=sigma, prediction_type=prediction_type)
    return output_from_x(x=x.clamp(-clip_range, clip_range), z=z, alpha=alpha, sigma=sigma, prediction_type=prediction_type)


def clip_x_eps(*, x, z, alpha, sigma, clip_range: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', eps') = (clamp(x, -clip_range, clip_range), (z - alpha x') / sigma): a prediction's x-hat clamped, eps-hat
    re-derived from it (diffusers' `clip_sample=True` with `use_clipped_model_output=True`, on any x-hat: e.g. guided)."""
    x = x.clamp(-clip_range, clip_range)
    return x, eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma)


def convert_output(*, output, z, alpha, sigma, from_type: str, to_type: str):
    """The output in `to_type` that means the same x-hat as `output` in `from_type` at (z, alpha, sigma)."""
    x, _ = x_eps_from_output(output=output, z=z, alpha=alpha, sigma=sigma, prediction_type=from_type)
    return output_from_x(x=x, z=z, alpha=alpha, sigma=sigma, prediction_type=to_type)


def ddim_step(*, x, eps, alpha_s, sigma_s):
    """z_s = alpha_s * x + sigma_s * eps, the deterministic DDIM update (eta = 0) to time s."""
    return alpha_s * x + sigma_s * eps


def ddim_noise_std(*, alpha_t, sigma_t, alpha_s, sigma_s, eta):
    """sigma_t(eta) = eta * (sigma_s / sigma_t) * sqrt(1 - alpha_t^2 / alpha_s^2), eq. 16 of DDIM (Song et al. 2021)."""
    return eta * (sigma_s / sigma_t) * (1 - alpha_t**2 / alpha_s**2) ** 0.5


def ddim_stochastic_step(*, x, eps, noise, alpha_s, sigma_s, std):
    """z_s = alpha_s * x + sqrt(sigma_s^2 - std^2) * eps + std * noise, eq. 12 of DDIM with std = sigma_t(eta)."""
    return alpha_s * x + torch.clamp(sigma_s**2 - std**2, min=0.0) ** 0.5 * eps + std * noise


def x_eps_analytic_first_step(*, z, alpha, sigma):
    """AFS (Zhou et al. 2024): eps-hat = z, hence x-hat = (z - sigma z) / alpha = alpha z / (1 + sigma) (finite at alpha = 0)."""
    return alpha * z / (1.0 + sigma), z


def x_from_ddim_endpoints(*, z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t): the x that DDIM maps z_t to z_s with."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def snr(*, alpha, sigma):
    """SNR = alpha^2 / sigma^2."""
    return alpha**2 / sigma**2


def loss_weight(*, alpha, sigma, weighting: str):
    """Weight w(lambda) of the x-space MSE: truncated_snr max(SNR, 1), snr_plus_one SNR + 1, snr SNR, constant 1."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}.")
    ratio = snr(alpha=alpha, sigma=sigma)
    if weighting == "truncated_snr":
        return torch.clamp(ratio, min=1.0)
    if weighting == "snr_plus_one":
        return ratio + 1.0
    if weighting == "snr":
        return ratio
    return torch.ones_like(ratio)


# Students of an epsilon teacher keep epsilon while they take more than this many steps (see `stage_plan`).
EPSILON_SWITCH_STEPS = 4
# The same for guided distillation's halvings (`guided.GuidedDistillation`): measured on the latent text-to-image
# teacher of benchmarks/results/text-to-image-fashion/ (scaled_linear eps, start 8 steps, 1000 updates a stage), a
# switch at 4 left the 4-step student at 0.038 from the teacher's guided reference (3.8x its own 4-step DDIM) and a
# switch at 2 at 0.0066 (0.65x), with the 2- and 1-step students no worse (0.0396 / 0.0420 vs 0.0405 / 0.0441).
GUIDED_EPSILON_SWITCH_STEPS = 2


def student_loss_weighting(*, prediction_type: str, loss_weighting: str = "auto") -> str:
    """w(lambda) of a student's x-MSE: `loss_weighting`, or for "auto" snr (= its eps-MSE) for an epsilon student and
    truncated_snr (max(SNR, 1), the paper's) otherwise."""
    if loss_weighting != "auto":
        loss_weight(alpha=torch.ones(1), sigma=torch.ones(1), weighting=loss_weighting)  # one clear error if unknown
        return loss_weighting
    return "snr" if check_prediction_type(prediction_type) == "epsilon" else "truncated_snr"


def student_learning_rate(*, learning_rate: float, steps: int, prediction_type: str, scale: bool = True) -> float:
    """Peak lr of an N-step student: learning_rate * min(1, EPSILON_SWITCH_STEPS / N) for an epsilon or sample (x)
    student (`scale`), learning_rate for v."""
    if scale and check_prediction_type(prediction_type) in ("epsilon", "sample"):
        return learning_rate * min(1.0, EPSILON_SWITCH_STEPS / steps)
    return learning_rate


def final_prediction_type(*, teacher_prediction_type: str, prediction_type: str = "auto") -> str:
    """The parameterization the last students predict: `prediction_type`, or for "auto" v for an epsilon teacher
    and the teacher's own otherwise."""
    check_prediction_type(teacher_prediction_type)
    if prediction_type != "auto":
        return check_prediction_type(prediction_type)
    return "v_prediction" if teacher_prediction_type == "epsilon" else teacher_prediction_type


def stage_plan(
    *,
    stage_steps: List[int],
    teacher_prediction_type: str,
    prediction_type: str = "auto",
    switch_steps: Optional[int] = None,
    conversion_stage: bool = False,
    epsilon_breaks_at_first_step: bool = False,
    teacher_clipped: bool = False,
) -> List[Dict]:
    """Which parameterization each progressive-distillation stage's student predicts: THE rule, stated once.

    Returns one JSON-able dict per stage, in order, `{"steps": N, "prediction_type": P, "conversion": bool}`: a
    halving 2N -> N whose student predicts P, or (`conversion` True) a stage at the teacher's own N steps that only
    moves it to P (`loss.ParameterizationConversionLoss`, scheduler set to N). `stage_steps` are the students' steps
    (e.g. [32, 16, 8, 4, 2, 1]); store the plan in checkpoints and refuse a resume whose plan differs.

    The rule for `prediction_type="auto"` (the default):
      * v_prediction and sample teachers: every student keeps the teacher's parameterization (the plan is the
        pre-"auto" default's exactly, so v/x teachers' results are unchanged);
      * epsilon teachers: students keep epsilon while N > EPSILON_SWITCH_STEPS (4) and predict v from N = 4 on;
        no conversion stage; except where eps breaks at the first step of any grid (`epsilon_breaks_at_first_step`,
        `clipping.epsilon_breaks_at_first_step`: alpha_T < 1e-3, e.g. squaredcos_cap_v2) or the teacher's x-hat is
        clipped (`teacher_clipped`, `--teacher_clip_sample on`): v from the first stage. An unclipped eps student
        cannot follow a clamped teacher where 1 / alpha amplifies its eps error: on the Fashion-MNIST linear eps
        teacher clipped, eps students ended 0.23 / 0.30 / 0.48 from the clipped reference at 32 / 16 / 8 steps, v
        students 0.079 / 0.079 (benchmarks/results/fashion-mnist-eps/results.md, "Clipped teacher").
    An explicit `prediction_type` P switches to P at the first stage (the behaviour before "auto"), or at
    `switch_steps` if given; `conversion_stage` puts a conversion stage before the switching halving. Where an eps
    teacher's config says `clip_sample` and it is not clipped from the start, progressive distillation clamps the
    teacher of the switching halving (`clipping.switch_clip_range`: better few-step students, eps stages unchanged).

    Why (benchmarks/results/eps-teacher-digits/, a digits eps teacher of the Hub DDPM shape, T = 1000 linear, 64 -> 1
    at 400 updates x 64 per stage, sample MSE to the teacher's 64-step samples; teacher DDIM in brackets):
      * a student starts as a copy of its teacher; reading an eps head as v (at low SNR v ~ -x where it outputs eps)
        costs ~0.02 wherever it happens: v at once leaves 64 -> 32 at 0.018 [0.00024] and every later stage
        inherits it; a conversion stage (400 updates regressing the teacher's x-hat in v) ends at 0.023 itself;
      * kept in eps the many-step students are 5-10x closer (0.0021 / 0.0048 / 0.0086 at 32 / 16 / 8 steps);
      * eps breaks at few steps (x = (z - sigma eps) / alpha, alpha ~ 0 at the first step): kept to the end,
        0.079 at 2 steps and 1.26 at 1 against 0.026 / 0.027 for v;
      * switching at 4: 0.022 at 4 steps (eps there: 0.019), 0.026 at 2, 0.027 at 1; switching at 2: 0.019 at 4,
        0.031 at 2, 0.032 at 1. The switch at 4 gives the closest 1- and 2-step students, the ones users want.
    Every few-step stage (4, 2, 1) then beats the teacher's DDIM (0.62x, 0.03x, 0.003x); the 32/16/8-step eps
    students (8.8x, 2.6x, 1.1x) did not at this budget with any parameterization until they regressed their eps-MSE
    at lr x 4/N (`student_loss_weighting`, `student_learning_rate`): 0.82x, 0.51x, 0.56x (results.md).
    """
    final = final_prediction_type(teacher_prediction_type=teacher_prediction_type, prediction_type=prediction_type)
    if switch_steps is not None and switch_steps < 1:
        raise ValueError(f"switch_steps {switch_steps}: pass a step count of at least 1 (--parameterization_switch_steps).")
    if switch_steps is None:
        keep_epsilon = (prediction_type == "auto" and teacher_prediction_type == "epsilon"
                        and not (epsilon_breaks_at_first_step or teacher_clipped))
        switch_steps = EPSILON_SWITCH_STEPS if keep_epsilon else stage_steps[0]
    plan, current = [], teacher_prediction_type
    for steps in stage_steps:
        wanted = final if steps <= switch_steps else teacher_prediction_type
        if wanted != current and conversion_stage:
            plan.append({"steps": 2 * steps, "prediction_type": wanted, "conversion": True})
        plan.append({"steps": steps, "prediction_type": wanted, "conversion": False})
        current = wanted
    return plan
