"""The evaluation issue's quality targets, checked against an `examples/evaluate.py` run (and the distillation cost).

    python benchmarks/quality_targets.py --results runs/fashion/eval/results.json \
        --teacher_run runs/fashion/teacher --distill_run runs/fashion/pd --output runs/fashion/targets.md

Each target is printed with the measured value, the bound and whether it is met; a target whose rows were not
evaluated says so instead of guessing. Student rows are matched by their step count, teacher rows by sampler.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distillation_cost import cost_table, distillation_cost  # noqa: E402

from diffusers_pd.atomic import atomic_write_text  # noqa: E402

# (what, numerator row, denominator row, bound): FID(numerator) / FID(denominator) <= bound
FID_TARGETS = [
    ("4-step student vs teacher ceiling", ("student", 4), ("ceiling", None), 1.3),
    ("4-step student vs teacher DDIM at 4", ("student", 4), ("teacher DDIM", 4), 0.3),
    ("2-step student vs teacher ceiling", ("student", 2), ("ceiling", None), 2.0),
    ("1-step student vs teacher ceiling", ("student", 1), ("ceiling", None), 4.0),
    ("4-step student vs DPM-Solver++(2M) at 8 NFE", ("student", 4), ("teacher DPM-Solver++(2M)", 8), 1.0),
]
COST_BOUND = 0.5  # distillation to 4 steps over the teacher's training, in forward-pass units


def find_fid(rows: list, kind: str, nfe):
    """FID of the row of `kind` (a student at `nfe` steps, the ceiling, or a teacher sampler at `nfe`), or None."""
    for row in rows:
        if kind == "ceiling" and row["ceiling"]:
            return row["fid"]
        if kind == "student" and row["sampler"].startswith("student") and row["nfe"] == nfe:
            return row["fid"]
        if row["sampler"] == kind and not row["ceiling"] and row["nfe"] == nfe:
            return row["fid"]
    return None


def target_lines(rows: list, cost: dict = None) -> list:
    """Markdown table rows: target, measured ratio (with the FIDs), bound, verdict."""
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for what, (kind_a, nfe_a), (kind_b, nfe_b), bound in FID_TARGETS:
        a, b = find_fid(rows, kind_a, nfe_a), find_fid(rows, kind_b, nfe_b)
        if a is None or b is None:
            lines.append(f"| FID {what} | not evaluated | <= {bound} | - |")
            continue
        ratio = a / b
        lines.append(f"| FID {what} | {ratio:.2f} ({a:.2f} / {b:.2f}) | <= {bound} | {'yes' if ratio <= bound else 'no'} |")
    if cost is not None:
        teacher, distill = cost["forward_units"]
        fraction = distill / teacher
        lines.append(
            f"| distillation cost to {cost['steps']} steps / teacher training (forward-pass units) | {fraction:.3f} | "
            f"<= {COST_BOUND} | {'yes' if fraction <= COST_BOUND else 'no'} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="results.json of examples/evaluate.py")
    parser.add_argument("--teacher_run", default=None, help="output_dir of examples/train_teacher.py (for the cost)")
    parser.add_argument("--distill_run", default=None, help="output_dir of examples/train_distill.py (for the cost)")
    parser.add_argument("--output", default=None, help="Also write the Markdown here.")
    args = parser.parse_args()
    with open(args.results) as handle:
        rows = json.load(handle)["rows"]
    cost = None
    if args.teacher_run and args.distill_run:
        cost = distillation_cost(args.teacher_run, args.distill_run, steps=4)
    text = "\n".join(target_lines(rows, cost)) + "\n"
    if cost is not None:
        text += "\n" + cost_table(cost)
    print(text, end="")
    if args.output:
        atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
