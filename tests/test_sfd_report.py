"""benchmarks/sfd_report.py on hand-made run folders: SFD-v is held against the separate student of its own setting
and budget at each of its NFEs, never against a student of another grid or budget."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import sfd_report  # noqa: E402

from diffusers_pd.scheduler import METADATA_KEY  # noqa: E402


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def sfd_run(root: Path, name: str, nfes, *, grid="trailing", afs=False, k=8, iterations=32, mse=0.05):
    """A finished SFD run folder: summary.json and each student's scheduler metadata, as train_distill.py writes."""
    sfd_v = list(nfes) if len(nfes) > 1 else None
    rows = []
    for nfe in nfes:
        write_json(root / name / f"student-{nfe}steps" / "scheduler" / "scheduler_config.json", {METADATA_KEY: dict(
            method="sfd", nfe=nfe, grid=grid, afs=afs, teacher_steps_per_step=k, teacher_solver="dpm_solver_3m", loss="l1",
            sfd_v=sfd_v)})
        rows.append(dict(stage=f"SFD: {nfe} NFE", steps=nfe, iterations=iterations, updates=iterations * nfe,
                         global_batch=128, time_s=10.0, student=f"student-{nfe}steps", mse_to_teacher=mse,
                         teacher_ddim_mse=0.2))
    write_json(root / name / "summary.json", rows)


def fid_row(model, nfe, fid, sampler="student (sfd)"):
    return dict(sampler=sampler, model=model, nfe=nfe, fid=fid, ceiling=False)


def test_sfd_v_is_compared_with_the_separate_student_of_its_setting_and_budget(tmp_path):
    runs = tmp_path / "runs"
    sfd_run(runs, "sfd-v", [2, 4])
    sfd_run(runs, "a-4-lu", [4], grid="lu", afs=True, k=4)  # another setting: first by name, must not be chosen
    sfd_run(runs, "b-2-short", [2], iterations=8)  # same setting, another budget: not comparable
    sfd_run(runs, "c-2-same", [2])
    sfd_run(runs, "d-4-same", [4])
    model = lambda run, nfe: str(runs / run / f"student-{nfe}steps")  # noqa: E731
    write_json(runs / "eval" / "results.json", {"rows": [
        fid_row(model("sfd-v", 2), 2, 66.0, "student (sfd-v)"), fid_row(model("sfd-v", 4), 4, 44.0, "student (sfd-v)"),
        fid_row(model("a-4-lu", 4), 4, 30.0), fid_row(model("b-2-short", 2), 2, 90.0),
        fid_row(model("c-2-same", 2), 2, 60.0), fid_row(model("d-4-same", 4), 4, 42.0)]})
    write_json(runs / "fidelity.json", {"rows": [
        dict(student=model(run, nfe), nfe=nfe, afs=False, mse_to_teacher=mse, teacher_ddim_mse=0.2)
        for run, nfe, mse in [("sfd-v", 2, 0.055), ("c-2-same", 2, 0.05), ("sfd-v", 4, 0.03), ("d-4-same", 4, 0.024)]]})
    write_json(tmp_path / "pd.json", {"rows": [fid_row("pd/student-4steps", 4, 29.8, "student (progressive-distillation)")]})
    write_json(tmp_path / "pd_summary.json", [dict(steps=4, mse_to_teacher=0.011, teacher_ddim_mse=0.12, updates=180, global_batch=128,
                                                         time_s=100.0)])
    write_json(tmp_path / "teacher_cost.json", dict(images_seen=320000, optimizer_updates=2500, train_wall_time_s=900.0))

    sfd_report.main(["--sfd_run", str(runs), "--pd_results", str(tmp_path / "pd.json"), "--pd_summary",
                     str(tmp_path / "pd_summary.json"), "--teacher_cost", str(tmp_path / "teacher_cost.json"),
                     "--output", str(tmp_path / "report")])
    targets = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
               for line in (tmp_path / "report" / "sfd_results.md").read_text().splitlines() if line.startswith("| SFD-v")}
    assert targets == {
        "SFD-v 2 NFE (sfd-v) / c-2-same (FID)": "1.100 (66.00 / 60.00)",
        "SFD-v 2 NFE (sfd-v) / c-2-same (fidelity, mse)": "1.100 (0.055 / 0.05)",
        "SFD-v 4 NFE (sfd-v) / d-4-same (FID)": "1.048 (44.00 / 42.00)",
        "SFD-v 4 NFE (sfd-v) / d-4-same (fidelity, mse)": "1.250 (0.03 / 0.024)",
    }
    assert sfd_report.separate_students(str(runs), ["a-4-lu", "b-2-short", "sfd-v"], "sfd-v") == {}
