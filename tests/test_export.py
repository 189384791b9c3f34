"""Saved students load with plain diffusers (no diffusers_pd import) and sample what our scheduler samples."""

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from diffusers_pd import ProgressiveDistillationPipeline, ProgressiveDistillationScheduler, cosine_trained_betas, save_student

STOCK_SAMPLER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    folder, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pipe = DiffusionPipeline.from_pretrained(folder)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np").images
    np.save(out, images)
    assert "diffusers_pd" not in sys.modules, "the stock loader imported diffusers_pd"
    print(json.dumps({"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                      "metadata": pipe.scheduler.config.get("_diffusers_pd")}))
    """
)


def sample_in_plain_diffusers(folder, steps, tmp_path):
    """Load and sample `folder` in a fresh interpreter that never imports diffusers_pd."""
    out = tmp_path / f"stock-{steps}.npy"
    result = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, str(folder), str(steps), str(out)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out), json.loads(result.stdout.strip().splitlines()[-1])


def reference_images(unet, scheduler, steps):
    """The images our own scheduler samples on the student's grid from DDPMPipeline's noise."""
    pipe = ProgressiveDistillationPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np").images


@pytest.mark.parametrize(
    "schedule,steps,stock_name",
    [
        (dict(num_train_timesteps=1000, prediction_type="v_prediction"), 4, "DDIMScheduler"),
        (dict(num_train_timesteps=1000, prediction_type="epsilon"), 3, "DPMSolverMultistepScheduler"),
        (dict(num_train_timesteps=1024, trained_betas=cosine_trained_betas(1024), prediction_type="v_prediction"), 2, "DDIMScheduler"),
        (dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 16, "DPMSolverMultistepScheduler"),
    ],
    ids=["linear-v-4", "linear-eps-3", "cosine1024-v-2", "cos-x-16"],
)
def test_student_loads_in_plain_diffusers_and_matches_our_sampler(schedule, steps, stock_name, tmp_path):
    unet = tiny_unet(seed=steps)
    scheduler = ProgressiveDistillationScheduler(**schedule)
    folder = tmp_path / "student"
    info = save_student(folder, unet, scheduler, steps, teacher="tests/teacher", teacher_prediction_type="epsilon")

    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "DDPMPipeline"
    assert all(v[0] == "diffusers" for k, v in model_index.items() if not k.startswith("_"))
    assert info["stock_exact"] and info["stock_scheduler"] == stock_name and info["num_inference_steps"] == steps

    images, report = sample_in_plain_diffusers(folder, steps, tmp_path)
    assert report["scheduler"] == stock_name and report["metadata"]["num_inference_steps"] == steps
    assert report["metadata"]["teacher"] == "tests/teacher"
    expected = reference_images(unet, ProgressiveDistillationScheduler(**schedule), steps)
    assert images.std() > 0.05  # not a constant image: the comparison carries weight
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)

    # our pipeline loads the stock folder, defaults to the student's steps, and samples the same images
    pipe = ProgressiveDistillationPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, ProgressiveDistillationScheduler)
    again = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    np.testing.assert_allclose(again, expected, atol=1e-6, rtol=0)


def test_stock_ddim_would_mis_sample_where_we_export_dpm_solver(tmp_path):
    """The reason for the DPM-Solver export: a DDIM folder sampled at N=3 on T=1000 lands off the grid."""
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = tiny_unet(seed=3)
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    expected = reference_images(unet, scheduler, 3)
    ddim = DDIMScheduler.from_config(scheduler.config)
    wrong = DDPMPipeline(unet=unet, scheduler=ddim)(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=3, output_type="np").images
    assert np.abs(wrong - expected).max() > 1e-3


def test_inexact_grid_is_flagged_and_warned(tmp_path, caplog):
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    scheduler = ProgressiveDistillationScheduler(**schedule)
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.export"):
        info = save_student(tmp_path / "s3", tiny_unet(), scheduler, 3)
    assert info["stock_exact"] is False and "mis-sample" in caplog.text
    saved = json.loads((tmp_path / "s3" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_diffusers_pd"]["stock_exact"] is False
    # the same schedule at N=4 (T % N == 0) is exact with DDIM
    assert save_student(tmp_path / "s4", tiny_unet(), scheduler, 4)["stock_exact"] is True


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    folder = tmp_path / "student"
    scheduler = ProgressiveDistillationScheduler(prediction_type="v_prediction")
    save_student(folder, tiny_unet(seed=1), scheduler, 4, extra_files={"note.txt": b"first"})
    before = sorted(p.name for p in tmp_path.iterdir())

    from diffusers import DDPMPipeline

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_student(folder, tiny_unet(seed=2), scheduler, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left, old student intact
    assert (folder / "note.txt").read_bytes() == b"first"


def test_saved_files_get_ordinary_permissions(tmp_path):
    """Temp names come from mkstemp/mkdtemp (0600/0700); the published student must be readable like any file."""
    import os
    import stat

    folder = tmp_path / "student"
    save_student(folder, tiny_unet(), ProgressiveDistillationScheduler(prediction_type="v_prediction"), 4)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
