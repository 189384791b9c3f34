"""load_teacher: every supported layout loads through from_pretrained; every wrong one fails with the fix named."""

import pytest
import torch
from conftest import save_tiny_teacher, tiny_unet
from diffusers import DDIMScheduler, UNet2DConditionModel

from diffusers_pd.loading import load_teacher


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pipeline_folder(tmp_path):
    save_tiny_teacher(tmp_path / "pipe", seed=3, prediction_type="v_prediction")
    unet, config = load_teacher(str(tmp_path / "pipe"))
    assert same_weights(unet, tiny_unet(3)) and config["prediction_type"] == "v_prediction"


def test_bare_unet_folder_with_scheduler_beside_or_given(tmp_path):
    tiny_unet(4).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="--teacher_scheduler"):
        load_teacher(str(tmp_path / "unet"))
    DDIMScheduler(num_train_timesteps=500).save_pretrained(tmp_path / "sched")
    unet, config = load_teacher(str(tmp_path / "unet"), scheduler=str(tmp_path / "sched"))
    assert same_weights(unet, tiny_unet(4)) and config["num_train_timesteps"] == 500
    save_tiny_teacher(tmp_path / "pipe")  # a pipeline folder also serves as --teacher_scheduler
    assert load_teacher(str(tmp_path / "unet"), scheduler=str(tmp_path / "pipe"))[1]["num_train_timesteps"] == 1000
    DDIMScheduler(num_train_timesteps=250).save_pretrained(tmp_path / "unet")  # scheduler_config.json beside it
    assert load_teacher(str(tmp_path / "unet"))[1]["num_train_timesteps"] == 250


def test_wrong_teachers_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="nowhere: no such folder, and not a Hub id either: pass a Hub id or folder"):
        load_teacher(str(tmp_path / "nowhere"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_teacher(str(tmp_path / "file.bin"))
    UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path / "cond")
    with pytest.raises(ValueError, match="UNet2DConditionModel, not a UNet2DModel.*Stable Diffusion"):
        load_teacher(str(tmp_path / "cond"))


UNREACHABLE = """
from diffusers_pd.loading import load_teacher
try:
    load_teacher("someone/a-teacher")
except ValueError as error:
    print(error)
"""


def test_an_unreachable_hub_is_named_at_once_with_the_offline_alternative(tmp_path):
    """A closed port as HF_ENDPOINT: one look fails, and the error is about the network, not a missing teacher."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, capture_output=True, text=True, timeout=300)
    message = result.stdout.splitlines()[0]
    assert message.startswith("--teacher someone/a-teacher: no such folder, and the Hub at http://127.0.0.1:9 cannot be "
                              "reached"), result.stdout + result.stderr[-2000:]
    assert "set HF_HUB_OFFLINE=1 to use the local Hub cache" in message
    assert "Retrying" not in result.stderr  # no minute of retries before the answer


def test_public_name_never_holds_a_machine_path(tmp_path):
    from diffusers_pd.loading import public_name

    save_tiny_teacher(tmp_path / "my-teacher")
    assert public_name(str(tmp_path / "my-teacher")) == "my-teacher"
    assert public_name("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"
    unet, _ = load_teacher(str(tmp_path / "my-teacher"))
    assert unet.config._name_or_path == "my-teacher"  # what every student saved from it records
