#!/usr/bin/env python
"""Check issue 12's targets on text_to_image_eval.py's results.json and write them as markdown.

Targets, at each guidance scale s: the 4-step guided student within 3 accuracy points of the 64-step CFG teacher and
FID <= 1.3x the teacher's, at 4 UNet evaluations instead of 128; accuracy rising with s for the student as for the
teacher (the guidance input is live). FID is checked on the Inception FID where the row has one, and on the
classifier-feature distance FD_cls always.

    python benchmarks/text_to_image_targets.py --results benchmarks/results/text-to-image-fashion/results.json \
        --output benchmarks/results/text-to-image-fashion/targets.md
"""

import argparse
import json
from pathlib import Path

from diffusers_pd.atomic import atomic_write_text
from diffusers_pd.training import format_table

ACCURACY_POINTS = 3.0
FID_RATIO = 1.3


def find(rows, sampler, steps, scale):
    return next((r for r in rows if r["sampler"] == sampler and r["steps"] == steps and r["guidance_scale"] == scale), None)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--teacher_steps", type=int, default=64)
    parser.add_argument("--student_steps", type=int, default=4)
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())
    scales = sorted({r["guidance_scale"] for r in rows})
    table = []
    for scale in scales:
        teacher = find(rows, "teacher DDIM", args.teacher_steps, scale)
        student = find(rows, "student", args.student_steps, scale)
        if teacher is None or student is None:
            continue
        gap = 100 * (teacher["accuracy"] - student["accuracy"])
        entry = {"s": f"{scale:g}", "teacher acc": f"{100 * teacher['accuracy']:.1f}%",
                 "student acc": f"{100 * student['accuracy']:.1f}%",
                 f"acc gap <= {ACCURACY_POINTS:g} pts": f"{gap:+.1f} pts: {verdict(gap <= ACCURACY_POINTS)}"}
        for key, label in (("fid_inception", "Inception FID"), ("fd_classifier", "FD_cls")):
            if teacher.get(key) is None or student.get(key) is None:
                entry[f"{label} ratio <= {FID_RATIO:g}"] = "not measured"
                continue
            ratio = student[key] / teacher[key]
            entry[f"{label} ratio <= {FID_RATIO:g}"] = (f"{student[key]:.2f} / {teacher[key]:.2f} = {ratio:.2f}x: "
                                                       f"{verdict(ratio <= FID_RATIO)}")
        entry["UNet evals"] = f"{student['unet_evaluations_per_image']:g} vs {teacher['unet_evaluations_per_image']:g}"
        table.append(entry)
    lines = [f"# Targets: {args.student_steps}-step guided student vs the {args.teacher_steps}-step CFG teacher", "",
             format_table(table), "", "## Accuracy rises with s (the guidance input is live)", ""]
    for sampler, steps in [("teacher DDIM", args.teacher_steps)] + sorted(
            {("student", r["steps"]) for r in rows if r["sampler"] == "student"}, key=lambda x: -x[1]):
        accuracies = [find(rows, sampler, steps, scale) for scale in scales]
        if any(row is None for row in accuracies):
            continue
        values = [row["accuracy"] for row in accuracies]
        rising = all(b > a for a, b in zip(values, values[1:]))
        shown = ", ".join(f"s={scale:g}: {100 * value:.1f}%" for scale, value in zip(scales, values))
        lines.append(f"- {sampler} {steps} steps: {shown}: {'rises' if rising else 'does NOT rise strictly'}")
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
