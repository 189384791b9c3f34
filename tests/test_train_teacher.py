"""End to end: examples/train_teacher.py (Algorithm 1) on the 8x8 digits with a tiny UNet, on CPU.

Runs of the script are subprocesses (as a user runs it); the argument checks call `main` in-process. The Hub
is the loopback stand-in of tests/hub_standin.py: nothing leaves the machine.
"""

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from conftest import signal_mid_run

from diffusers_pd import ProgressiveDistillationPipeline, checkpoints, cosine_trained_betas, training

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import run_standin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_teacher.py"
TOKEN = "hf_standin_TOKEN_of_the_teacher_test_5d02aa"
TINY = [
    "--dataset_name", "digits", "--resolution", "8", "--block_out_channels", "8", "16", "--layers_per_block", "1",
    "--train_batch_size", "8", "--num_inference_steps", "16", "--num_grid_images", "4",
]
TEACHER_FILES = {
    "README.md", "model_index.json", "samples.png", "training_cost.json", "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
}

# Loads the teacher from a folder and from the Hub stand-in with plain diffusers, and samples both.
LOAD_AND_SAMPLE = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline

out, sources = sys.argv[1], sys.argv[2:]
images, kinds = {}, []
for i, source in enumerate(sources):
    pipe = DiffusionPipeline.from_pretrained(source)
    generator = torch.Generator().manual_seed(0)
    images[f"s{i}"] = pipe(batch_size=4, num_inference_steps=16, generator=generator, output_type="np").images
    kinds.append(f"{type(pipe).__name__}/{type(pipe.scheduler).__name__}")
assert not any(name.startswith("diffusers_pd") for name in sys.modules), "diffusers_pd was imported"
np.savez(out, **images)
print(json.dumps(kinds))
"""


def offline_env(**extra) -> dict:
    """The environment of a script run: offline, no Hub variable inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def hub_env(server, hf_home: Path) -> dict:
    """The environment of a subprocess that talks to the Hub stand-in only."""
    env = offline_env(HF_ENDPOINT=server.url, HF_HOME=str(hf_home), NO_PROXY="127.0.0.1,localhost",
                      no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_HUB_OFFLINE")
    return env


def run(command: list, env: dict) -> subprocess.CompletedProcess:
    """Run a command from the repository root, capturing its output."""
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train(args: list, env: dict = None, launcher: list = None) -> subprocess.CompletedProcess:
    """Run the script (plain python unless `launcher`); assert it succeeded."""
    result = run([*(launcher or [sys.executable]), str(SCRIPT), *args], env or offline_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir: Path) -> list:
    """The logged loss of every update, in order."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    return [row["loss"] for row in rows]


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def files_under(folder: Path) -> set:
    """Relative POSIX paths of every file under `folder`."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def script():
    """The script as a module, to call `main` and its helpers in-process."""
    spec = importlib.util.spec_from_file_location("train_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server():
    with run_standin(token=TOKEN) as standin:
        yield standin


@pytest.fixture(scope="module")
def trained(tmp_path_factory, server):
    """A 40-update run that logs to tensorboard and pushes the teacher to the stand-in (token on the command line)."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    public = [*TINY, "--max_train_steps", "40", "--learning_rate", "2e-3", "--lr_warmup_steps", "5",
              "--save_images_steps", "20", "--report_to", "tensorboard", "--output_dir", str(output_dir),
              "--push_to_hub", "--hub_model_id", "pd-test/teacher"]
    result = train([*public, "--hub_token", TOKEN], hub_env(server, tmp_path_factory.mktemp("hf_home")))
    return output_dir, public, result


def test_teacher_folder_is_a_stock_pipeline_with_card_samples_and_cost(trained):
    output_dir, public, result = trained
    teacher = output_dir / "teacher"
    assert files_under(teacher) == TEACHER_FILES  # no checkpoint, log or temporary file inside

    assert json.loads((teacher / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    assert config["trained_betas"] == cosine_trained_betas(1024)  # the paper's cosine log-SNR table, exactly
    assert (config["num_train_timesteps"], config["prediction_type"]) == (1024, "v_prediction")
    assert (config["timestep_spacing"], config["clip_sample"], config["set_alpha_to_one"]) == ("trailing", False, True)

    unet = UNet2DModel.from_pretrained(teacher / "unet")
    cost = json.loads((teacher / "training_cost.json").read_text())
    assert cost["optimizer_updates"] == 40 and cost["global_batch_size"] == 8 and cost["images_seen"] == 40 * 8
    assert cost["parameters"] == sum(p.numel() for p in unet.parameters()) and cost["train_wall_time_s"] > 0

    card = ModelCard.load(teacher / "README.md")
    assert card.data.library_name == "diffusers" and "teacher" in card.text.lower()
    # the exact command, no token, and no machine path: the output folder (outside the working folder) by its name
    card_words = ["out" if word == str(output_dir) else word for word in public]
    assert shlex.join(["python", "examples/train_teacher.py", *card_words]) in card.text
    for path in teacher.rglob("*"):
        assert not path.is_file() or str(output_dir.parent).encode() not in path.read_bytes(), path
    assert 'from_pretrained("pd-test/teacher")' in card.text
    with Image.open(teacher / "samples.png") as grid:
        assert grid.size == (2 * 64 + 2, 2 * 64 + 2)  # 2 x 2 samples of 8 x 8, upscaled 8x, 2-pixel gutter
    assert (output_dir / "samples" / "step-0000020.png").is_file()
    assert losses(output_dir)[-1] > 0 and "Teacher trained: 40 updates x 8 images" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((output_dir / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "loss" in events.Tags()["scalars"] and "samples" in events.Tags()["images"]


def test_final_teacher_holds_the_ema_weights(trained):
    output_dir, _, _ = trained
    unet = UNet2DModel.from_pretrained(output_dir / "teacher" / "unet")
    ema = torch.load(output_dir / "checkpoint-40" / "ema.pt", weights_only=True)
    for param, shadow in zip(unet.parameters(), ema["shadow_params"], strict=True):
        assert torch.equal(param.detach(), shadow)
    raw = load_file(output_dir / "checkpoint-40" / "unet.safetensors")
    assert max_difference(raw, {k: v.detach() for k, v in unet.state_dict().items()}) > 1e-4  # EMA is not the raw net


def test_teacher_loads_in_plain_diffusers_locally_and_from_the_hub(trained, server, tmp_path):
    output_dir, _, result = trained
    teacher = output_dir / "teacher"
    images_file = tmp_path / "images.npz"
    loaded = run([sys.executable, "-c", LOAD_AND_SAMPLE, str(images_file), str(teacher), "pd-test/teacher"],
                 hub_env(server, tmp_path / "hf_home"))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.splitlines()[-1]) == ["DDPMPipeline/DDIMScheduler"] * 2
    images = np.load(images_file)
    np.testing.assert_array_equal(images["s0"], images["s1"])  # the pushed teacher is the local one

    # stock DDIM on the trailing 16-step grid samples what diffusers_pd's exact DDIM samples
    ours = ProgressiveDistillationPipeline.from_pretrained(teacher)
    reference = ours(batch_size=4, num_inference_steps=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(images["s0"], reference, rtol=0, atol=1e-4)
    assert images["s0"].std() > 0.05  # real images, not a constant

    hub_files = server.repos["pd-test/teacher"].commits[server.repos["pd-test/teacher"].branches["main"]]
    assert set(hub_files) - {".gitattributes"} == TEACHER_FILES
    for text in (result.stdout, result.stderr, loaded.stdout, loaded.stderr):
        assert TOKEN not in text
    for path in output_dir.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_loss_goes_down(trained):
    history = losses(trained[0])
    assert len(history) == 40
    assert np.mean(history[-5:]) < np.mean(history[:5])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # accumulation, flips and dropout: every random draw must be restored or recomputed exactly
    common = [*TINY, "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--random_flip", "--dropout", "0.1",
              "--ema_decay", "0.99", "--learning_rate", "2e-3", "--lr_warmup_steps", "3", "--report_to", "none",
              "--checkpointing_steps", "10", "--num_inference_steps", "4"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    train([*common, "--max_train_steps", "20", "--output_dir", str(straight)],
          launcher=[sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    train([*common, "--max_train_steps", "10", "--output_dir", str(pieces)])
    train([*common, "--max_train_steps", "20", "--output_dir", str(pieces), "--resume_from_checkpoint", "latest"])

    for name in ("checkpoint-20/unet.safetensors", "teacher/unet/diffusion_pytorch_model.safetensors"):
        assert max_difference(load_file(straight / name), load_file(pieces / name)) <= 1e-6, name
    ema_a, ema_b = (torch.load(d / "checkpoint-20" / "ema.pt", weights_only=True) for d in (straight, pieces))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 20
    np.testing.assert_allclose(losses(straight), losses(pieces), rtol=0, atol=1e-6)
    assert json.loads((pieces / "teacher" / "training_cost.json").read_text())["images_seen"] == 20 * 8


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    common = [*TINY, "--max_train_steps", "6", "--random_flip", "--learning_rate", "2e-3", "--report_to", "none",
              "--num_inference_steps", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    train([*common, "--train_batch_size", "8", "--output_dir", str(one)])
    train([*common, "--train_batch_size", "4", "--output_dir", str(two)], env=offline_env(ACCELERATE_USE_CPU="true"),
          launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    # The same images, flips, noise and timesteps: the losses agree up to float reduction order (a wrong
    # slice of the global batch changes them by percents).
    np.testing.assert_allclose(losses(one), losses(two), rtol=1e-4)
    cost = json.loads((two / "teacher" / "training_cost.json").read_text())
    assert (cost["num_processes"], cost["global_batch_size"]) == (2, 8)


def test_processes_that_accelerate_does_not_see_are_refused_before_writing(tmp_path):
    # torchrun on CPU without ACCELERATE_USE_CPU: two separate single-process runs would share one output_dir
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               *TINY, "--max_train_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "out")]
    result = run(command, offline_env())
    assert result.returncode != 0 and "error: 2 processes were launched (WORLD_SIZE=2)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_exits_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run([sys.executable, str(SCRIPT), *TINY, "--output_dir", str(tmp_path)], offline_env())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    assert "--overwrite_output_dir" in result.stderr
    assert files_under(tmp_path) == {"notes.txt"}


def test_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path):
    command = [sys.executable, str(SCRIPT), *TINY, "--max_train_steps", "20", "--learning_rate", "1e30",
               "--max_grad_norm", "0", "--lr_warmup_steps", "0", "--checkpointing_steps", "1", "--report_to", "none",
               "--output_dir", str(tmp_path)]
    result = run(command, offline_env())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "NaN or inf" in result.stderr or "Loss is nan" in result.stderr or "Loss is inf" in result.stderr
    assert not (tmp_path / "teacher").exists()
    for checkpoint in checkpoints.list_checkpoints(tmp_path):
        assert all(torch.isfinite(v).all() for v in load_file(checkpoint / "unet.safetensors").values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image_column", "pixels"], "image column 'pixels' not found"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--resolution", "7"], "--resolution 7 must be divisible by 2"),
        (["--model_config_name_or_path", "unused", "--attention"], "drop --block_out_channels, --layers_per_block, --attention"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--ema_decay", "1.5"], "--ema_decay 1.5 must be in [0, 1)"),
    ],
)
def test_bad_input_exits_with_one_line_and_writes_nothing(script, tmp_path, extra, message):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main([*TINY, "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(output_dir), *extra])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not output_dir.exists()


def test_resume_with_another_model_is_refused_before_writing(script, trained):
    output_dir = trained[0]
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    argv = [*TINY, "--block_out_channels", "8", "8", "--report_to", "none", "--output_dir", str(output_dir),
            "--max_train_steps", "50", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit, match="was made with another model"):
        script.main(argv)
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


def test_training_command_never_holds_the_token_nor_a_machine_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["--dataset_name", "digits", "--hub_token", "secret1", "--hub_token=secret2", "--push_to_hub"]
    assert training.command_line(str(SCRIPT), argv, 1) == "python examples/train_teacher.py --dataset_name digits --push_to_hub"
    assert training.command_line(str(SCRIPT), argv, 4) == (
        "accelerate launch --num_processes 4 examples/train_teacher.py --dataset_name digits --push_to_hub"
    )
    paths = ["--train_data_dir", "/home/someone/data/faces", f"--teacher_dir={ROOT}/runs/t", "--output_dir", "/srv/x y"]
    assert training.command_line(str(SCRIPT), paths, 1, public=True) == (
        "python examples/train_teacher.py --train_data_dir faces --teacher_dir=runs/t --output_dir 'x y'"
    )
    assert training.command_line(str(SCRIPT), paths, 1) == shlex.join(["python", "examples/train_teacher.py", *paths])
    resume = ["--output_dir", "o", "--resume_from_checkpoint", "checkpoint-4", "--resume_from_checkpoint=x", "--hub_token", "t"]
    assert training.resume_command(str(SCRIPT), resume, 1) == (
        "python examples/train_teacher.py --output_dir o --resume_from_checkpoint latest"
    )


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_with_the_same_teacher(tmp_path):
    common = [*TINY, "--max_train_steps", "60", "--learning_rate", "2e-3", "--lr_warmup_steps", "3", "--dropout", "0.1",
              "--checkpointing_steps", "1000", "--save_images_steps", "1000", "--report_to", "none"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    status, text = signal_mid_run([sys.executable, SCRIPT, *common, "--output_dir", stopped], offline_env(),
                                  tmp_path / "stopped.log", r"teacher: [^\r\n]*\| *[1-9]\d*/60", signal.SIGTERM, cwd=ROOT)
    assert status == 143, text[-3000:]  # 128 + SIGTERM
    found = re.findall(r"Stopped by SIGTERM at update (\d+): saved (\S+)\. Resume with: (.+)$", text, flags=re.M)
    assert len(found) == 1, text[-3000:]
    update, checkpoint, command = int(found[0][0]), Path(found[0][1]), found[0][2]
    assert checkpoint == stopped / f"checkpoint-{update}" and 0 < update < 60
    assert [p.name for p in checkpoints.list_checkpoints(stopped)] == [checkpoint.name]
    assert not (stopped / "teacher").exists()
    assert command == shlex.join(["python", "examples/train_teacher.py", *common, "--output_dir", str(stopped),
                                  "--resume_from_checkpoint", "latest"])
    train(shlex.split(command)[2:])  # as printed (python -> this interpreter)
    train([*common, "--output_dir", str(straight)])
    name = "teacher/unet/diffusion_pytorch_model.safetensors"
    assert max_difference(load_file(straight / name), load_file(stopped / name)) <= 1e-6
    np.testing.assert_allclose(losses(straight), losses(stopped), rtol=0, atol=1e-6)


def test_linear_warmup_lr_rises_linearly_then_stays_constant():
    lrs = [training.linear_warmup_lr(step, 4, 1e-3) for step in range(8)]
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert training.linear_warmup_lr(0, 0, 3e-4) == 3e-4  # no warmup: constant from the first update


def test_hub_ddpm_shaped_eps_teacher_is_a_stock_ddpm_config_and_learns_eps(tmp_path):
    """--prediction_type epsilon --beta_schedule linear --num_train_timesteps 1000: the scheduler folder is what
    google/ddpm-* checkpoints ship (a DDPMScheduler with the stock defaults), and the net learned the eps-MSE."""
    from diffusers import DDPMScheduler

    output_dir = tmp_path / "out"
    result = train([*TINY, "--max_train_steps", "30", "--learning_rate", "2e-3", "--lr_warmup_steps", "1",
                    "--save_images_steps", "30", "--report_to", "none", "--ema_decay", "0", "--output_dir", str(output_dir),
                    "--prediction_type", "epsilon", "--beta_schedule", "linear", "--num_train_timesteps", "1000",
                    "--loss_weighting", "snr"], offline_env())
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = output_dir / "teacher"
    assert json.loads((teacher / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDPMScheduler"]
    config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    stock = {k: v for k, v in DDPMScheduler(num_train_timesteps=1000).config.items() if not k.startswith("_")}
    assert {k: config[k] for k in stock} == stock  # every key as a stock DDPMScheduler(num_train_timesteps=1000) has it
    assert config["_diffusers_pd"]["schedule"] == "linear" and "linear" in (teacher / "README.md").read_text()

    # the logged loss is the eps-MSE (snr weighting), ~1 for the untrained net, and it falls
    history = losses(output_dir)
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history


def test_teacher_schedules_are_the_library_beta_schedules(script):
    """--beta_schedule's choices, spelled out for a --help without heavy imports, are the library's beta schedules."""
    from diffusers_pd.schedules import BETA_SCHEDULES

    assert script.TEACHER_SCHEDULES == ("cosine_logsnr", *BETA_SCHEDULES[:3])


def test_card_names_beta_range_only_for_schedules_it_defines(script):
    """The card's schedule sentence prints beta_start / beta_end for linear and scaled_linear only: a squaredcos_cap_v2
    (or cosine log-SNR) schedule ignores them."""
    import argparse

    for schedule, shows in (("linear", True), ("scaled_linear", True), ("squaredcos_cap_v2", False), ("cosine_logsnr", False)):
        args = argparse.Namespace(beta_schedule=schedule, beta_start=0.000123, beta_end=0.0456, num_train_timesteps=1000)
        text = script.schedule_text(args)
        assert ("0.000123" in text and "0.0456" in text) == shows, (schedule, text)
        assert ("squaredcos_cap_v2" in text) == (schedule == "squaredcos_cap_v2")
