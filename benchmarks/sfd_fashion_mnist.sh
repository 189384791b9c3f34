#!/usr/bin/env bash
# SFD vs progressive distillation on the committed Fashion-MNIST benchmark teacher (issue 11's benchmark): separate
# SFD students at 4 and 2 NFE (the library's defaults), at 2, 3, 4 and 5 NFE trailing without AFS (SFD-v's setting,
# each SFD-v step count against a separate student of its setting and budget), SFD-v (one student for 2-5 NFE)
# with its 1-NFE second stage, and the 4-NFE student at the paper's learning rate; fidelity to the teacher; FID
# with the PD benchmark's protocol (5,000 samples per row, seed 0, the 10k test split), each AFS student both with
# the project's sampler (paper NFE) and its stock diffusers scheduler (NFE + 1).
# The PD students' and the teacher's rows are read from benchmarks/results/fashion-mnist-cpu/results.json (same
# teacher, same protocol), not sampled again. Scale is set by the variables below.
#
#   bash benchmarks/sfd_fashion_mnist.sh            # the 2-core CPU run reported in README (32 iterations each)
#   ITERS=1600 SECOND_ITERS=1600 bash benchmarks/sfd_fashion_mnist.sh   # the paper's 200k trajectories at batch 128
#
# Every step resumes: a finished run is skipped, a killed one continues from its checkpoint, and evaluate.py
# reuses the rows already in $RUN/eval/rows/. Add LAUNCH="accelerate launch" for several GPUs. The first, 8-iteration
# round (benchmarks/results/fashion-mnist-sfd/, "8 iterations") ran this script as of commit 2d8f5c9.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/fashion-sfd}
TEACHER=${TEACHER:-benchmarks/results/fashion-mnist-cpu/teacher}
PD_RESULTS=${PD_RESULTS:-benchmarks/results/fashion-mnist-cpu/results.json}
BATCH=${BATCH:-128}
ITERS=${ITERS:-32}                # stage-one iterations (global batches of teacher trajectories) per SFD run
SECOND_ITERS=${SECOND_ITERS:-32}  # second-stage iterations
LR=${LR:-2e-4}                    # measured better than the paper's 5e-5 at this budget (sfd-4 vs sfd-4-lr5e-5)
SAMPLES=${SAMPLES:-5000}
LAUNCH=${LAUNCH:-python}
resume() { ls -d "$1"/checkpoint-* >/dev/null 2>&1 && echo "--resume_from_checkpoint latest" || true; }
sfd() {  # sfd OUTPUT_DIR FLAGS...: one SFD run, skipped once finished (later flags override earlier ones)
  local out="$RUN/$1"; shift
  [ -f "$out/summary.json" ] || $LAUNCH examples/train_distill.py --method sfd --teacher "$TEACHER" \
    --num_trajectories $((ITERS * BATCH)) --train_batch_size "$BATCH" --learning_rate "$LR" \
    --checkpointing_steps 8 --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0 \
    --output_dir "$out" "$@" $(resume "$out")
}

# 1. the SFD runs (each run's summary.json has its wall time per stage): the 4- and 2-NFE students on the lu grid
#    with AFS, K = 4 (FID-best at 4 NFE, --grid auto there); the same on the trailing grid without AFS and K = 8 (the
#    alternative for this teacher, whose t = 1023 sits at sigma 22,026: AFS on trailing starts far from it, README);
#    SFD-v 2-5 with its second stage (measured on the trailing setting only) and the separate 3- and 5-NFE students
#    of its setting; the lu 4-NFE student at the paper's learning rate; the 2-NFE student at K = 32 (--grid auto's
#    setting below 4 NFE since the third H100 round, results/fashion-mnist-sfd/h100-k32/). STOP_AFTER=training stops here.
TRAILING=(--grid trailing --no-afs --teacher_steps_per_step 8)
sfd sfd-4 --nfe 4 --grid lu  # = --grid auto at 4 NFE
sfd sfd-2 --nfe 2 --grid lu  # lu at 2 NFE: the measurement behind --grid auto's trailing below 4 NFE
sfd sfd-v --nfe 2 3 4 5 "${TRAILING[@]}" --second_stage --second_stage_trajectories $((SECOND_ITERS * BATCH))
sfd sfd-4-trailing-k8 --nfe 4 "${TRAILING[@]}"
sfd sfd-2-trailing-k8 --nfe 2 "${TRAILING[@]}"
sfd sfd-3-trailing-k8 --nfe 3 "${TRAILING[@]}"
sfd sfd-5-trailing-k8 --nfe 5 "${TRAILING[@]}"
sfd sfd-4-lr5e-5 --nfe 4 --grid lu --learning_rate 5e-5
sfd sfd-2-trailing-k32 --nfe 2 --grid trailing --no-afs --teacher_steps_per_step 32  # = --grid auto at 2 NFE
[ "${STOP_AFTER:-}" != training ] || exit 0

# 2. fidelity on PD's yardstick (no FID, minutes): distance to the teacher's 64-step DDIM on PD's validation noise;
#    STOP_AFTER=fidelity stops here.
[ -f "$RUN/fidelity.json" ] || python benchmarks/sfd_fidelity.py --teacher "$TEACHER" --start_steps 64 \
  --students "$RUN"/sfd-*/student-*steps --output "$RUN/fidelity.json"
[ "${STOP_AFTER:-}" != fidelity ] || exit 0

# 3. FID in order of need (each call reuses the rows already finished); the teacher rows come from the PD run
common=(--teacher "$TEACHER" --dataset_name fashion_mnist --split test --nfe 1 2 4 --dpm_solver_nfe 4 8
        --teacher_steps 64 --num_samples "$SAMPLES" --batch_size 250 --seed 0 --output_dir "$RUN/eval")
python benchmarks/reuse_rows.py --from "$PD_RESULTS" -- "${common[@]}"
students=("$RUN"/sfd-4/student-4steps "$RUN"/sfd-2/student-2steps "$RUN"/sfd-v/student-{1,4,2,3,5}steps
          "$RUN"/sfd-4-trailing-k8/student-4steps "$RUN"/sfd-2-trailing-k8/student-2steps "$RUN"/sfd-4-lr5e-5/student-4steps
          "$RUN"/sfd-3-trailing-k8/student-3steps "$RUN"/sfd-5-trailing-k8/student-5steps
          "$RUN"/sfd-2-trailing-k32/student-2steps)
python examples/evaluate.py "${common[@]}" --students "${students[@]}"  # rows in this order, each kept when done

# 4. the side-by-side table, wall times and forward-pass costs against PD and the teacher, the targets, the plots
python benchmarks/sfd_report.py --sfd_run "$RUN" --pd_results "$PD_RESULTS" \
  --pd_summary benchmarks/results/fashion-mnist-cpu/distillation_summary.json \
  --teacher_cost benchmarks/results/fashion-mnist-cpu/teacher_training_cost.json --output "$RUN/report"
