"""Robustness of examples/train_distill.py end to end: SIGKILL + exact resume, 2 processes = 1 process, Hub push
during training (and a failed one), bad input refused before anything is written, NaN loss stops cleanly.

Every run is the real script in a subprocess on a tiny eps-prediction T=1000 teacher (tests/conftest.py), the
offline `digits` data set at 8x8, a few updates per stage, one thread per process. The real Hub is never
contacted: HF_HUB_OFFLINE=1, and HF_ENDPOINT is a closed loopback port, or the stand-in of tests/hub_standin.py.
"""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_teacher, signal_mid_run, tiny_unet
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import run_standin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distill.py"
TOKEN = "hf_pd_robustness_TOKEN_never_written_3b9e51"
TINY = ["--dataset_name", "digits", "--report_to", "none", "--num_grid_images", "1", "--seed", "3"]
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"

LOAD_AND_SAMPLE = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline

images = {}
for key, source, revision, steps in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(source, revision=revision)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images[key] = pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images
np.savez(sys.argv[2], **images)
"""


# ----------------------------------------------------------------------------------------------- helpers
def script_env(hf_home: Path, hub_url: str | None = None, **extra) -> dict:
    """A subprocess environment with no inherited HF_* variable, one thread, and no way to the real Hub."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if hub_url is None:
        env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # a closed port: nothing is ever reached
    else:
        env["HF_ENDPOINT"] = hub_url
    env.update(extra)
    return env


def distill_command(*args) -> list:
    return [sys.executable, str(SCRIPT), *map(str, args)]


def run(command: list, env: dict, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def unet_weights(folder: Path) -> dict:
    return load_file(folder / UNET_WEIGHTS)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def checkpoint_folders(output_dir: Path) -> list:
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def files_of(folder: Path, skip=(".hub_push.json",)) -> dict:
    """{relative path: bytes} of every file under folder, except `skip` names."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def snapshot(folder: Path) -> dict:
    """{relative path: (mtime_ns, bytes or None for a folder)} of everything under folder."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """Teacher folders: the tiny eps T=1000 pipeline, a text-conditioned pipeline, a 4-channel UNet2DModel pipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("teachers")
    folders = {"eps": save_tiny_teacher(root / "eps")}
    # A Stable-Diffusion-like folder: model_index.json + unet/ (a UNet2DConditionModel) + scheduler/.
    torch.manual_seed(0)
    conditional = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2,
    )
    conditional.save_pretrained(root / "conditional" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "conditional" / "scheduler")
    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
                   "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (root / "conditional" / "model_index.json").write_text(json.dumps(model_index))
    folders["conditional"] = root / "conditional"
    four = DDPMPipeline(unet=tiny_unet(0, in_channels=4, out_channels=4), scheduler=DDPMScheduler(num_train_timesteps=1000))
    four.save_pretrained(root / "four_channels")
    folders["four_channels"] = root / "four_channels"
    return folders


# ----------------------------------------------------------------------------------------------- 1. SIGKILL + resume
def poll_until(process: subprocess.Popen, output_dir: Path, done, interval: float = 0.002) -> None:
    """Poll output_dir until done() is true, checking on every look that a visible checkpoint-* is complete and,
    once one has appeared, that at least one complete checkpoint is always there; fail if the run ends first."""
    seen_one = False
    while not done():
        folders = checkpoint_folders(output_dir) if output_dir.is_dir() else []
        for folder in folders:  # renamed away between the listing and this look is fine; half there is not
            assert (folder / "progress.json").is_file() or not folder.exists(), f"incomplete {folder}"
        seen_one = seen_one or bool(folders)
        assert folders or not seen_one, "no complete checkpoint left while training"
        assert process.poll() is None, "the run ended before the planned kill: give it more updates"
        time.sleep(interval)


def killed_then_resumed(common: list, resumable: list, straight_dir: Path, killed_dir: Path, env: dict, log: Path,
                        ready, delay: float = 0.0) -> None:
    """Run `resumable` until `ready()` (polling its output dir) and SIGKILL it `delay` s later; rerun it with
    --resume_from_checkpoint latest to the end; run `common` uninterrupted into `straight_dir`. Both must succeed."""
    with open(log, "w") as handle:
        process = subprocess.Popen([str(c) for c in distill_command(*resumable)], env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        poll_until(process, killed_dir, ready)
        time.sleep(delay)
        assert process.poll() is None, "the run ended before the planned kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (killed_dir / "summary.json").exists()
    resumed = run(distill_command(*resumable, "--resume_from_checkpoint", "latest"), env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    straight = run(distill_command(*common, "--output_dir", straight_dir), env)
    assert straight.returncode == 0, straight.stderr[-4000:]


def one_and_two_processes(common: list, one: Path, two: Path, batch_per_process: int, env: dict) -> subprocess.CompletedProcess:
    """Run `common` with 2 CPU processes (torchrun, gloo) into `two` and with 1 process at the same global batch into
    `one`; both must succeed. Returns the 2-process run."""
    env = {**env, "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = run([*torchrun, str(SCRIPT), *map(str, common), "--train_batch_size", batch_per_process, "--output_dir", two],
                {**env, "ACCELERATE_USE_CPU": "1"})
    assert multi.returncode == 0, multi.stderr[-4000:]
    single = run(distill_command(*common, "--train_batch_size", 2 * batch_per_process, "--output_dir", one), env)
    assert single.returncode == 0, single.stderr[-4000:]
    return multi


def assert_same_students(one: Path, two: Path, start: dict, folders) -> None:
    """The students of a 1- and a 2-process run agree to 1e-6 absolute and 1e-4 of their change from `start` (a layer
    `start` lacks changed from 0); see the progressive-distillation 2-process test for why these bounds."""
    for folder in folders:
        a, b = unet_weights(one / folder), unet_weights(two / folder)
        difference = torch.cat([(a[k] - b[k]).flatten() for k in a])
        change = torch.cat([(a[k] - start[k] if k in start else a[k]).flatten() for k in a])
        assert difference.abs().max() <= 1e-6 and difference.norm() <= 1e-4 * change.norm(), folder


def assert_refused(result: subprocess.CompletedProcess, message: str, out: Path) -> None:
    """A run stopped with exactly one error line matching `message`, no traceback, and nothing written to `out`."""
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert result.returncode != 0 and len(errors) == 1 and re.search(message, errors[0]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not out.exists()


def latest_step(output_dir: Path) -> int:
    """Global step of the newest checkpoint-* folder (0 if none)."""
    folders = checkpoint_folders(output_dir)
    return int(folders[-1].name.split("-")[1]) if folders else 0


def test_sigkilled_run_resumes_to_the_same_students(teachers, tmp_path):
    # eps teacher -> v students with a conversion stage: stages 8 (eps -> v), 8 -> 4, 4 -> 2, 6 updates each
    common = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--iterations_per_stage", 6,
              "--train_batch_size", 4, "--ema_decay", 0.9, "--prediction_type", "v_prediction", "--conversion_stage"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    env = script_env(tmp_path / "hf_home")
    # B checkpoints at updates 2, 4, 6 (a stage boundary), ..., 16 of 18, keeping only the newest.
    resumable = [*common, "--output_dir", out_b, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1]
    rng = random.Random()
    kill_after, delay = rng.choice([1, 2, 3]), rng.uniform(0.0, 0.1)
    print(f"first kill {delay:.2f} s after checkpoint number {kill_after} appears")
    started = []

    def start(*args):
        with open(tmp_path / f"run-{len(started)}.log", "w") as log:  # a file, not a pipe nobody reads
            started.append(subprocess.Popen(distill_command(*args), env=env, stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    def sigkill(process):
        assert process.poll() is None, "the run ended before the planned kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    try:
        run_a = start(*common, "--output_dir", out_a)  # uninterrupted, alongside B's first attempt
        # B, attempt 1: SIGKILL at a random moment after its first, second or third checkpoint.
        seen = set()

        def enough_checkpoints():
            seen.update(p.name for p in checkpoint_folders(out_b) if (p / "progress.json").is_file())
            return len(seen) >= kill_after

        process = start(*resumable)
        poll_until(process, out_b, enough_checkpoints)
        time.sleep(delay)
        sigkill(process)
        assert not (out_b / "summary.json").exists()
        latest = latest_step(out_b)
        assert latest > 0

        # B, attempt 2: resume, and SIGKILL again the moment a checkpoint is being written (or, failing that, has been).
        process = start(*resumable, "--resume_from_checkpoint", "latest")
        poll_until(process, out_b, lambda: any(out_b.glob(".checkpoint-*.tmp")) or latest_step(out_b) > latest, 0.0005)
        sigkill(process)
        print(f"second kill with {sorted(p.name for p in out_b.iterdir())}")
        assert not (out_b / "summary.json").exists()

        # B, attempt 3: resume to the end.
        final = run(distill_command(*resumable, "--resume_from_checkpoint", "latest"), env)
        assert final.returncode == 0, final.stderr[-4000:]
        assert run_a.wait(timeout=300) == 0, (tmp_path / "run-0.log").read_text()[-4000:]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()

    teacher = load_file(teachers["eps"] / UNET_WEIGHTS)
    for steps in (4, 2):
        a, b = unet_weights(out_a / f"student-{steps}steps"), unet_weights(out_b / f"student-{steps}steps")
        assert max_abs_diff(a, b) <= 1e-6, steps
        assert max_abs_diff(a, teacher) > 1e-4  # the students really trained: equality is not vacuous
    summary = json.loads((out_b / "summary.json").read_text())
    assert [(row["steps"], row["prediction_type"]) for row in summary] == [(8, "v_prediction"), (4, "v_prediction"), (2, "v_prediction")]
    assert summary[0]["stage"] == "8: epsilon -> v_prediction"
    # --checkpoints_total_limit 1: only the newest checkpoint is left, the run's end (update 18 of 18): its last
    # student as the teacher of any stage a smaller --end_steps adds
    assert [p.name for p in checkpoint_folders(out_b)] == ["checkpoint-18"]
    progress = json.loads((out_b / "checkpoint-18" / "progress.json").read_text())
    assert (progress["global_step"], progress["stage"], progress["step"]) == (18, 3, 0)
    assert {p.name for p in (out_b / "checkpoint-18").iterdir()} >= {"progress.json", "teacher.safetensors"}
    assert max_abs_diff(load_file(out_b / "checkpoint-18" / "teacher.safetensors"), unet_weights(out_b / "student-2steps")) == 0


# ----------------------------------------------------------------------------------------------- 2. two processes
def test_two_cpu_processes_train_the_same_students_as_one_with_the_global_batch(teachers, tmp_path):
    # Adam's first updates are ~ lr * sign(g): float noise in a near-zero gradient component (a different reduction
    # order: two half-batch means averaged by gloo vs one mean) then moves that weight by up to 2 lr. Measured with
    # the default eps=1e-8, even one process with 1 vs 2 threads differs by ~1% of the total weight change. So this
    # test uses eps=1 (updates linear in g, lr raised to match): then 2 processes vs 1 differ by ~1e-7 absolute
    # (~1e-6 of the total change), the same as 1 vs 2 threads, while a wrong global batch differs by ~1e-2 (~70%).
    common = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--iterations_per_stage", 5,
              "--checkpointing_steps", 3, "--ema_decay", 0.9, "--adam_epsilon", 1, "--learning_rate", 0.1,
              "--prediction_type", "v_prediction", "--conversion_stage"]  # across a conversion stage too
    one, two = tmp_path / "one", tmp_path / "two"
    multi = one_and_two_processes(common, one, two, 4, script_env(tmp_path / "hf_home"))
    assert_same_students(one, two, load_file(teachers["eps"] / UNET_WEIGHTS), ["student-4steps", "student-2steps"])
    # Only the main process writes: the same files as one process, plus rank 1's RNG state in each checkpoint.
    expected = set(files_of(one)) | {f"{p.name}/random_states_1.pt" for p in checkpoint_folders(one)}
    assert set(files_of(two)) == expected
    assert multi.stdout.count("Progressive distillation of") == 1


def test_torchrun_on_cpu_without_accelerate_cpu_refuses_to_start(teachers, tmp_path):
    """Plain torchrun on a CPU machine: accelerate sees 1 process in each, which would race on one output_dir."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run([*torchrun, str(SCRIPT), *TINY, "--teacher", str(teachers["eps"]), "--start_steps", "8",
                  "--end_steps", "2", "--iterations_per_stage", "2", "--output_dir", str(out)],
                 script_env(tmp_path / "hf_home", GLOO_SOCKET_IFNAME="lo"))
    assert result.returncode != 0
    assert "2 processes were launched (WORLD_SIZE=2) but accelerate runs 1" in result.stderr
    assert "ACCELERATE_USE_CPU=1" in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- 3. Hub push
def test_students_pushed_during_training_load_back_and_a_failed_push_is_retried(teachers, tmp_path):
    out, hf_home, repo_id = tmp_path / "out", tmp_path / "hf_home", "pd-user/students"
    outputs = []
    with run_standin(token=TOKEN) as server:
        env = script_env(hf_home, hub_url=server.url, HF_TOKEN=TOKEN)
        # The 8-step student's branch commit fails at its own stage and at the 4-step stage's catch-up push, the
        # 4-step one's at its own stage and at the 2-step stage's catch-up: every stage tries every pending student.
        server.fail_commits(count=2, repo_id=repo_id, revision="student-8steps")
        server.fail_commits(count=2, repo_id=repo_id, revision="student-4steps")
        train = run(distill_command(*TINY, "--report_to", "tensorboard", "--teacher", teachers["eps"], "--start_steps", 16,
                                    "--end_steps", 2, "--iterations_per_stage", 2, "--train_batch_size", 4,
                                    "--checkpointing_steps", 1, "--output_dir", out, "--push_to_hub",
                                    "--hub_model_id", repo_id, "--hub_token", TOKEN), env)
        outputs += [train.stdout, train.stderr]
        assert train.returncode == 0, train.stderr[-4000:]  # every stage finished despite the failed pushes
        retry = f"python -m diffusers_pd.hub push {out} --hub_model_id {repo_id}"
        failed = {n: rf"Could not push {re.escape(str(out / f'student-{n}steps'))} to Hub repo {repo_id} "
                     rf"\(branch student-{n}steps\): .*507.*The student is safe on disk; retry with: " + re.escape(retry)
                  for n in (8, 4)}
        assert len(re.findall(failed[8], train.stderr)) == len(re.findall(failed[4], train.stderr)) == 2
        assert re.search(failed[8] + r"\n" + failed[4], train.stderr)  # stage 2 names 8 (catch-up), then its own 4
        assert f"1 push(es) failed; the students are safe locally. Retry without retraining:\n  {retry}" in train.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert [(row["steps"], row["hub"]) for row in summary] == [(8, "pushed"), (4, "push failed"), (2, "pushed")]
        repo = server.repos[repo_id]
        assert repo.commits[repo.branches["main"]] == repo.commits[repo.branches["student-2steps"]]  # the newest
        students = {n: out / f"student-{n}steps" for n in (8, 4, 2)}
        before_retry = {n: files_of(folder) for n, folder in students.items()}

        cli = run([sys.executable, "-m", "diffusers_pd.hub", "push", out, "--hub_model_id", repo_id], env)
        outputs += [cli.stdout, cli.stderr]
        assert cli.returncode == 0, cli.stderr[-4000:]
        assert "Pushed 1 student(s)" in cli.stderr
        assert {n: files_of(folder) for n, folder in students.items()} == before_retry  # local students intact
        for n, folder in students.items():
            branch = dict(repo.commits[repo.branches[f"student-{n}steps"]])
            branch.pop(".gitattributes")
            assert branch == before_retry[n]  # exactly the local folder, byte for byte
            assert {"model_index.json", "README.md", UNET_WEIGHTS.as_posix()} <= set(branch)
        assert repo.commits[repo.branches["main"]] == repo.commits[repo.branches["student-2steps"]]  # main: newest

        # Every student loads back from its branch (main = the newest) and samples what the local folder samples.
        plan = [[f"hub-{n}", repo_id, f"student-{n}steps", n] for n in (8, 4, 2)] + [["hub-main", repo_id, None, 2]]
        plan += [[f"local-{n}", str(folder), None, n] for n, folder in students.items()]
        images_file = tmp_path / "images.npz"
        load = run([sys.executable, "-c", LOAD_AND_SAMPLE, json.dumps(plan), str(images_file)], env)
        outputs += [load.stdout, load.stderr]
        assert load.returncode == 0, load.stderr[-4000:]
    images = np.load(images_file)
    for n in (8, 4, 2):
        np.testing.assert_allclose(images[f"hub-{n}"], images[f"local-{n}"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(images["hub-main"], images["local-2"], rtol=0, atol=1e-6)
    assert np.abs(images["local-4"] - images["local-2"]).max() > 1e-3  # loading the wrong branch could not pass

    assert any((out / "logs").rglob("events.out.tfevents.*"))
    for text in outputs:
        assert TOKEN not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------------------------- 4. bad input
BAD_INPUTS = {
    "missing_teacher": (["--teacher", "{tmp}/no_such_teacher"],
                        r"--teacher .*no_such_teacher: no such folder, and not a Hub id either: pass a Hub id or folder"),
    # without data as well: the teacher comes first (it decides which data fits)
    "missing_teacher_no_data": (["--teacher", "{tmp}/no_such_teacher"], r"--teacher .*no_such_teacher: no such folder"),
    "teacher_not_in_offline_cache": (["--teacher", "someone/not-cached"],
                                     r"Cannot read a teacher at 'someone/not-cached' \(missing or unreadable; "
                                     r"HF_HUB_OFFLINE is set, so only the local Hub cache was read\)"),
    "end_steps_zero": (["--end_steps", "0"], r"--end_steps 0 is not a step count: pass 1 or more"),
    "push_offline": (["--push_to_hub", "--hub_model_id", "you/name"],
                     r"--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub"),
    "conditional_unet": (["--teacher", "{conditional}"],
                         r"unet is a UNet2DConditionModel, not a UNet2DModel: .*unconditional UNet2DModel teachers"),
    "no_image_column": (["--image_column", "nope"],
                        r"image column 'nope' not found; columns are \['image', 'label'\]: pass one with `--image_column`"),
    "four_channels": (["--teacher", "{four_channels}"], r"the UNet has 4 input channels: .*only 1- or 3-channel UNets"),
    "resolution": (["--resolution", "16"], r"--resolution 16 differs from the teacher's sample_size 8: drop it or pass 8"),
    "not_a_halving_chain": (["--start_steps", "12", "--end_steps", "4"],
                            r"--start_steps 12 must be a power-of-two multiple \(>= 2x\) of --end_steps 4"),
    "more_steps_than_timesteps": (["--start_steps", "1024", "--end_steps", "4"],
                                  r"needs 2 x 1024 distinct timesteps .*num_train_timesteps=1000; use --start_steps 500 or less"),
    "budget_zero": (["--iterations_per_stage", "2", "0"], r"--iterations_per_stage 2 0: each stage needs at least 1 update"),
    "more_budgets_than_stages": (["--iterations_per_stage", "2", "2", "2"],
                                 r"--iterations_per_stage gives 3 budgets for 2 stages: pass at most 2 \(the last repeats"),
    "non_empty_output_dir": ([], r"--output_dir .* exists and is not empty: pass --resume_from_checkpoint latest .*"
                                 r"--overwrite_output_dir"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_once_clearly_before_writing_anything(case, teachers, tmp_path):
    extra, message = BAD_INPUTS[case]
    places = {"tmp": tmp_path, **teachers}
    extra = [arg.format(**places) for arg in extra]
    out = tmp_path / "out"
    if case == "non_empty_output_dir":
        (out / "student-4steps").mkdir(parents=True)
        (out / "student-4steps" / "model_index.json").write_text("{}")
        (out / "notes.txt").write_text("an earlier run")
    before = snapshot(out) if out.exists() else None
    args = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--iterations_per_stage", 2,
            "--train_batch_size", 4, "--output_dir", out, *extra]  # a later --teacher overrides the first
    if case == "missing_teacher_no_data":
        args = args[2:]  # TINY starts with --dataset_name digits
    result = run(distill_command(*args), script_env(tmp_path / "hf_home"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "stage 1/" not in result.stderr + result.stdout
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------- 5. NaN loss
def test_non_finite_loss_stops_with_the_update_and_keeps_the_last_checkpoint(teachers, tmp_path):
    # lr 1e12 without clipping: Adam's first update moves every weight by ~1e12, so the next forward overflows.
    out = tmp_path / "out"
    result = run(distill_command(*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2,
                                 "--iterations_per_stage", 4, "--train_batch_size", 4, "--learning_rate", 1e12,
                                 "--max_grad_norm", 0, "--checkpointing_steps", 1, "--checkpoints_total_limit", 1,
                                 "--output_dir", out), script_env(tmp_path / "hf_home"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    match = re.search(r"Loss is (nan|inf|-inf) at update (\d+): stopped, nothing written after it\. "
                      r"Checkpoints \(all with finite weights\): (checkpoint-\d+) in (.+?)\. .*lower --learning_rate", errors[0])
    assert match, errors[0]
    update, checkpoint = int(match[2]), Path(match[4]) / match[3]
    assert update >= 2  # the blow-up came after a checkpoint existed
    assert checkpoint == out / f"checkpoint-{update - 1}"
    assert checkpoint_folders(out) == [checkpoint]  # nothing written at or after the failing update
    assert json.loads((checkpoint / "progress.json").read_text())["global_step"] == update - 1
    assert {"progress.json", "student.safetensors", "teacher.safetensors", "optimizer.pt", "random_states_0.pt"} <= {
        p.name for p in checkpoint.iterdir()}
    for name in ("student", "teacher"):
        assert all(torch.isfinite(w).all() for w in load_file(checkpoint / f"{name}.safetensors").values())
    assert not list(out.glob("student-*")) and not (out / "summary.json").exists()


def test_resume_sweeps_temp_folders_of_a_killed_run(tmp_path):
    """Hidden temp folders left by a kill (`.checkpoint-N.tmp`, `.X.deleting`, `.student-*.tmp-*`) are removed."""
    from diffusers_pd.checkpoints import sweep_leftovers

    for name in (".checkpoint-4.tmp", ".checkpoint-2.deleting", ".student-4steps.tmp-abc", "checkpoint-6", ".keep"):
        (tmp_path / name).mkdir()
    sweep_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "checkpoint-6"]


def test_a_checkpoint_with_other_optimizer_groups_is_refused_naming_the_flag(tmp_path):
    """A guided checkpoint from before the embedding's lr scale (one group) does not silently load into two groups;
    with --guidance_embedding_lr_scale 1 (one group again) it loads."""
    from types import SimpleNamespace

    from diffusers_pd import training
    from diffusers_pd.checkpoints import load_checkpoint

    model = torch.nn.Linear(3, 2)
    args = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8)
    old = training.make_optimizer(training.param_groups(model.named_parameters()), args)
    model(torch.ones(1, 3)).sum().backward()
    old.step()
    torch.save(old.state_dict(), tmp_path / "optimizer.pt")
    accelerator = SimpleNamespace(scaler=None, process_index=0, unwrap_model=lambda module: module)
    two_groups = training.make_optimizer(training.param_groups(model.named_parameters(), {"bias": 10.0}), args)
    with pytest.raises(ValueError, match="--guidance_embedding_lr_scale 1"):
        load_checkpoint(accelerator, tmp_path, {}, two_groups)
    one_group = training.make_optimizer(training.param_groups(model.named_parameters(), {"bias": 1.0}), args)
    load_checkpoint(accelerator, tmp_path, {}, one_group)
    assert torch.equal(one_group.state_dict()["state"][0]["exp_avg"], old.state_dict()["state"][0]["exp_avg"])


def test_resuming_with_other_per_stage_budgets_is_refused(teachers, tmp_path):
    """The data a stage draws depends on the earlier stages' budgets: a resume with others would continue another run."""
    out = tmp_path / "out"
    common = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--train_batch_size", 4,
              "--num_validation_samples", 4, "--checkpointing_steps", 2, "--output_dir", out]
    first = run(distill_command(*common, "--iterations_per_stage", 3, 2), script_env(tmp_path / "hf_home"))
    assert first.returncode == 0, first.stderr[-3000:]
    progress = json.loads((checkpoint_folders(out)[-1] / "progress.json").read_text())
    assert progress["budgets"] == [3, 2]
    before = snapshot(out)
    again = run(distill_command(*common, "--iterations_per_stage", 3, "--resume_from_checkpoint", "latest"),
                script_env(tmp_path / "hf_home"))
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].endswith("was made with [3, 2] iterations per stage, these arguments "
                                                          "give [3, 3]: pass the run's --iterations_per_stage / "
                                                          "--num_trajectories again.")
    assert snapshot(out) == before


def test_a_smaller_end_steps_extends_a_finished_run_to_the_students_of_one_longer_run(teachers, tmp_path):
    """Resume with a smaller --end_steps: the finished run's students stay, the new stages start from its last student
    (its run-end checkpoint), and the students and summary are those of one run to the smaller --end_steps."""
    common = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--iterations_per_stage", 3,
              "--train_batch_size", 4, "--num_validation_samples", 4, "--checkpointing_steps", 2]
    env = script_env(tmp_path / "hf_home")
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    first = run(distill_command(*common, "--end_steps", 4, "--output_dir", extended), env)
    assert first.returncode == 0, first.stderr[-3000:]
    four = unet_weights(extended / "student-4steps")
    again = run(distill_command(*common, "--end_steps", 4, "--output_dir", extended, "--resume_from_checkpoint", "latest"), env)
    assert again.returncode == 0 and "ends a finished run: nothing left to train" in again.stderr, again.stderr[-3000:]
    assert max_abs_diff(unet_weights(extended / "student-4steps"), four) == 0  # nothing retrained
    more = run(distill_command(*common, "--end_steps", 1, "--output_dir", extended, "--resume_from_checkpoint", "latest"), env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "stage 2/3" in more.stderr and "stage 1/3" not in more.stderr  # started at the first new stage
    assert max_abs_diff(unet_weights(extended / "student-4steps"), four) == 0
    single = run(distill_command(*common, "--end_steps", 1, "--output_dir", whole), env)
    assert single.returncode == 0, single.stderr[-3000:]
    for steps in (4, 2, 1):
        a, b = unet_weights(whole / f"student-{steps}steps"), unet_weights(extended / f"student-{steps}steps")
        assert max_abs_diff(a, b) <= 1e-6, steps
    assert max_abs_diff(unet_weights(whole / "student-1steps"), four) > 1e-4  # the new stages really trained
    summary = lambda out: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert len(summary(whole)) == 3 and len(summary(extended)) == 3
    for a, b in zip(summary(whole), summary(extended)):
        assert [a[c] for c in ("stage", "steps", "prediction_type", "updates")] == [b[c] for c in ("stage", "steps", "prediction_type", "updates")]
        assert b["mse_to_teacher"] == pytest.approx(a["mse_to_teacher"], rel=1e-4)
        assert b["teacher_ddim_mse"] == pytest.approx(a["teacher_ddim_mse"], rel=1e-6)
    shorter = run(distill_command(*common, "--end_steps", 2, "--output_dir", extended, "--resume_from_checkpoint", "latest"), env)
    assert shorter.returncode != 0
    assert shorter.stderr.strip().splitlines()[-1].endswith("pass the run's --start_steps / --end_steps, --prediction_type and "
                                                            "--teacher_clip_sample again (a smaller --end_steps extends it).")


# ----------------------------------------------------------------------------------------------- 6. Ctrl-C / SIGTERM
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resumed_run_ends_the_same(teachers, tmp_path):
    common = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--iterations_per_stage", 40,
              "--train_batch_size", 4, "--ema_decay", 0.9, "--checkpointing_steps", 1000, "--num_validation_samples", 4]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = script_env(tmp_path / "hf_home")
    status, text = signal_mid_run(distill_command(*common, "--output_dir", stopped), env, tmp_path / "stopped.log",
                                  r"stage 1/2: [^\r\n]*\| *[1-9]\d*/40", signal.SIGINT, cwd=ROOT)  # mid-stage 1
    assert status == 130, text[-3000:]  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
    lines = re.findall(r"Stopped by SIGINT at update (\d+): saved (\S+)\. Resume with: (.+)$", text, flags=re.M)
    assert len(lines) == 1, text[-3000:]
    update, checkpoint, command = int(lines[0][0]), Path(lines[0][1]), lines[0][2]
    assert checkpoint == stopped / f"checkpoint-{update}" and 0 < update < 80
    assert checkpoint_folders(stopped)[-1] == checkpoint  # the newest: nothing was trained after it
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["global_step"] == update and not (stopped / "summary.json").exists()
    argv = [str(a) for a in common] + ["--output_dir", str(stopped), "--resume_from_checkpoint", "latest"]
    assert command == shlex.join(["python", "examples/train_distill.py", *argv])  # the exact command, as typed

    resumed = run([sys.executable, *shlex.split(command)[1:]], env, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert run(distill_command(*common, "--output_dir", straight), env).returncode == 0
    for steps in (4, 2):
        assert max_abs_diff(unet_weights(straight / f"student-{steps}steps"), unet_weights(stopped / f"student-{steps}steps")) <= 1e-6
    # the resumed stage's summary row covers the whole stage: its losses from update 1, its time from the start
    rows = {d: json.loads((d / "summary.json").read_text()) for d in (straight, stopped)}
    for a, b in zip(rows[straight], rows[stopped], strict=True):
        np.testing.assert_allclose([a["first_loss"], a["final_loss"]], [b["first_loss"], b["final_loss"]], rtol=1e-5)
    stage = progress["stage"]
    if progress["step"]:  # stopped inside a stage
        assert rows[stopped][stage]["time_s"] >= round(progress["stage_time_s"], 1) and progress["stage_time_s"] > 0


def test_push_to_hub_is_checked_before_any_work(teachers, tmp_path):
    """No token, or a token that may not write the repo: one line before anything is trained or written."""
    out = tmp_path / "out"
    args = [*TINY, "--teacher", teachers["eps"], "--start_steps", 8, "--end_steps", 2, "--iterations_per_stage", 2,
            "--output_dir", out, "--push_to_hub", "--hub_model_id", "pd-user/locked"]
    with run_standin(token=TOKEN) as server:
        no_token = run(distill_command(*args), script_env(tmp_path / "hf_home", hub_url=server.url))
        server.read_only.add("pd-user/locked")
        with_token = run(distill_command(*args), script_env(tmp_path / "hf_home", hub_url=server.url, HF_TOKEN=TOKEN))
        assert "pd-user/locked" in server.repos  # created by the preflight, then found not writable
        assert not any(c["repo_id"] == "pd-user/locked" for c in server.commit_log)  # nothing uploaded
    for result, message in [(no_token, "--push_to_hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"),
                            (with_token, "--push_to_hub: cannot check write access to pd-user/locked (")]:
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "stage 1/" not in result.stderr + result.stdout
        assert TOKEN not in result.stderr + result.stdout
    assert not out.exists()


def test_a_folder_stopped_before_its_first_checkpoint_counts_as_empty(tmp_path, caplog):
    from diffusers_pd.checkpoints import check_output_dir, find_checkpoint, run_leftovers

    (tmp_path / "logs" / "train_distill").mkdir(parents=True)
    (tmp_path / ".checkpoint-5.tmp").mkdir()
    with caplog.at_level("WARNING"):
        check_output_dir(str(tmp_path), overwrite=False, resume=None, leftovers=run_leftovers("logs"))
        assert find_checkpoint(tmp_path, "latest") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} holds only logs of a run stopped before its first checkpoint: starting from scratch.",
        f"--resume_from_checkpoint latest: no checkpoint in {tmp_path} yet, starting from scratch.",
    ]
    (tmp_path / "student-4steps").mkdir()  # anything else: refused as before
    with pytest.raises(ValueError, match="exists and is not empty"):
        check_output_dir(str(tmp_path), overwrite=False, resume=None, leftovers=run_leftovers("logs"))
