"""SFD vs progressive distillation: one table by NFE, the costs, the issue's targets and two plots.

    python benchmarks/sfd_report.py --sfd_run runs/fashion-sfd \
        --pd_results benchmarks/results/fashion-mnist-cpu/results.json \
        --pd_summary benchmarks/results/fashion-mnist-cpu/distillation_summary.json \
        --teacher_cost benchmarks/results/fashion-mnist-cpu/teacher_training_cost.json --output runs/fashion-sfd/report

Reads `<sfd_run>/eval/results.json` (examples/evaluate.py), each SFD run's `summary.json` and its students'
metadata. Columns are the runs (folders of --sfd_run); the targets read the runs named by --sfd4, --sfd2 and --sfd_v
(its 1-NFE student is the second stage), and the cost target counts those three runs. SFD-v is held, at each of its
NFEs, against the separate student of its own setting (grid, AFS, K, solver, loss) and budget (trajectories) found
among the runs, by FID and by fidelity. Cost in forward-pass units
per trajectory (a forward + backward counts 3, as benchmarks/distillation_cost.py):
stage one K x (NFE + AFS) teacher forwards + 3 x NFE student updates; the second stage NFE_top forwards of the
stage-one student + 3. Writes sfd_results.md, cost.json, fid_vs_nfe_sfd.png and fid_vs_cost.png to --output. The wall-time target is
compared only where --sfd_machine and --pd_machine agree (both left out: one machine).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distillation_cost import DISTILL_STEP_FORWARDS, TRAIN_STEP_FORWARDS  # noqa: E402

from diffusers_pd.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from diffusers_pd.scheduler import METADATA_KEY  # noqa: E402

COST_BOUND = 0.25   # all SFD runs together over PD's whole run (START -> 1)
SFD_V_TOLERANCE = 1.05
SETTING_KEYS = ("grid", "afs", "teacher_steps_per_step", "teacher_solver", "loss")  # what makes two SFD runs alike


def student_info(path: str) -> dict:
    """The diffusers_pd metadata of a saved student (empty if the folder is gone)."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config):
        return {}
    with open(config) as handle:
        return json.load(handle).get(METADATA_KEY, {})


def column(row: dict, sfd_run: str) -> str:
    """Column of a row: PD, the SFD run that made the student (its folder under --sfd_run; ", stock diffusers" for
    an AFS student's stock scheduler row), or a teacher sampler."""
    if not row["sampler"].startswith("student"):
        return row["sampler"]
    if "progressive" in row["sampler"]:
        return "PD"
    run = os.path.relpath(row["model"].rstrip("/"), sfd_run).split(os.sep)[0]
    return f"SFD {run}" + (", stock diffusers" if "stock diffusers" in row["sampler"] else "")


def run_cost(run_dir: str) -> list:
    """Per stage of one SFD run: wall time, trajectories and forward-pass units (see the module docstring)."""
    with open(os.path.join(run_dir, "summary.json")) as handle:
        summary = json.load(handle)
    stages, top, seen = [], None, set()
    for stage in summary:  # SFD-v: one summary row per NFE of the same stage (same totals): count the stage once
        if stage["stage"] in seen:
            continue
        seen.add(stage["stage"])
        info = student_info(os.path.join(run_dir, stage["student"]))
        trajectories, updates = stage["iterations"] * stage["global_batch"], stage["updates"] * stage["global_batch"]
        if info.get("second_stage"):
            forwards = top * trajectories + TRAIN_STEP_FORWARDS * updates
        else:
            top = max(info.get("sfd_v") or [info["nfe"]])
            teacher_steps = updates + (trajectories if info["afs"] else 0)  # N = NFE + AFS student steps
            forwards = info["teacher_steps_per_step"] * teacher_steps + TRAIN_STEP_FORWARDS * updates
        stages.append(dict(stage=stage["stage"], time_s=stage["time_s"], trajectories=trajectories,
                           updates=stage["updates"], forward_units=forwards, mse_to_teacher=stage["mse_to_teacher"],
                           teacher_ddim_mse=stage["teacher_ddim_mse"]))
    return stages


def stage_one(run_dir: str) -> tuple:
    """(metadata of an SFD run's stage-one student, its stage-one trajectories), from the run's summary.json."""
    with open(os.path.join(run_dir, "summary.json")) as handle:
        first = json.load(handle)[0]
    return student_info(os.path.join(run_dir, first["student"])), first["iterations"] * first["global_batch"]


def separate_students(sfd_run: str, runs: list, sfd_v: str) -> dict:
    """NFE -> the run (first by name) of a separate one-NFE student trained as SFD-v was: same setting, same budget."""
    def key(run):
        info, trajectories = stage_one(os.path.join(sfd_run, run))
        return tuple(info.get(k) for k in SETTING_KEYS), trajectories, info

    setting, budget, _ = key(sfd_v)
    found = {}
    for run in runs:
        other_setting, other_budget, info = key(run)
        if not info.get("sfd_v") and (other_setting, other_budget) == (setting, budget):
            found.setdefault(info["nfe"], run)
    return found


def fmt(value, spec=".2f") -> str:
    return "" if value is None else format(value, spec)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sfd_run", required=True)
    parser.add_argument("--pd_results", required=True)
    parser.add_argument("--pd_summary", required=True)
    parser.add_argument("--teacher_cost", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sfd4", default="sfd-4", help="Run of the separate 4-NFE student (a folder of --sfd_run).")
    parser.add_argument("--sfd2", default="sfd-2", help="Run of the separate 2-NFE student.")
    parser.add_argument("--sfd_v", default="sfd-v", help="Run of the SFD-v student and its 1-NFE second stage.")
    parser.add_argument("--sfd_machine", default=None, help="Where the SFD runs trained (e.g. 'one H100').")
    parser.add_argument("--pd_machine", default=None, help="Where PD trained; wall times of two machines are not compared.")
    args = parser.parse_args(argv)
    load = lambda path: json.load(open(path))  # noqa: E731
    eval_path = os.path.join(args.sfd_run, "eval", "results.json")
    sfd_rows = load(eval_path)["rows"] if os.path.isfile(eval_path) else []  # no FID yet: costs and fidelity only
    pd_rows = [r for r in load(args.pd_results)["rows"] if r["sampler"].startswith("student")]
    rows = pd_rows + [r for r in sfd_rows if r["sampler"].startswith("student")] + \
        [r for r in sfd_rows if not r["sampler"].startswith("student")]
    fid = {}
    for row in rows:
        key = "teacher DDIM (ceiling)" if row["ceiling"] else column(row, args.sfd_run)
        fid.setdefault(key, {})[row["nfe"]] = row["fid"]

    # 1. the side-by-side table (stock rows sit at the NFE they really use: the AFS student's NFE + 1)
    sfd_columns = sorted(c for c in fid if c.startswith("SFD "))
    columns = [c for c in ["PD", *sfd_columns, "teacher DDIM", "teacher DPM-Solver++(2M)"] if c in fid]
    nfes = sorted({n for c in columns for n in fid[c]})
    lines = ["| NFE | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    lines += [f"| {n} | " + " | ".join(fmt(fid[c].get(n)) for c in columns) + " |" for n in nfes]
    for n, value in fid.get("teacher DDIM (ceiling)", {}).items():
        lines.append(f"| {n} (ceiling) | " + " | ".join(fmt(value) if c == "teacher DDIM" else "" for c in columns) + " |")

    # 2. costs: each SFD run against PD's whole run and the teacher's training
    pd_stages = load(args.pd_summary)
    pd_time = sum(s["time_s"] for s in pd_stages)
    pd_units = sum(s["updates"] * s["global_batch"] for s in pd_stages) * DISTILL_STEP_FORWARDS
    teacher = load(args.teacher_cost)
    teacher_units = teacher["images_seen"] * TRAIN_STEP_FORWARDS
    runs = sorted(d for d in os.listdir(args.sfd_run) if os.path.isfile(os.path.join(args.sfd_run, d, "summary.json")))
    costs = {run: run_cost(os.path.join(args.sfd_run, run)) for run in runs}
    lines += ["", "| run | stage | trajectories | updates | wall time (s) | forward-pass units | / PD 64 -> 1 units "
              "| mse to its own reference | teacher DDIM, same reference |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run, stages in costs.items():
        for s in stages:
            lines.append(f"| {run} | {s['stage']} | {s['trajectories']:,} | {s['updates']} | {s['time_s']:.0f} | "
                         f"{s['forward_units']:,.0f} | {s['forward_units'] / pd_units:.3f} | {s['mse_to_teacher']:.4g} | "
                         f"{s['teacher_ddim_mse']:.4g} |")
    sfd_time = sum(s["time_s"] for stages in costs.values() for s in stages)
    sfd_units = sum(s["forward_units"] for stages in costs.values() for s in stages)
    target_runs = [run for run in (args.sfd4, args.sfd2, args.sfd_v) if run in costs]
    set_time = sum(s["time_s"] for run in target_runs for s in costs[run])
    set_units = sum(s["forward_units"] for run in target_runs for s in costs[run])
    set_name = " + ".join(target_runs)
    lines += [f"| {set_name} (the target set) | | | | {set_time:.0f} | {set_units:,.0f} | {set_units / pd_units:.3f} | | |",
              f"| all SFD runs | | | | {sfd_time:.0f} | {sfd_units:,.0f} | {sfd_units / pd_units:.3f} | | |",
              f"| PD 64 -> 1 | {len(pd_stages)} halvings | | | {pd_time:.0f} | {pd_units:,.0f} | 1.000 | | |",
              f"| teacher training | | | {teacher['optimizer_updates']} | {teacher['train_wall_time_s']:.0f} | "
              f"{teacher_units:,.0f} | {teacher_units / pd_units:.3f} | | |"]

    # 3. fidelity on PD's yardstick (benchmarks/sfd_fidelity.py): distance to the teacher's 64-step DDIM samples
    fidelity_path = os.path.join(args.sfd_run, "fidelity.json")
    fidelity = {}  # (run, NFE) -> mse to the teacher's 64-step DDIM
    if os.path.isfile(fidelity_path):
        for r in load(fidelity_path)["rows"]:
            fidelity[(os.path.basename(os.path.dirname(r["student"].rstrip("/"))), r["nfe"])] = r["mse_to_teacher"]
        pd_mse = {s["steps"]: s["mse_to_teacher"] for s in pd_stages}
        lines += ["", "| student | NFE | AFS | K | mse to teacher 64-step DDIM | PD student, same NFE | teacher DDIM, same NFE |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in load(fidelity_path)["rows"]:
            info = student_info(r["student"])
            lines.append(f"| {r['student']} | {r['nfe']} | {'yes' if r['afs'] else 'no'} | "
                         f"{info.get('teacher_steps_per_step', '')} | {r['mse_to_teacher']:.4g} | "
                         f"{fmt(pd_mse.get(r['nfe']), '.4g')} | {r['teacher_ddim_mse']:.4g} |")

    # 4. the targets
    def target(what, a, b, bound, spec=".2f"):
        if a is None or b is None:
            return f"| {what} | not evaluated | <= {bound} | - |"
        return f"| {what} | {a / b:.3f} ({a:{spec}} / {b:{spec}}) | <= {bound} | {'yes' if a / b <= bound else 'no'} |"

    def wall_time_target(what, a, b):
        """`target` where SFD and PD trained on one machine; two machines' wall times are not compared."""
        if args.sfd_machine != args.pd_machine:
            return (f"| {what} | not compared: SFD trained on {args.sfd_machine or 'an unnamed machine'}, PD on "
                    f"{args.pd_machine or 'an unnamed machine'} | <= {COST_BOUND} | - |")
        return target(what, a, b, COST_BOUND)
    get = lambda c, n: fid.get(c, {}).get(n)  # noqa: E731

    def sfd_v_targets():
        """SFD-v at each NFE against the separate student of its own setting and budget: FID, then fidelity."""
        if args.sfd_v not in costs:
            return []
        separate = separate_students(args.sfd_run, runs, args.sfd_v)
        rows = []
        for n in sorted(stage_one(os.path.join(args.sfd_run, args.sfd_v))[0].get("sfd_v") or []):
            name = f"SFD-v {n} NFE ({args.sfd_v}) / {separate.get(n, f'separate {n}-NFE student')}"
            if n not in separate:
                rows.append(f"| {name} | no separate student of its setting and budget | <= {SFD_V_TOLERANCE} | - |")
                continue
            rows.append(target(f"{name} (FID)", get(f"SFD {args.sfd_v}", n), get(f"SFD {separate[n]}", n), SFD_V_TOLERANCE))
            rows.append(target(f"{name} (fidelity, mse)", fidelity.get((args.sfd_v, n)), fidelity.get((separate[n], n)),
                               SFD_V_TOLERANCE, spec=".4g"))
        return rows
    lines += ["", "| target | measured | bound | met |", "|---|---|---|---|",
              target(f"SFD 4 NFE ({args.sfd4}) / PD 4 steps (FID)", get(f"SFD {args.sfd4}", 4), get("PD", 4), 1.0),
              target(f"SFD 2 NFE ({args.sfd2}) / PD 2 steps (FID)", get(f"SFD {args.sfd2}", 2), get("PD", 2), 1.0),
              *sfd_v_targets(),
              target(f"second stage 1 NFE ({args.sfd_v}) / PD 1 step (FID)", get(f"SFD {args.sfd_v}", 1), get("PD", 1), 1.0),
              target(f"{set_name} / PD 64 -> 1 (forward-pass units)", set_units, pd_units, COST_BOUND),
              wall_time_target(f"{set_name} / PD 64 -> 1 (wall time, s)", set_time, pd_time)]
    os.makedirs(args.output, exist_ok=True)
    atomic_write_text(os.path.join(args.output, "sfd_results.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(args.output, "cost.json"), json.dumps(
        dict(runs=costs, pd=dict(time_s=pd_time, forward_units=pd_units),
             teacher=dict(time_s=teacher["train_wall_time_s"], forward_units=teacher_units)), indent=2))

    # 5. plots: FID vs NFE (PD and SFD together), FID vs distillation cost (forward-pass units)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for c in columns:
        points = sorted(fid[c].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=c,
                linestyle=":" if c.startswith("teacher") else "--" if "stock" in c else "-")
    for n, value in fid.get("teacher DDIM (ceiling)", {}).items():
        ax.axhline(value, linestyle="--", color="gray", label=f"teacher DDIM, {n} steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID (5,000 samples)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, os.path.join(args.output, "fid_vs_nfe_sfd.png"))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    pd_cum, done = {}, 0.0
    for s in pd_stages:  # PD's k-step student costs every halving down to k
        done += s["updates"] * s["global_batch"] * DISTILL_STEP_FORWARDS
        pd_cum[s["steps"]] = done
    pd_points = sorted((pd_cum[n], v, n) for n, v in fid.get("PD", {}).items() if n in pd_cum)
    ax.plot([p[0] for p in pd_points], [p[1] for p in pd_points], marker="o", label="PD (cumulative halvings)")
    for p in pd_points:
        ax.annotate(f"{p[2]}", (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, (run, stages) in enumerate(costs.items()):
        points = []
        for row in sfd_rows:
            if not row["model"].rstrip("/").startswith(os.path.join(args.sfd_run, run) + "/") or "stock" in row["sampler"]:
                continue
            second = student_info(row["model"]).get("second_stage")
            units = sum(s["forward_units"] for s in (stages if second else stages[:1]))
            points.append((units, row["fid"], row["nfe"]))
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker="^vsDPoX*"[i % 8], label=f"SFD {run}")
            for p in points:
                ax.annotate(f"{p[2]}", (p[0], p[1]), textcoords="offset points", xytext=(4, -8), fontsize=7)
    ax.axvline(COST_BOUND * pd_units, linestyle=":", color="gray", label="0.25 x PD 64 -> 1")
    ax.set_xscale("log")
    ax.set_xlabel("distillation cost (forward-pass units; labels: NFE)")
    ax.set_ylabel("FID (5,000 samples)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, os.path.join(args.output, "fid_vs_cost.png"))
    if os.path.isfile(fidelity_path):
        _fidelity_plots(load(fidelity_path)["rows"], pd_stages, pd_cum, costs, args)
    print("\n".join(lines))


def _fidelity_plots(rows: list, pd_stages: list, pd_cum: dict, costs: dict, args) -> None:
    """mse to the teacher's 64-step DDIM vs NFE and vs distillation cost: PD's students, SFD's, the teacher's DDIM."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4.2))
    by_nfe, by_cost = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    pd_points = sorted((s["steps"], s["mse_to_teacher"], s["teacher_ddim_mse"]) for s in pd_stages)
    by_nfe.plot([p[0] for p in pd_points], [p[1] for p in pd_points], marker="o", label="PD students")
    by_nfe.plot([p[0] for p in pd_points], [p[2] for p in pd_points], marker=".", linestyle=":", label="teacher DDIM")
    by_cost.plot([pd_cum[p[0]] for p in pd_points], [p[1] for p in pd_points], marker="o", label="PD (cumulative halvings)")
    for i, run in enumerate(sorted({os.path.dirname(r["student"].rstrip("/")) for r in rows})):
        color = f"C{(i + 2) % 10}"  # C0, C1: PD and the teacher
        points = sorted((r["nfe"], r["mse_to_teacher"], r["student"]) for r in rows if os.path.dirname(r["student"].rstrip("/")) == run)
        name = os.path.basename(run)
        by_nfe.plot([p[0] for p in points], [p[1] for p in points], marker="s", color=color, label=f"SFD {name}")
        stages = costs.get(name)
        if stages:
            units = [sum(s["forward_units"] for s in (stages if student_info(p[2]).get("second_stage") else stages[:1]))
                     for p in points]
            by_cost.scatter(units, [p[1] for p in points], marker="s", color=color, label=f"SFD {name}")
            for u, p in zip(units, points):
                by_cost.annotate(str(p[0]), (u, p[1]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    for p in pd_points:
        by_cost.annotate(str(p[0]), (pd_cum[p[0]], p[1]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    by_nfe.set_xscale("log", base=2)
    ticks = sorted({p[0] for p in pd_points} | {r["nfe"] for r in rows})
    by_nfe.set_xticks(ticks, [str(n) for n in ticks])
    by_cost.set_xscale("log")
    by_cost.xaxis.set_minor_formatter(NullFormatter())
    for ax, xlabel in [(by_nfe, "NFE"), (by_cost, "distillation cost (forward-pass units; labels: NFE)")]:
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mse to the teacher's 64-step DDIM")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, os.path.join(args.output, "fidelity_vs_nfe_and_cost.png"))


def _save(fig, path: str) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


if __name__ == "__main__":
    main()
