"""ProgressiveDistillationPipeline.save_pretrained / push_to_hub write the stock folder that plain diffusers loads
(checked in a subprocess that never imports diffusers_pd) and that samples what our pipeline samples."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import tiny_unet
from diffusers import DDPMScheduler
from hub_standin import run_standin
from test_export import reference_images, sample_in_plain_diffusers

from diffusers_pd import ProgressiveDistillationPipeline, ProgressiveDistillationScheduler, save_student


def saved_student_pipeline(folder, schedule, steps):
    """Our pipeline loaded from a `save_student` folder: its scheduler holds the student's metadata."""
    save_student(folder, tiny_unet(seed=steps), ProgressiveDistillationScheduler(**schedule), steps,
                 teacher="tests/teacher", teacher_prediction_type="epsilon", stage=3)
    return ProgressiveDistillationPipeline.from_pretrained(folder)


def assert_stock_model_index(folder):
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "DDPMPipeline"
    assert all(v[0] == "diffusers" for k, v in model_index.items() if not k.startswith("_"))


@pytest.mark.parametrize(
    "schedule,steps,stock_name",
    [(dict(prediction_type="v_prediction"), 4, "DDIMScheduler"), (dict(prediction_type="epsilon"), 3, "DPMSolverMultistepScheduler")],
    ids=["v-4-ddim", "eps-3-dpm"],
)
def test_student_save_pretrained_writes_the_save_student_folder(schedule, steps, stock_name, tmp_path):
    pipe = saved_student_pipeline(tmp_path / "original", schedule, steps)
    folder = tmp_path / "resaved"
    (folder / "checkpoint-100").mkdir(parents=True)  # a training run's own files stay, as with diffusers
    (folder / "checkpoint-100" / "state.bin").write_bytes(b"keep me")
    (folder / "unet").mkdir()
    (folder / "unet" / "stale.fp16.safetensors").write_bytes(b"old weights")  # a replaced component goes whole

    pipe.save_pretrained(folder)

    assert_stock_model_index(folder)
    assert (folder / "checkpoint-100" / "state.bin").read_bytes() == b"keep me"
    assert not (folder / "unet" / "stale.fp16.safetensors").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    original = json.loads((tmp_path / "original" / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
    resaved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
    assert resaved == original and resaved["stage"] == 3 and resaved["stock_scheduler"] == stock_name
    assert f"{steps}-step student of tests/teacher" in (folder / "README.md").read_text()

    images, report = sample_in_plain_diffusers(folder, steps, tmp_path)
    assert report["pipeline"] == "DDPMPipeline" and report["scheduler"] == stock_name
    expected = reference_images(pipe.unet, ProgressiveDistillationScheduler(**schedule), steps)
    assert images.std() > 0.05
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


def test_pipeline_without_step_count_saves_a_folder_exact_at_every_n(tmp_path):
    """A teacher in our pipeline (no step count): its user picks N, so the stock scheduler must be exact at any N."""
    unet = tiny_unet(seed=11)
    pipe = ProgressiveDistillationPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"))
    folder = tmp_path / "teacher"
    pipe.save_pretrained(folder)
    assert_stock_model_index(folder)
    metadata = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
    assert metadata["stock_scheduler"] == "DPMSolverMultistepScheduler" and metadata["stock_exact"] is True
    images, _ = sample_in_plain_diffusers(folder, 3, tmp_path)  # N = 3 does not divide T = 1000: DDIM would miss
    expected = reference_images(unet, ProgressiveDistillationScheduler(prediction_type="v_prediction"), 3)
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


def test_zero_terminal_snr_pipeline_without_step_count_is_flagged(tmp_path, caplog):
    scheduler = ProgressiveDistillationScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 rescale_betas_zero_snr=True, prediction_type="v_prediction")
    with caplog.at_level(logging.WARNING, logger="diffusers_pd.export"):
        ProgressiveDistillationPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path / "zsnr")
    metadata = json.loads((tmp_path / "zsnr" / "scheduler" / "scheduler_config.json").read_text())["_diffusers_pd"]
    assert metadata["stock_scheduler"] == "DDIMScheduler" and metadata["stock_exact"] is False
    assert "exact only for N dividing num_train_timesteps" in caplog.text


PUSH = textwrap.dedent(
    """
    import sys
    from diffusers_pd import ProgressiveDistillationPipeline
    pipe = ProgressiveDistillationPipeline.from_pretrained(sys.argv[1])
    print(pipe.push_to_hub("user/pd-student"))
    pipe.save_pretrained(sys.argv[2], push_to_hub=True, repo_id="user/pd-student-2")
    """
)


def test_push_to_hub_uploads_the_stock_folder_with_our_card(tmp_path):
    saved_student_pipeline(tmp_path / "student", dict(prediction_type="v_prediction"), 4)
    with run_standin(token="hf_test") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_test", HF_HUB_DISABLE_TELEMETRY="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        result = subprocess.run([sys.executable, "-c", PUSH, str(tmp_path / "student"), str(tmp_path / "local")],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        for repo_id in ("user/pd-student", "user/pd-student-2"):
            repo = server.repos[repo_id]
            files = repo.commits[repo.branches["main"]]
            assert json.loads(files["model_index.json"])["_class_name"] == "DDPMPipeline"
            metadata = json.loads(files["scheduler/scheduler_config.json"])["_diffusers_pd"]
            assert metadata["num_inference_steps"] == 4 and metadata["stage"] == 3
            assert f'DiffusionPipeline.from_pretrained("{repo_id}")' in files["README.md"].decode()
