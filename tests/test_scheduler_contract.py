"""The diffusers scheduler contract of ProgressiveDistillationScheduler, checked the way diffusers checks each of its
schedulers (SchedulerCommonTest, test_scheduler_ddim.py), against independent references: diffusers' own schedulers
and pipelines, a float64 numpy re-implementation of DDIM, stored numbers, and round trips through disk."""

import inspect
import logging
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

import diffusers_pd.scheduler as scheduler_module
from diffusers_pd import ProgressiveDistillationScheduler, cosine_trained_betas

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(**SD, rescale_betas_zero_snr=True)
SCHEDULES = {
    "linear": {},
    "sd": SD,
    "cos": dict(beta_schedule="squaredcos_cap_v2"),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "zero-snr": ZERO_SNR,
    "cosine1024": dict(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024)),
}


@pytest.fixture(autouse=True)
def fresh_log_memory(monkeypatch):
    """Each test starts with no dropped setting reported yet (from_config says each one once per process)."""
    monkeypatch.setattr(scheduler_module, "_REPORTED_SETTINGS", set())


def compatible_classes():
    """Every class of `_compatibles` this install can build (DPMSolverSDEScheduler needs torchsde)."""
    classes = []
    for name in ProgressiveDistillationScheduler._compatibles:
        cls = getattr(diffusers, name)
        try:
            cls()
        except ImportError:
            continue
        classes.append(cls)
    return classes


def numpy_alphas_cumprod(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02):
    """abar of the linear schedule, written out in float64 numpy (independent of the package)."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))


def dummy_model(sample, t):
    """A deterministic, nonlinear, timestep-dependent stand-in for a network (any dtype, numpy or torch)."""
    t = float(t) / 1000.0
    if isinstance(sample, np.ndarray):
        return np.tanh(1.5 * sample) * (1.0 - 0.5 * t) + 0.1 * t
    return torch.tanh(1.5 * sample) * (1.0 - 0.5 * t) + 0.1 * t


def deterministic_sample(dtype=torch.float32):
    """4x3x8x8 values from -1 to 1, as diffusers' dummy_sample_deter (no randomness)."""
    return (torch.arange(4 * 3 * 8 * 8, dtype=torch.float64).reshape(4, 3, 8, 8) / (4 * 3 * 8 * 8) * 2 - 1).to(dtype)


def reference_ddim_loop(z, num_steps, prediction_type, eta=0.0, noises=(), num_train_timesteps=1000):
    """DDIM in float64 numpy on the trailing grid, written from the DDIM paper (eqs. 12 and 16) in abar form."""
    abar = numpy_alphas_cumprod(num_train_timesteps)
    grid = (np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1).astype(int)
    for k, t in enumerate(grid):
        a_t = abar[t]
        a_prev = abar[grid[k + 1]] if k + 1 < len(grid) else 1.0
        out = dummy_model(z, t)
        if prediction_type == "epsilon":
            x0, eps = (z - np.sqrt(1 - a_t) * out) / np.sqrt(a_t), out
        elif prediction_type == "sample":
            x0, eps = out, (z - np.sqrt(a_t) * out) / np.sqrt(1 - a_t)
        else:
            x0, eps = np.sqrt(a_t) * z - np.sqrt(1 - a_t) * out, np.sqrt(a_t) * out + np.sqrt(1 - a_t) * z
        std = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        z = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        if eta > 0:
            z = z + std * noises[k]
    return z


# ---------------------------------------------------------------------------------------------- config round trips
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
def test_config_save_load_round_trip(schedule, tmp_path):
    prediction_type = "v_prediction" if schedule == "zero-snr" else "sample"
    scheduler = ProgressiveDistillationScheduler(**SCHEDULES[schedule], prediction_type=prediction_type)
    scheduler.save_config(tmp_path)
    loaded = ProgressiveDistillationScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(scheduler.config)
    assert "_use_default_values" not in scheduler.config  # every key explicit: no other class swaps in its defaults
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod) and torch.equal(loaded.betas, scheduler.betas)
    sample = deterministic_sample()
    for s in (scheduler, loaded):
        s.set_timesteps(5)
    t = scheduler.timesteps[1]
    assert torch.equal(scheduler.step(0.1 * sample, t, sample).prev_sample, loaded.step(0.1 * sample, t, sample).prev_sample)


@pytest.mark.parametrize("cls", compatible_classes(), ids=lambda c: c.__name__)
def test_from_config_to_and_from_every_compatible_class(cls, caplog):
    ours = ProgressiveDistillationScheduler(**SD, prediction_type="v_prediction")
    theirs = cls.from_config(ours.config)
    assert theirs.config.prediction_type == "v_prediction"
    if hasattr(theirs, "alphas_cumprod"):  # EDMEulerScheduler has sigmas, no beta table
        torch.testing.assert_close(theirs.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-6)
    if "timestep_spacing" in theirs.config:
        assert theirs.config.timestep_spacing == "trailing"
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.scheduler"):
        back = ProgressiveDistillationScheduler.from_config(theirs.config)
    assert "drops" not in caplog.text  # nothing that changes sampling was added on the way
    assert {k: back.config[k] for k in ours.config} == dict(ours.config)
    assert torch.equal(back.alphas_cumprod, ours.alphas_cumprod)


@pytest.mark.parametrize("cls", [c for c in compatible_classes() if c.__name__ != "EDMEulerScheduler"], ids=lambda c: c.__name__)
def test_from_a_default_stock_config_reads_its_schedule_not_our_defaults(cls):
    """A stock config at ITS defaults (e.g. Heun's betas 0.00085..0.012) is read as such, not as ours."""
    stock = cls()
    ours = ProgressiveDistillationScheduler.from_config(stock.config)
    torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)
    assert ours.config.prediction_type == stock.config.prediction_type


# ---------------------------------------------------------------------------------------------- betas and alphas
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
def test_betas_and_alphas_match_diffusers_and_alphas_cumprod(schedule):
    ours = ProgressiveDistillationScheduler(**SCHEDULES[schedule], prediction_type="v_prediction")
    stock = DDPMScheduler(**SCHEDULES[schedule])
    assert ours.betas.dtype == ours.alphas.dtype == torch.float32 and ours.alphas_cumprod.dtype == torch.float64
    # diffusers rescales to zero terminal SNR in float32, we in float64: near beta = 1 they part by float32 rounding
    tolerance = dict(rtol=1e-3, atol=1e-5) if schedule == "zero-snr" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.betas, stock.betas, **tolerance)
    torch.testing.assert_close(ours.alphas, stock.alphas, **tolerance)
    torch.testing.assert_close(torch.cumprod(ours.alphas.double(), 0), ours.alphas_cumprod, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- step
def test_step_has_ddim_signature_and_refuses_unknown_keywords():
    ours = list(inspect.signature(ProgressiveDistillationScheduler.step).parameters)
    assert ours == list(inspect.signature(DDIMScheduler.step).parameters)
    scheduler = ProgressiveDistillationScheduler()
    scheduler.set_timesteps(4)
    sample = deterministic_sample()
    with pytest.raises(TypeError, match="unexpected keyword argument 'etta'"):
        scheduler.step(sample, 999, sample, etta=1.0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_step_dict_and_tuple_outputs_are_equal(eta):
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(7)
    sample = deterministic_sample()
    t = scheduler.timesteps[2]
    as_dict = scheduler.step(dummy_model(sample, t), t, sample, eta, generator=torch.manual_seed(0))
    as_tuple = scheduler.step(dummy_model(sample, t), t, sample, eta, generator=torch.manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], as_dict.prev_sample) and torch.equal(as_tuple[1], as_dict.pred_original_sample)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_step_equals_ddim_scheduler_with_the_same_noise(prediction_type, num_steps, eta):
    """Where DDIMScheduler is exact (T % N == 0): the same eta, the same variance_noise, the same step."""
    ours = ProgressiveDistillationScheduler(prediction_type=prediction_type)
    stock = DDIMScheduler.from_config(ours.config)
    ours.set_timesteps(num_steps)
    stock.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, stock.timesteps)
    generator = torch.Generator().manual_seed(num_steps)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    for t in ours.timesteps:
        output = dummy_model(sample, t)
        noise = torch.randn(sample.shape, generator=generator)
        a = ours.step(output, t, sample, eta, variance_noise=noise)
        b = stock.step(output, t, sample, eta, variance_noise=noise)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=2e-5)
        sample = a.prev_sample
    # the noise matters at every step but the last, which lands on the clean sample (sigma_t(eta) = 0 there)
    ours.set_timesteps(num_steps)
    z = torch.randn(2, 3, 4, 4, generator=generator)
    differences = [(ours.step(z, t, z, eta, variance_noise=z).prev_sample - ours.step(z, t, z).prev_sample).abs().max() for t in ours.timesteps]
    assert all(d > 1e-3 for d in differences[:-1]) and differences[-1] == 0


def test_stochastic_step_draws_noise_from_the_generator_as_ddim_does():
    ours = ProgressiveDistillationScheduler(prediction_type="epsilon")
    stock = DDIMScheduler.from_config(ours.config)
    ours.set_timesteps(10)
    stock.set_timesteps(10)
    sample = deterministic_sample()
    t = ours.timesteps[3]
    a = ours.step(0.1 * sample, t, sample, 1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    b = stock.step(0.1 * sample, t, sample, 1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stock_pipelines_signature_inspection_passes_eta_and_generator():
    """StableDiffusionPipeline.prepare_extra_step_kwargs decides by inspecting `step`'s parameters."""
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    extra = StableDiffusionPipeline.prepare_extra_step_kwargs(SimpleNamespace(scheduler=scheduler), generator, 0.7)
    assert extra == {"eta": 0.7, "generator": generator}
    sample = deterministic_sample()
    noisy = scheduler.step(sample, 999, sample, **extra).prev_sample
    assert (noisy - scheduler.step(sample, 999, sample).prev_sample).abs().max() > 1e-3  # eta was honoured


def test_ddim_pipeline_with_our_scheduler_samples_our_stochastic_ddim():
    """DDIMPipeline swaps in DDIMScheduler.from_config(our config): with eta=1 it must sample what we sample."""
    unet = tiny_unet(seed=5)
    ours = ProgressiveDistillationScheduler(prediction_type="epsilon")
    pipe = DDIMPipeline(unet=unet, scheduler=ours)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.clip_sample is False
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), eta=1.0, num_inference_steps=4, output_type="pt").images

    generator = torch.Generator().manual_seed(1)
    sample = randn_tensor((2, 1, 8, 8), generator=generator)
    ours.set_timesteps(4)
    with torch.no_grad():
        for t in ours.timesteps:
            sample = ours.step(unet(sample, t).sample, t, sample, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(images, (sample / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
    deterministic = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), eta=0.0, num_inference_steps=4, output_type="pt").images
    assert (deterministic - images).abs().max() > 1e-2


def test_bad_step_arguments_fail_before_any_work():
    scheduler = ProgressiveDistillationScheduler()
    scheduler.set_timesteps(4)
    sample = deterministic_sample()
    with pytest.raises(ValueError, match=r"eta=-0.1 is outside \[0, 1\]"):
        scheduler.step(sample, 999, sample, -0.1)
    with pytest.raises(ValueError, match=r"eta=1.5 is outside \[0, 1\]"):
        scheduler.step(sample, 999, sample, 1.5)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        scheduler.step(sample, 999, sample, 0.5, generator=torch.manual_seed(0), variance_noise=sample)
    with pytest.raises(ValueError, match="learned variance.*model_output\\[:, :C\\]"):
        scheduler.step(torch.cat([sample, sample], dim=1), 999, sample)
    with pytest.raises(ValueError, match="variance_noise has shape"):
        scheduler.step(sample, 999, sample, 0.5, variance_noise=sample[:1])


# ---------------------------------------------------------------------------------------------- add_noise & friends
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5, 5), (4, 2, 3, 5, 5)], ids=["2d", "4d", "5d"])
def test_add_noise_and_get_velocity_dtypes_and_shapes(dtype, shape):
    scheduler = ProgressiveDistillationScheduler()
    generator = torch.Generator().manual_seed(0)
    x, noise = torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)
    t = torch.tensor([0, 10, 500, 999])
    abar = numpy_alphas_cumprod()[t.numpy()].reshape((-1,) + (1,) * (len(shape) - 1))
    x64, noise64 = x.double().numpy(), noise.double().numpy()
    tolerance = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    noisy, velocity = scheduler.add_noise(x, noise, t), scheduler.get_velocity(x, noise, t)
    for got, expected in [(noisy, np.sqrt(abar) * x64 + np.sqrt(1 - abar) * noise64), (velocity, np.sqrt(abar) * noise64 - np.sqrt(1 - abar) * x64)]:
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_allclose(got.double().numpy(), expected, **tolerance)
    # one scalar timestep for the whole batch, as int and as 0-d tensor
    assert torch.equal(scheduler.add_noise(x, noise, 500), scheduler.add_noise(x, noise, torch.tensor(500)))
    assert torch.equal(scheduler.add_noise(x, noise, 500), scheduler.add_noise(x, noise, torch.full((4,), 500)))


@pytest.mark.parametrize("bad", [1000, -1, -2, 2000], ids=str)
def test_out_of_range_timesteps_raise_like_ddim(bad):
    ours = ProgressiveDistillationScheduler()
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match=rf"Timesteps \[{bad}\] are out of range: use integers 0 <= t < num_train_timesteps=1000\."):
        ours.add_noise(x, x, torch.tensor([5, bad]))
    with pytest.raises(ValueError, match="out of range"):
        ours.get_velocity(x, x, torch.tensor([bad, 5]))
    if bad >= 1000:  # the stock scheduler raises too (it reads -1 as the last entry, noisiest, instead)
        with pytest.raises(IndexError):
            DDIMScheduler().add_noise(x, x, torch.tensor([5, bad]))
    ours.set_timesteps(4)
    with pytest.raises(ValueError, match="out of range"):
        ours.step(x, bad, x)


def test_non_integer_timesteps_raise_and_integral_floats_are_accepted():
    scheduler = ProgressiveDistillationScheduler()
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Timesteps \[999.5, 3.0\] are not integers"):
        scheduler.add_noise(x, x, torch.tensor([999.5, 3.0]))
    assert torch.equal(scheduler.add_noise(x, x, torch.tensor([999.0, 3.0])), scheduler.add_noise(x, x, torch.tensor([999, 3])))


def test_minus_one_is_the_clean_sample_only_where_documented():
    scheduler = ProgressiveDistillationScheduler()
    alpha, sigma = scheduler.alpha_sigma(torch.tensor([-1]), torch.zeros(1, 1))
    assert alpha.item() == 1.0 and sigma.item() == 0.0
    scheduler.set_timesteps(4)
    assert scheduler.next_timesteps(scheduler.timesteps[-1:]).tolist() == [-1]


def test_scale_model_input_is_identity_and_init_noise_sigma_one():
    scheduler = ProgressiveDistillationScheduler()
    scheduler.set_timesteps(4)
    sample = deterministic_sample()
    for t in scheduler.timesteps:
        assert scheduler.scale_model_input(sample, t) is sample
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == 1000


# ---------------------------------------------------------------------------------------------- set_timesteps
def test_set_timesteps_bounds():
    scheduler = ProgressiveDistillationScheduler(num_train_timesteps=100)
    for bad in (0, -3, 101):
        with pytest.raises(ValueError, match="must be between 1 and num_train_timesteps=100"):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(100)
    assert scheduler.timesteps.tolist() == list(range(99, -1, -1))
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [99] and scheduler.timesteps.dtype == torch.int64
    scheduler.set_timesteps(3, device="cpu")
    assert scheduler.timesteps.tolist() == [99, 66, 32] and scheduler.num_inference_steps == 3


# ---------------------------------------------------------------------------------------------- from_config logging
def test_from_config_logs_each_dropped_setting_once(caplog):
    source = DDIMScheduler(clip_sample=True, thresholding=True, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.scheduler"):
        ours = ProgressiveDistillationScheduler.from_config(source.config)
        ProgressiveDistillationScheduler.from_config(source.config)  # the same settings again: not repeated
    records = [r for r in caplog.records if r.name == "diffusers_pd.scheduler"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    for setting in ("clip_sample=True", "thresholding=True", "timestep_spacing='leading'", "steps_offset=1", "set_alpha_to_one=False"):
        assert setting in message
    assert ours.config.clip_sample is False and ours.config.timestep_spacing == "trailing" and ours.config.steps_offset == 0

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.scheduler"):
        ProgressiveDistillationScheduler.from_config(DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="trailing").config)
        ProgressiveDistillationScheduler.from_config(ours.config)  # our own config drops nothing
    assert [r.getMessage().split(": ")[-1] for r in caplog.records] == ["variance_type='learned_range'."]


def test_dropped_sigma_settings_are_replaced_so_a_stock_class_samples_our_grid(caplog):
    source = DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min", timestep_spacing="trailing")
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.scheduler"):
        ours = ProgressiveDistillationScheduler.from_config(source.config)
    assert "use_karras_sigmas=True" in caplog.text and "final_sigmas_type='sigma_min'" in caplog.text
    dpm = DPMSolverMultistepScheduler.from_config(ours.config)
    ours.set_timesteps(7)
    dpm.set_timesteps(7)
    assert torch.equal(dpm.timesteps, ours.timesteps) and dpm.sigmas[-1] == 0


# ---------------------------------------------------------------------------------------------- full sampling loop
@pytest.mark.parametrize("num_steps", [3, 10], ids=["N3-ddim-inexact", "N10"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_loop_equals_float64_reference(num_steps, prediction_type, eta):
    scheduler = ProgressiveDistillationScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    noises = [torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(num_steps)]
    sample = deterministic_sample(torch.float64)
    for k, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(dummy_model(sample, t), t, sample, eta, variance_noise=noises[k]).prev_sample
    expected = reference_ddim_loop(deterministic_sample(torch.float64).numpy(), num_steps, prediction_type, eta, [n.numpy() for n in noises])
    np.testing.assert_allclose(sample.numpy(), expected, rtol=1e-10, atol=1e-10)


# sum and mean of |sample| after a float32 10-step loop on T=1000 linear, from the deterministic sample and dummy model
# (DDIMScheduler, trailing and unclipped, gives the same to 2e-7 relative; the eps loop grows large since the dummy
# model is no real noise predictor, which makes it a sensitive record of the 1/alpha_t path)
STORED_FULL_LOOP = {"epsilon": (19373.1289, 25.225428), "sample": (530.8317, 0.691187), "v_prediction": (36.4254, 0.047429)}


@pytest.mark.parametrize("prediction_type", list(STORED_FULL_LOOP))
def test_full_loop_matches_stored_numbers(prediction_type):
    scheduler = ProgressiveDistillationScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    sample = deterministic_sample()
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    result_sum, result_mean = sample.abs().sum().item(), sample.abs().mean().item()
    stored_sum, stored_mean = STORED_FULL_LOOP[prediction_type]
    assert result_sum == pytest.approx(stored_sum, rel=1e-5) and result_mean == pytest.approx(stored_mean, rel=1e-5)
