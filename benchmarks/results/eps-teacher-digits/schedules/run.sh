#!/usr/bin/env bash
# Issue 13: digits teachers with other schedules / x-prediction; each distilled 64 -> 1 with the defaults (auto rule)
# at the issue's budget (400 x 64 per stage), plus the old default's first stage (v at once) for comparison.
# As run (2026-11-26). The cosine eps teacher's distillation ran before --teacher_clip_sample existed
# (summary_unclipped_*.json); its default run today is summary_auto.json: `--teacher_clip_sample auto` clips it and
# gives v students. The x teacher's auto run was repeated after x students got the lr x 4/N scaling (summary_auto.json).
set -euo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
export OMP_NUM_THREADS=1
R=runs/i13
COMMON="--dataset_name digits --resolution 8 --block_out_channels 32 48 --layers_per_block 2 --attention \
 --train_batch_size 128 --learning_rate 1e-3 --lr_warmup_steps 200 --max_train_steps 2600 --checkpointing_steps 500 \
 --checkpoints_total_limit 1 --save_images_steps 1300 --num_inference_steps 64 --num_grid_images 64 \
 --num_train_timesteps 1000 --report_to none --seed 0 --resume_from_checkpoint latest"
run() {  # name, teacher flags
  local name=$1; shift
  if [ ! -f $R/$name/teacher/model_index.json ]; then
    python examples/train_teacher.py $COMMON "$@" --output_dir $R/$name/teacher_run --teacher_dir $R/$name/teacher
  fi
  if [ ! -f $R/$name/auto/summary.json ]; then
    python examples/train_distill.py --teacher $R/$name/teacher --dataset_name digits --report_to none \
      --iterations_per_stage 400 --train_batch_size 64 --checkpointing_steps 200 --checkpoints_total_limit 1 \
      --resume_from_checkpoint latest --output_dir $R/$name/auto
  fi
  if [ ! -f $R/$name/v_at_once/summary.json ]; then
    python examples/train_distill.py --teacher $R/$name/teacher --dataset_name digits --report_to none \
      --iterations_per_stage 400 --train_batch_size 64 --end_steps 32 --prediction_type v_prediction \
      --checkpointing_steps 200 --checkpoints_total_limit 1 --resume_from_checkpoint latest --output_dir $R/$name/v_at_once
  fi
}
run eps-cosine --prediction_type epsilon --beta_schedule squaredcos_cap_v2 --loss_weighting snr
run eps-scaled-linear --prediction_type epsilon --beta_schedule scaled_linear --beta_start 0.00085 --beta_end 0.012 --loss_weighting snr
run x-linear --prediction_type sample --beta_schedule linear --loss_weighting truncated_snr
# the cosine eps teacher's first two stages at 4x the budget (summary_auto_x4_until16.json)
[ -f $R/eps-cosine/auto_x4_until16/summary.json ] || python examples/train_distill.py --teacher $R/eps-cosine/teacher \
  --dataset_name digits --report_to none --iterations_per_stage 1600 --train_batch_size 64 --end_steps 16 \
  --checkpointing_steps 400 --checkpoints_total_limit 1 --output_dir $R/eps-cosine/auto_x4_until16
echo LANE2 DONE
