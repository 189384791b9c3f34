"""Cost of distilling down to N steps as a fraction of the teacher's training cost.

    python benchmarks/distillation_cost.py --teacher_run runs/fashion/teacher --distill_run runs/fashion/pd --steps 4

Two measures: wall time (teacher `training_cost.json` vs the stages' `time_s` in `summary.json`, same machine) and
network work in forward-pass units (a training step = forward + backward ~ 3 forwards; a distillation step adds two
teacher forwards, so ~ 5 forwards per image). The paper: at most 1x; this project's target: at most 0.5x.
"""

import argparse
import json
from pathlib import Path

TRAIN_STEP_FORWARDS = 3.0      # forward + backward of the trained network
DISTILL_STEP_FORWARDS = 5.0    # two teacher forwards + the student's forward and backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher_run", required=True, help="output_dir of examples/train_teacher.py")
    parser.add_argument("--distill_run", required=True, help="output_dir of examples/train_distill.py")
    parser.add_argument("--steps", type=int, default=4, help="Count the stages down to this many steps.")
    args = parser.parse_args()
    teacher = json.loads((Path(args.teacher_run) / "teacher" / "training_cost.json").read_text())
    stages = [row for row in json.loads((Path(args.distill_run) / "summary.json").read_text()) if row["steps"] >= args.steps]
    distill_time = sum(row["time_s"] for row in stages)
    distill_images = sum(row["updates"] * row["global_batch"] for row in stages)
    teacher_work = teacher["images_seen"] * TRAIN_STEP_FORWARDS
    distill_work = distill_images * DISTILL_STEP_FORWARDS
    print(f"| measure | teacher | distillation to {args.steps} steps ({len(stages)} stages) | fraction |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {teacher['train_wall_time_s']:.0f} | {distill_time:.0f} | {distill_time / teacher['train_wall_time_s']:.3f} |")
    print(f"| images through the network | {teacher['images_seen']:,} | {distill_images:,} | {distill_images / teacher['images_seen']:.3f} |")
    print(f"| forward-pass units | {teacher_work:,.0f} | {distill_work:,.0f} | {distill_work / teacher_work:.3f} |")


if __name__ == "__main__":
    main()
