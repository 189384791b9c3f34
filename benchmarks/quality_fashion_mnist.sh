#!/usr/bin/env bash
# Quality benchmark: a Fashion-MNIST teacher (v-prediction, cosine schedule) distilled from START_STEPS down to 1
# step, every stage evaluated by FID against the 10k test split, next to the teacher's DDIM and DPM-Solver++(2M) at
# the same NFE and the teacher at 256 steps. Scale is set by the variables below (defaults: the full GPU run of the
# issue; README's Results section names the values each reported run used).
#
#   bash benchmarks/quality_fashion_mnist.sh                     # full run (GPU)
#   TEACHER_STEPS=4000 K=300 SAMPLES=1000 bash benchmarks/quality_fashion_mnist.sh   # a CPU-sized preview
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/fashion}
TEACHER_STEPS=${TEACHER_STEPS:-60000}   # teacher updates (batch BATCH)
BATCH=${BATCH:-128}
CHANNELS=${CHANNELS:-"64 128 128"}
START_STEPS=${START_STEPS:-256}
K=${K:-5000}                            # distillation updates per halving
SAMPLES=${SAMPLES:-5000}                # samples per FID row
LAUNCH=${LAUNCH:-"accelerate launch"}

# 1. the teacher (Algorithm 1); its cost (images seen, wall time) lands in teacher/training_cost.json
[ -f "$RUN/teacher/teacher/model_index.json" ] || $LAUNCH examples/train_teacher.py --dataset_name fashion_mnist \
  --resolution 28 --block_out_channels $CHANNELS --layers_per_block 2 --attention --train_batch_size "$BATCH" \
  --max_train_steps "$TEACHER_STEPS" --learning_rate 2e-4 --ema_decay 0.9995 --checkpointing_steps 2000 \
  --checkpoints_total_limit 1 --report_to none --output_dir "$RUN/teacher" ${RESUME:+--resume_from_checkpoint latest}

# 2. progressive distillation START_STEPS -> 1 (Algorithm 2)
[ -f "$RUN/pd/summary.json" ] || $LAUNCH examples/train_distill.py --teacher "$RUN/teacher/teacher" \
  --dataset_name fashion_mnist --start_steps "$START_STEPS" --end_steps 1 --iterations_per_stage "$K" \
  --train_batch_size "$BATCH" --learning_rate 1e-4 --loss_weighting truncated_snr --checkpointing_steps 1000 \
  --checkpoints_total_limit 1 --report_to none --output_dir "$RUN/pd" ${RESUME:+--resume_from_checkpoint latest}

# 3. FID vs NFE for every stage
students=$(ls -d "$RUN"/pd/student-*steps | sort -t- -k2 -n -r)
python examples/evaluate.py --teacher "$RUN/teacher/teacher" --students $students \
  --dataset_name fashion_mnist --split test --nfe 1 2 4 8 16 --teacher_steps 256 \
  --num_samples "$SAMPLES" --batch_size 250 --seed 0 --output_dir "$RUN/eval"

# 4. cost of distillation to 4 steps as a fraction of the teacher's training cost (images through the network)
python benchmarks/distillation_cost.py --teacher_run "$RUN/teacher" --distill_run "$RUN/pd" --steps 4 | tee "$RUN/cost.md"
