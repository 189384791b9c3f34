#!/usr/bin/env bash
# Issue 11 on one H100 (2026-11-26): the 32-iteration round's three SFD settings at ITERS = 256 iterations (8x), and
# the lu 4-NFE student at LONG = 1,024, four processes at once on the GPU; the students come back as tar parts in $OUT.
# It ran as `DEADLINE=420 bash run_h100.sh` on a machine with torch 2.11.0+cu130, the wheels of diffusers 0.42.1,
# datasets 5.2.0, dill and multiprocess carried in .whl/ (the machine reaches no index), and this repository.
# LOCAL=1 OUT=/tmp/out ITERS=1 LONG=1 bash run_h100.sh checks it on a CPU in minutes.
set -u
cd "$(dirname "$0")/../../../.."
if [ -z "${LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, diffusers, diffusers_pd, datasets; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())" || exit 1
T=benchmarks/results/fashion-mnist-cpu/teacher
R=${R:-/tmp/r}
ITERS=${ITERS:-256}
LONG=${LONG:-1024}
C="--method sfd --teacher $T --num_trajectories $((ITERS*128)) --train_batch_size 128 --learning_rate 2e-4 --checkpointing_steps 32 --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0"
K8="--grid trailing --no-afs --teacher_steps_per_step 8"
run() { local name=$1; shift; local t0=$SECONDS
  timeout "${DEADLINE:-400}" python3 examples/train_distill.py $C "$@" --output_dir "$R/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall=$((SECONDS - t0))s"; }
mkdir -p "$R"
run sfd-4 --grid lu --nfe 4 &
run sfd-2 $K8 --nfe 2 &
run sfd-v $K8 --nfe 2 3 4 5 --second_stage --second_stage_trajectories $((ITERS*128)) &
run sfd-4-long --grid lu --nfe 4 --num_trajectories $((LONG*128)) --checkpointing_steps 64 &
wait
for d in "$R"/*/; do [ -f "$d/summary.json" ] && rm -rf "$d"/checkpoint-*; done
du -sh "$R"/*
tar cf - -C "$R" . | split -b 15m - "$OUT/runs.tar."
ls -la "$OUT"

# The second call (same machine, warm), alone on the GPU: the 2-NFE trailing student at 1,024 iterations
#   timeout 320 python3 examples/train_distill.py --method sfd --teacher benchmarks/results/fashion-mnist-cpu/teacher \
#     --num_trajectories 131072 --train_batch_size 128 --learning_rate 2e-4 --checkpointing_steps 64 \
#     --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0 --grid trailing --no-afs \
#     --teacher_steps_per_step 8 --nfe 2 --output_dir /tmp/r2/sfd-2-long
