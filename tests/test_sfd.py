"""SFD: the student's Euler rollout vs stock diffusers, AFS, the per-step loss, the second stage, SFD-v."""

import copy
import math

import pytest
import torch
from conftest import tiny_unet

from diffusers_pd.denoiser import Denoiser
from diffusers_pd.export import stock_scheduler_for
from diffusers_pd.grids import student_grid, teacher_grid
from diffusers_pd.pipeline import denoise
from diffusers_pd.sfd import (
    SFDLoss, SimpleFastDistillation, check_nfe, sfd_sample, step_count_cond, student_nfe, trajectory_distance,
)
from diffusers_pd.solvers import euler_step
from diffusers_pd.step_embedding import add_step_embedding

LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def noise_batch(seed, batch_size=4, dtype=torch.float32):
    return torch.randn(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "kind, num_steps", [("trailing", 4), ("trailing", 3), ("karras", 3), ("lu", 2), ("karras", 1)]
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_student_euler_rollout_is_the_stock_order_one_scheduler(kind, num_steps, prediction_type):
    """DDIMScheduler (trailing, T % N == 0) or DPM-Solver++(1) samples exactly what the student was trained to do."""
    config = dict(LINEAR, prediction_type=prediction_type)
    unet = tiny_unet()
    stock, exact = stock_scheduler_for(config, num_steps, kind)
    assert exact
    noise = noise_batch(num_steps)
    with torch.no_grad():
        expected = denoise(unet, stock, noise, num_steps)
    ours = sfd_sample(Denoiser(unet, config), student_grid(config, num_steps, kind), noise)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # float32 in both; |x| reaches ~100


class PureNoiseModel(torch.nn.Module):
    """An epsilon-prediction network whose output is its input: it takes all of z to be noise."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timesteps, **cond):
        return type("Output", (), {"sample": sample})()


def test_afs_is_eps_hat_equals_z_and_the_papers_edm_formula():
    config = dict(LINEAR, prediction_type="epsilon")
    grid = student_grid(config, 3, "sfd")
    z = noise_batch(0, dtype=torch.float64)
    ours = euler_step(None, z, grid, 0, analytic=True)
    # the paper, in EDM units: x = z / alpha, d = x / sqrt(1 + s^2), x' = x + (s' - s) d, z' = alpha' x'
    s, s_next = grid.edm_sigmas[0].item(), grid.edm_sigmas[1].item()
    x = z / grid.alphas[0].item()
    expected = grid.alphas[1].item() * (x + (s_next - s) * x / math.sqrt(1 + s**2))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    # ... and a DDIM step of the model whose eps-hat is z (no network needed)
    pure_noise = Denoiser(PureNoiseModel().double(), config)
    torch.testing.assert_close(ours, euler_step(pure_noise, z, grid, 0), atol=1e-12, rtol=1e-12)


def test_trajectory_distances():
    a, b = noise_batch(1, dtype=torch.float64), noise_batch(2, dtype=torch.float64)
    d = (a - b).flatten(1)
    torch.testing.assert_close(trajectory_distance(student=a, teacher=b, loss="l1"), d.abs().sum(1).float())
    torch.testing.assert_close(trajectory_distance(student=a, teacher=b, loss="l2"), d.pow(2).sum(1).float())
    c = 0.00054 * 8
    huber = trajectory_distance(student=a, teacher=b, loss="pseudo_huber")
    torch.testing.assert_close(huber, ((d.pow(2).sum(1) + c * c).sqrt() - c).float())
    assert trajectory_distance(student=a, teacher=a, loss="pseudo_huber").abs().max() < 1e-7


@pytest.mark.parametrize("kind", ["trailing", "sfd"])
def test_untrained_student_on_a_ddim_teacher_grid_has_zero_loss(kind):
    """With K = 1 and a DDIM teacher, the teacher's trajectory IS the student's rollout: every step loss is 0."""
    config = dict(LINEAR, prediction_type="epsilon")
    grid = student_grid(config, 3, kind)
    teacher = Denoiser(tiny_unet(), config)
    method = SFDLoss(grid, teacher_grid(grid, 1, config), teacher_solver="ddim", afs=False)
    noise = noise_batch(3)
    targets = method.teacher_targets(teacher, noise)
    assert targets.shape == (4, *noise.shape) and torch.equal(targets[0], noise)
    z = method.first_state(noise)
    for n in method.trained_steps:
        loss, z = method(teacher, z, n, targets)
        assert loss.shape == (4,) and loss.max() < 1e-3
    # a finer DPM-Solver++(3M) teacher differs from the 3-step rollout
    fine = SFDLoss(grid, teacher_grid(grid, 4, config), teacher_solver="dpm_solver_3m", afs=False)
    assert fine.distance(fine.teacher_targets(teacher, noise)[-1], z, 3).min() > 1e-2


def test_sfd_loss_decreases_over_updates_and_each_step_is_detached():
    torch.manual_seed(0)
    config = dict(LINEAR, prediction_type="sample")  # bounded x-hat from a random tiny UNet
    grid = student_grid(config, 3, "karras")
    method = SFDLoss(grid, teacher_grid(grid, 4, config), teacher_solver="dpm_solver_3m", afs=True, loss="l1")
    teacher_unet = tiny_unet()
    teacher, student_unet = Denoiser(teacher_unet, config), copy.deepcopy(teacher_unet).train()
    student = Denoiser(student_unet, config)
    optimizer = torch.optim.Adam(student_unet.parameters(), lr=5e-3)
    assert list(method.trained_steps) == [1, 2]
    totals = []
    for update in range(24):
        noise = noise_batch(update % 3, batch_size=8)  # drawn outside, a pure function of the update
        targets = method.teacher_targets(teacher, noise)
        z = method.first_state(noise)
        total = 0.0
        for n in method.trained_steps:
            loss, z = method(student, z, n, targets)
            assert loss.requires_grad and not z.requires_grad
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.mean().item()
        totals.append(total)
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3]), [round(x, 2) for x in totals]


def test_second_stage_target_is_the_stage_one_students_own_afs_sample():
    config = dict(LINEAR, prediction_type="v_prediction")
    stage_one_grid = student_grid(config, 4, "karras")
    stage_one = Denoiser(tiny_unet(seed=3), config)
    method = SFDLoss.second_stage(student_grid(config, 1, "karras"), stage_one_grid, stage_one_afs=True)
    noise = noise_batch(4)
    targets = method.teacher_targets(stage_one, noise)
    assert targets.shape[0] == 2 and torch.equal(targets[0], noise)
    torch.testing.assert_close(targets[1], sfd_sample(stage_one, stage_one_grid, noise, afs=True), atol=0, rtol=0)
    loss, z = method(Denoiser(tiny_unet(seed=3), config), method.first_state(noise), 0, targets)
    assert loss.shape == (4,) and z.shape == noise.shape


def test_sfd_v_student_is_conditioned_on_its_step_count():
    config = dict(LINEAR, prediction_type="epsilon")
    teacher_unet = tiny_unet()
    student_unet = add_step_embedding(teacher_unet, max_nfe=3)
    with torch.no_grad():
        torch.nn.init.normal_(student_unet.class_embedding.weight, std=0.5)
    grid = student_grid(config, 3, "trailing")
    method = SFDLoss(grid, teacher_grid(grid, 1, config), teacher_solver="ddim", afs=True)
    noise = noise_batch(5)
    targets = method.teacher_targets(Denoiser(teacher_unet, config), noise)
    student = Denoiser(student_unet, config)
    z = method.first_state(noise)
    losses = [method(student, z, 1, targets, **step_count_cond(nfe, 4))[0] for nfe in (2, 3)]
    assert (losses[0] - losses[1]).abs().max() > 1e-3
    assert step_count_cond(2, 4, conditioned=False) == {}


def test_auto_grid_takes_lu_from_4_nfe_and_trailing_without_afs_below_where_lus_last_call_is_wasted():
    config = dict(LINEAR, prediction_type="v_prediction")
    setting = lambda method: (method.grid_kind, method.afs, method.teacher_steps_per_step)  # noqa: E731
    auto = lambda nfes, **kw: SimpleFastDistillation(config, (1, 8, 8), nfes=nfes, iterations=1, **kw)  # noqa: E731
    assert setting(auto([4])) == setting(auto([4, 5])) == ("lu", True, 4)
    assert setting(auto([2])) == setting(auto([3])) == setting(auto([2, 3, 4, 5])) == ("trailing", False, 32)
    assert setting(auto([1])) == ("trailing", False, 32)  # AFS would leave a 1-NFE student no call
    # given flags win; an explicit grid keeps the paper's AFS and K = 4
    assert setting(auto([4], afs=False, teacher_steps_per_step=2)) == ("lu", False, 2)
    assert setting(auto([2], grid="lu")) == ("lu", True, 4)
    assert all(student_nfe(auto([n]).losses[n].student_grid, auto([n]).afs) == n for n in (1, 2, 3, 4, 5))
    # why: lu's last network call is at the schedule's smallest sigma (t = 0), where nothing is left to denoise;
    # at 2 NFE that is half of the calls, at 4 a quarter. Trailing's last call is at t = T / N - 1.
    sigma_min = student_grid(config, 8, "lu").sigmas[-2]
    lu_2 = auto([2], grid="lu").losses[2].student_grid
    trailing_2 = auto([2]).losses[2].student_grid
    assert lu_2.sigmas[-2] == sigma_min and lu_2.timesteps[-2] == 0
    assert trailing_2.sigmas[-2] > 50 * sigma_min and trailing_2.timesteps[-2] == 499


def test_bad_input():
    config = dict(LINEAR, prediction_type="epsilon")
    grid = student_grid(config, 2, "trailing")
    fine = teacher_grid(grid, 2, config)
    with pytest.raises(ValueError, match="Unknown loss"):
        SFDLoss(grid, fine, loss="l3")
    with pytest.raises(ValueError, match="Unknown loss space"):
        SFDLoss(grid, fine, space="x")
    with pytest.raises(ValueError, match="Unknown solver"):
        SFDLoss(grid, fine, teacher_solver="euler_maruyama")
    with pytest.raises(ValueError, match="1-step student needs afs=False"):
        SFDLoss(student_grid(config, 1), teacher_grid(student_grid(config, 1), 2, config), afs=True)
    with pytest.raises(ValueError, match="not on the teacher grid"):
        SFDLoss(grid, student_grid(config, 3, "karras"))
    with pytest.raises(ValueError, match="not trained"):
        SFDLoss(grid, fine, afs=True)(None, noise_batch(0), 0, None)
    with pytest.raises(ValueError, match="AFS with NFE 1"):
        check_nfe(1, afs=True, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="positive"):
        check_nfe(0, afs=False, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="more than the teacher"):
        check_nfe(1000, afs=True, num_train_timesteps=1000)
    assert check_nfe(4, afs=True, num_train_timesteps=1000) == 5
