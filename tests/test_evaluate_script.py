"""End to end: examples/evaluate.py on a tiny teacher and student, FID against the digits data set."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from diffusers_pd import ProgressiveDistillationScheduler, save_student

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate.py"
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


class TinyFeatures(torch.nn.Module):
    """Stand-in for the FID Inception (same input convention, 128-d output) to keep the test fast."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=13, stride=13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)


def save_tiny_features(path: Path) -> None:
    """Write a seeded `TinyFeatures` as TorchScript, as `--inception_weights` expects."""
    torch.manual_seed(0)
    torch.jit.script(TinyFeatures().eval()).save(str(path))


def test_evaluate_script_writes_every_row(tmp_path):
    # The "student" is the teacher's own network saved as a 2-step student, so its row must equal the
    # teacher's 2-step DDIM row exactly (same weights, same grid, same initial noise), and so must the
    # 2-step ceiling. DPM-Solver++(2M) at 2 steps is first order at both steps, i.e. DDIM up to rounding.
    teacher_dir, student_dir, output_dir = tmp_path / "teacher", tmp_path / "student-2", tmp_path / "eval"
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(**SCHEDULE)).save_pretrained(teacher_dir)
    save_student(student_dir, tiny_unet(0), ProgressiveDistillationScheduler(**SCHEDULE), 2, teacher=str(teacher_dir))
    save_tiny_features(tmp_path / "features.pt")

    command = [
        sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--students", str(student_dir),
        "--dataset_name", "digits", "--split", "train", "--num_reference", "32", "--num_samples", "32",
        "--batch_size", "16", "--nfe", "2", "--teacher_steps", "2", "--seed", "3", "--device", "cpu",
        "--inception_weights", str(tmp_path / "features.pt"), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(output_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((output_dir / "results.json").read_text())
    fids = {(row["sampler"], row["nfe"]): row["fid"] for row in report["rows"]}
    assert set(fids) == {
        ("student (progressive_distillation)", 2),
        ("teacher DDIM", 2),
        ("teacher DPM-Solver++(2M)", 2),
        ("teacher DDIM (ceiling)", 2),
    }
    assert all(math.isfinite(value) and value > 0 for value in fids.values())
    assert fids[("student (progressive_distillation)", 2)] == fids[("teacher DDIM", 2)]
    assert fids[("teacher DDIM (ceiling)", 2)] == fids[("teacher DDIM", 2)]
    assert math.isclose(fids[("teacher DPM-Solver++(2M)", 2)], fids[("teacher DDIM", 2)], rel_tol=1e-2)

    for row in report["rows"]:
        with Image.open(output_dir / row["samples"]) as grid:
            assert grid.format == "PNG" and grid.size == (6 * 8, 6 * 8)  # 32 images of 8x8 in a 6x6 grid
    with Image.open(output_dir / "fid_vs_nfe.png") as plot:
        plot.verify()
        assert plot.format == "PNG"
    table = (output_dir / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(report["rows"]) and "| teacher DDIM | " in "\n".join(table)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_evaluate_script_reuses_finished_rows_and_adds_new_ones(tmp_path):
    # A rerun into the same --output_dir reads back rows whose settings match (shown by a planted FID that a
    # recomputation could not produce), computes only the new rows, and recomputes a row whose settings changed.
    teacher_dir, output_dir = tmp_path / "teacher", tmp_path / "eval"
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(**SCHEDULE)).save_pretrained(teacher_dir)
    save_tiny_features(tmp_path / "features.pt")

    def evaluate(*extra, hash_seed="0"):
        command = [
            sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--dataset_name", "digits", "--split",
            "train", "--num_reference", "32", "--num_samples", "32", "--batch_size", "16", "--teacher_steps", "0",
            "--device", "cpu", "--inception_weights", str(tmp_path / "features.pt"), "--cache_dir",
            str(tmp_path / "cache"), "--output_dir", str(output_dir), *extra,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = json.loads((output_dir / "results.json").read_text())["rows"]
        return {(row["sampler"], row["nfe"]): row["fid"] for row in rows}

    first = evaluate("--nfe", "1", "--dpm_solver_nfe", "--seed", "0")
    assert set(first) == {("teacher DDIM", 1)}  # an empty --dpm_solver_nfe: no DPM-Solver++ rows

    (saved_path,) = (output_dir / "rows").glob("*.json")
    saved = json.loads(saved_path.read_text())
    saved["result"]["fid"] = 12345.0
    saved_path.write_text(json.dumps(saved))

    second = evaluate("--nfe", "1", "2", "--dpm_solver_nfe", "2", "--seed", "0")
    assert set(second) == {("teacher DDIM", 1), ("teacher DDIM", 2), ("teacher DPM-Solver++(2M)", 2)}
    assert second[("teacher DDIM", 1)] == 12345.0  # read back, not recomputed
    assert math.isclose(second[("teacher DPM-Solver++(2M)", 2)], second[("teacher DDIM", 2)], rel_tol=1e-2)

    # a DPM-Solver++ row is read back by a process with other string hashes (its scheduler config carries the set
    # `_use_default_values`, whose order follows the hash seed)
    dpm_path = output_dir / "rows" / "teacher-dpm-solver-2m-teacher-nfe2.json"
    saved = json.loads(dpm_path.read_text())
    saved["result"]["fid"] = 23456.0
    dpm_path.write_text(json.dumps(saved))
    for hash_seed in ("1", "2", "3"):
        again = evaluate("--nfe", "2", "--dpm_solver_nfe", "2", "--seed", "0", hash_seed=hash_seed)
        assert again[("teacher DPM-Solver++(2M)", 2)] == 23456.0, hash_seed

    third = evaluate("--nfe", "1", "--dpm_solver_nfe", "--seed", "1")  # other noise: the row is evaluated again
    assert third[("teacher DDIM", 1)] != 12345.0 and math.isfinite(third[("teacher DDIM", 1)])


def evaluate_clip_mode(tmp_path, beta_schedule: str, mode: str):
    """evaluate.py on a tiny eps teacher of `beta_schedule` (DDPMScheduler's clip_sample=True) and its own weights saved
    as a 2-step student, with --teacher_clip_sample `mode`: ({sampler: FID}, stderr)."""
    teacher_dir, student_dir = tmp_path / f"teacher-{beta_schedule}", tmp_path / f"student-2-{beta_schedule}"
    if not teacher_dir.exists():
        schedule = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type="epsilon")
        DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(**schedule)).save_pretrained(teacher_dir)
        save_student(student_dir, tiny_unet(0), ProgressiveDistillationScheduler(**schedule), 2, teacher=str(teacher_dir))
        save_tiny_features(tmp_path / "features.pt")
    output_dir = tmp_path / f"eval-{beta_schedule}-{mode}"
    command = [
        sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--students", str(student_dir), "--dataset_name",
        "digits", "--split", "train", "--num_reference", "32", "--num_samples", "32", "--batch_size", "16",
        "--nfe", "2", "--dpm_solver_nfe", "--teacher_steps", "0", "--device", "cpu", "--teacher_clip_sample", mode,
        "--inception_weights", str(tmp_path / "features.pt"), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(output_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((output_dir / "results.json").read_text())["rows"]
    return {row["sampler"]: row["fid"] for row in rows}, result.stderr


def test_evaluate_script_clips_a_clip_sample_eps_teacher_as_training_does_and_never_the_student(tmp_path):
    # A squaredcos_cap_v2 eps teacher (clip_sample by DDPM's default) breaks unclipped at t = T: auto clamps its
    # x-hat in its rows, labelled so; its own weights saved as a student stay unclipped; `off` gives the plain rows.
    (clipped, _), (plain, _) = (evaluate_clip_mode(tmp_path, "squaredcos_cap_v2", mode) for mode in ("auto", "off"))
    assert set(clipped) == {"student (progressive_distillation)", "teacher DDIM, x-hat clipped"}
    assert set(plain) == {"student (progressive_distillation)", "teacher DDIM"}
    assert plain["teacher DDIM"] == plain["student (progressive_distillation)"] == clipped["student (progressive_distillation)"]
    assert clipped["teacher DDIM, x-hat clipped"] != plain["teacher DDIM"]


def test_evaluate_script_says_when_auto_leaves_a_clip_sample_teacher_unclamped(tmp_path):
    # A linear eps teacher (the Hub DDPM shape, clip_sample=True): auto leaves its rows unclamped, unlike diffusers'
    # own samplers, and says so naming the flag; an explicit --teacher_clip_sample says nothing.
    auto, auto_stderr = evaluate_clip_mode(tmp_path, "linear", "auto")
    off, off_stderr = evaluate_clip_mode(tmp_path, "linear", "off")
    assert "clip_sample=True" in auto_stderr and "--teacher_clip_sample on" in auto_stderr
    assert "clip_sample=True" not in off_stderr
    assert auto == off  # the same unclamped rows


def test_students_of_the_same_folder_name_in_different_runs_keep_their_own_rows(tmp_path):
    # run-a/student-2steps and run-b/student-2steps: before, the second row's files overwrote the first's
    teacher_dir, output_dir = tmp_path / "teacher", tmp_path / "eval"
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(**SCHEDULE)).save_pretrained(teacher_dir)
    students = [tmp_path / run / "student-2steps" for run in ("run-a", "run-b")]
    for seed, folder in enumerate(students, start=1):
        save_student(folder, tiny_unet(seed), ProgressiveDistillationScheduler(**SCHEDULE), 2, teacher=str(teacher_dir))
    save_tiny_features(tmp_path / "features.pt")
    command = [
        sys.executable, str(SCRIPT), "--teacher", str(teacher_dir), "--students", *map(str, students),
        "--dataset_name", "digits", "--split", "train", "--num_reference", "32", "--num_samples", "32",
        "--batch_size", "16", "--nfe", "2", "--dpm_solver_nfe", "--teacher_steps", "0", "--seed", "3", "--device", "cpu",
        "--inception_weights", str(tmp_path / "features.pt"), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(output_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [row for row in json.loads((output_dir / "results.json").read_text())["rows"] if row["sampler"] != "teacher DDIM"]
    assert [row["model"] for row in rows] == list(map(str, students))
    assert len({row["samples"] for row in rows}) == 2 and rows[0]["fid"] != rows[1]["fid"]  # different weights
    saved = {json.loads(path.read_text())["result"]["model"]: path for path in (output_dir / "rows").glob("student-*.json")}
    assert sorted(saved) == sorted(map(str, students))
    assert sorted(path.name for path in saved.values()) == ["student-progressive-distillation-run-a-student-2steps-nfe2.json",
                                                            "student-progressive-distillation-run-b-student-2steps-nfe2.json"]
    for row in rows:  # each row's own samples, not the other's
        with Image.open(output_dir / row["samples"]) as grid:
            assert grid.format == "PNG"
    rerun = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0 and rerun.stdout.count("finished before") == 3  # both students and the teacher row
