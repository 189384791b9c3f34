"""Shared fixtures: tiny UNet2DModel configs built in the tests (no downloads)."""

import pytest
import torch
from diffusers import UNet2DModel

TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


def perturbed(module: torch.nn.Module, generator=None, scale: float = 0.02) -> torch.nn.Module:
    """`module` with every parameter moved by scale * N(0, 1) (drawn from `generator`, else the global RNG), so no
    zero-initialised layer hides an input and the output scale is clearly non-trivial."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    """A randomly initialised tiny UNet2DModel (about 40k parameters) whose output depends on its input and t."""
    torch.manual_seed(seed)
    return perturbed(UNet2DModel(**{**TINY_UNET, **overrides}))


@pytest.fixture
def unet():
    return tiny_unet()


def save_tiny_teacher(folder, seed: int = 0, **scheduler_kwargs):
    """A tiny eps-prediction, T=1000 linear teacher pipeline folder: the shape of Hub DDPM checkpoints."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=1000, **scheduler_kwargs)).save_pretrained(folder)
    return folder


def signal_mid_run(command, env, log, progress_pattern: str, signum, cwd=None, timeout: float = 240):
    """Run `command` with its output in the file `log`; send `signum` as soon as the log matches `progress_pattern`
    (a progress bar past its first update). Returns (exit status, log text); fails if the run ends first."""
    import re
    import subprocess
    import time

    with open(log, "w") as handle:
        process = subprocess.Popen([str(c) for c in command], env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not re.search(progress_pattern, open(log, errors="replace").read()):
            assert process.poll() is None, "the run ended before the planned signal: give it more updates"
            assert time.time() < deadline, "no progress seen"
            time.sleep(0.05)
        process.send_signal(signum)
        status = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, open(log, errors="replace").read()
