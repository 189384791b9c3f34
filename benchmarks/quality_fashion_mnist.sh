#!/usr/bin/env bash
# Quality benchmark: a Fashion-MNIST teacher (v-prediction, cosine schedule) distilled from START_STEPS down to 1
# step; FID (5,000 samples per row, same noise for every row) against the 10k test split for the students, the
# teacher's DDIM and DPM-Solver++(2M) at equal NFE and the teacher at START_STEPS (the ceiling); the issue's targets
# and the distillation cost as a fraction of the teacher's. Scale is set by the variables below.
#
#   bash benchmarks/quality_fashion_mnist.sh                  # the 2-core CPU run reported in README (about 2.5 h)
#   TEACHER_STEPS=60000 CHANNELS="64 128 128" LAYERS=2 TEACHER_LR=2e-4 EMA=0.9999 START_STEPS=256 K=4000 \
#     DISTILL_LR=1e-4 RUN=runs/fashion-gpu bash benchmarks/quality_fashion_mnist.sh   # a GPU-sized run
#
# Every step resumes: a finished teacher or distillation is skipped, a killed one continues from its checkpoint,
# and evaluate.py reuses the rows already in $RUN/eval/rows/. Add LAUNCH="accelerate launch" for several GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/fashion-cpu}
TEACHER_STEPS=${TEACHER_STEPS:-2500}     # teacher updates at batch BATCH
BATCH=${BATCH:-128}
CHANNELS=${CHANNELS:-"32 64 64"}
LAYERS=${LAYERS:-1}
TEACHER_LR=${TEACHER_LR:-1e-3}
EMA=${EMA:-0.999}
START_STEPS=${START_STEPS:-64}           # the teacher's sampling steps: the first stage's 2N and the ceiling row
K=${K:-180}                              # distillation updates per halving (4 K x 5 <= 0.5 x TEACHER_STEPS x 3)
DISTILL_LR=${DISTILL_LR:-3e-4}
SAMPLES=${SAMPLES:-5000}                 # samples per FID row
LAUNCH=${LAUNCH:-python}
resume() { ls -d "$1"/checkpoint-* >/dev/null 2>&1 && echo "--resume_from_checkpoint latest" || true; }

# 1. the teacher (Algorithm 1); its cost (images seen, wall time) lands in teacher/training_cost.json
[ -f "$RUN/teacher/teacher/model_index.json" ] || $LAUNCH examples/train_teacher.py --dataset_name fashion_mnist \
  --resolution 28 --block_out_channels $CHANNELS --layers_per_block "$LAYERS" --attention \
  --train_batch_size "$BATCH" --learning_rate "$TEACHER_LR" --lr_warmup_steps 200 --max_train_steps "$TEACHER_STEPS" \
  --ema_decay "$EMA" --checkpointing_steps 250 --checkpoints_total_limit 1 --save_images_steps 1250 \
  --num_inference_steps "$START_STEPS" --num_grid_images 64 --report_to none --seed 0 --output_dir "$RUN/teacher" \
  $(resume "$RUN/teacher")

# 2. progressive distillation START_STEPS -> 1 (Algorithm 2)
[ -f "$RUN/pd/summary.json" ] || $LAUNCH examples/train_distill.py --teacher "$RUN/teacher/teacher" \
  --dataset_name fashion_mnist --start_steps "$START_STEPS" --end_steps 1 --iterations_per_stage "$K" \
  --train_batch_size "$BATCH" --learning_rate "$DISTILL_LR" --loss_weighting truncated_snr \
  --checkpointing_steps $((K / 2)) --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0 \
  --output_dir "$RUN/pd" $(resume "$RUN/pd")

# 3. FID vs NFE in order of need (each call reuses the rows already finished): the rows the targets need, the
#    teacher at the students' NFEs, then 8 steps. DPM-Solver++(2M) at NFE 1 and 2 is DDIM, so it starts at 4.
common=(--teacher "$RUN/teacher/teacher" --dataset_name fashion_mnist --split test --teacher_steps "$START_STEPS"
        --num_samples "$SAMPLES" --batch_size 250 --seed 0 --output_dir "$RUN/eval")
students=("$RUN"/pd/student-{4,2,1}steps)
python examples/evaluate.py "${common[@]}" --students "${students[@]}" --nfe 4 --dpm_solver_nfe 8
python examples/evaluate.py "${common[@]}" --students "${students[@]}" --nfe 1 2 4 --dpm_solver_nfe 4 8
python examples/evaluate.py "${common[@]}" --students "$RUN/pd/student-8steps" "${students[@]}" --nfe 1 2 4 8 \
  --dpm_solver_nfe 4 8

# 4. the targets and the cost of distillation to 4 steps as a fraction of the teacher's training cost
python benchmarks/quality_targets.py --results "$RUN/eval/results.json" --teacher_run "$RUN/teacher" \
  --distill_run "$RUN/pd" --output "$RUN/targets.md"
