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


def distillation_cost(teacher_run: str, distill_run: str, steps: int) -> dict:
    """Teacher training cost and the cost of the distillation stages down to `steps`, in three measures."""
    teacher = json.loads((Path(teacher_run) / "teacher" / "training_cost.json").read_text())
    stages = [row for row in json.loads((Path(distill_run) / "summary.json").read_text()) if row["steps"] >= steps]
    distill_images = sum(row["updates"] * row["global_batch"] for row in stages)
    return {
        "steps": steps,
        "stages": len(stages),
        "wall_time_s": (teacher["train_wall_time_s"], sum(row["time_s"] for row in stages)),
        "images": (teacher["images_seen"], distill_images),
        "forward_units": (teacher["images_seen"] * TRAIN_STEP_FORWARDS, distill_images * DISTILL_STEP_FORWARDS),
    }


def cost_table(cost: dict) -> str:
    """Markdown table of `distillation_cost`: each measure, both costs and their fraction."""
    lines = [
        f"| measure | teacher | distillation to {cost['steps']} steps ({cost['stages']} stages) | fraction |",
        "|---|---|---|---|",
    ]
    for label, key, spec in [("wall time (s)", "wall_time_s", ",.0f"), ("images through the network", "images", ","),
                             ("forward-pass units", "forward_units", ",.0f")]:
        teacher, distill = cost[key]
        lines.append(f"| {label} | {teacher:{spec}} | {distill:{spec}} | {distill / teacher:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher_run", required=True, help="output_dir of examples/train_teacher.py")
    parser.add_argument("--distill_run", required=True, help="output_dir of examples/train_distill.py")
    parser.add_argument("--steps", type=int, default=4, help="Count the stages down to this many steps.")
    args = parser.parse_args()
    print(cost_table(distillation_cost(args.teacher_run, args.distill_run, args.steps)), end="")


if __name__ == "__main__":
    main()
