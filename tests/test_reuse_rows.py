"""benchmarks/reuse_rows.py: an earlier run's teacher rows are read back by examples/evaluate.py, never recomputed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from test_evaluate_script import SCHEDULE, SCRIPT, save_tiny_features

REUSE = Path(__file__).resolve().parents[1] / "benchmarks" / "reuse_rows.py"


def run(*command):
    result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return result


def test_reused_teacher_rows_are_read_back_and_protocol_is_checked(tmp_path):
    teacher_dir = tmp_path / "teacher"
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(**SCHEDULE)).save_pretrained(teacher_dir)
    save_tiny_features(tmp_path / "features.pt")

    def evaluate_args(output_dir, seed="0"):
        return ["--teacher", teacher_dir, "--dataset_name", "digits", "--split", "train", "--num_reference", "32",
                "--num_samples", "32", "--batch_size", "16", "--teacher_steps", "0", "--nfe", "1", "2",
                "--dpm_solver_nfe", "--seed", seed, "--device", "cpu", "--inception_weights", tmp_path / "features.pt",
                "--cache_dir", tmp_path / "cache", "--output_dir", output_dir]

    result = run(SCRIPT, *evaluate_args(tmp_path / "earlier"))
    assert result.returncode == 0, result.stderr[-3000:]
    earlier_path = tmp_path / "earlier" / "results.json"
    earlier = json.loads(earlier_path.read_text())
    for row in earlier["rows"]:  # planted values that a recomputation could not produce
        row["fid"] = 1000.0 + row["nfe"]
    earlier_path.write_text(json.dumps(earlier))

    # another seed is another protocol: refused in one line, nothing written
    refused = run(REUSE, "--from", earlier_path, "--", *evaluate_args(tmp_path / "other", seed="1"))
    assert refused.returncode != 0 and "seed" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()

    result = run(REUSE, "--from", earlier_path, "--", *evaluate_args(tmp_path / "new"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(SCRIPT, *evaluate_args(tmp_path / "new"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished before") == 2
    rows = json.loads((tmp_path / "new" / "results.json").read_text())["rows"]
    assert {(r["sampler"], r["nfe"]): r["fid"] for r in rows} == {("teacher DDIM", 1): 1001.0, ("teacher DDIM", 2): 1002.0}
    assert all((tmp_path / "new" / r["samples"]).is_file() for r in rows)


MERGE = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_rows.py"


def test_merged_runs_keep_every_row_once_with_its_own_samples_and_refuse_another_protocol(tmp_path):
    config = dict(dataset_name="digits", split="test", num_samples=32, batch_size=16, seed=0, inception_sha256="abc")

    def write_run(name, rows, **changes):
        folder = tmp_path / name
        (folder / "samples").mkdir(parents=True)
        for row in rows:
            (folder / row["samples"]).write_bytes(f"{name}:{row['model']}".encode())  # which grid went where
        (folder / "results.json").write_text(json.dumps({"config": {**config, **changes}, "rows": rows}))
        return folder

    def row(sampler, model, nfe, fid):
        return dict(sampler=sampler, model=model, nfe=nfe, fid=fid, ceiling=False, samples=f"samples/{nfe}-{fid}.png")

    teacher = row("teacher DDIM", "teacher", 4, 50.0)
    a = write_run("a", [teacher, row("student (sfd)", "runs/x/student-4steps", 4, 30.0)])
    b = write_run("b", [dict(teacher, fid=99.0, model="elsewhere/teacher"), row("student (sfd)", "runs/y/student-4steps", 4, 28.0)])
    result = run(MERGE, "--runs", a, b, "--output", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [(r["model"], r["fid"]) for r in merged["rows"]] == [
        ("teacher", 50.0), ("runs/x/student-4steps", 30.0), ("runs/y/student-4steps", 28.0)]  # the first teacher row wins,
    # also where another run loaded the same teacher from another path
    grids = [(tmp_path / "merged" / r["samples"]).read_bytes() for r in merged["rows"]]
    assert grids == [b"a:teacher", b"a:runs/x/student-4steps", b"b:runs/y/student-4steps"]
    assert (tmp_path / "merged" / "results.md").is_file() and (tmp_path / "merged" / "fid_vs_nfe.png").is_file()

    other = write_run("c", [row("student (sfd)", "runs/z/student-2steps", 2, 40.0)], seed=1)
    refused = run(MERGE, "--runs", a, other, "--output", tmp_path / "refused")
    assert refused.returncode != 0 and "another protocol" in refused.stderr.strip().splitlines()[-1] and "seed" in refused.stderr
    assert not (tmp_path / "refused").exists()
