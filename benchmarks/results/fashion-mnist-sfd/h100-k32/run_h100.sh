#!/usr/bin/env bash
# The third GPU round (one H100, 2026-11-27), one call: (1) issue 12's SD-1.5-shaped memory / step-time rows, all six
# options on this one machine (the H200 round measured three); (2) issue 11's SFD runs at the H100 round's 256
# iterations, alone on the GPU after (1): the 2-NFE trailing student with K = 32 (the K = 8 one sat on its targets'
# floor, 0.0431) and the separate 3- and 5-NFE students of SFD-v's setting (trailing, no AFS, K = 8), all at once.
# Machine: torch 2.11.0+cu130; diffusers 0.42.1, datasets 5.2.0, dill, multiprocess carried as wheels in .whl/,
# bitsandbytes 0.50.2 carried unpacked in .whl/site with its CUDA 13.0 library only (the wheel is 43 MB).
# LOCAL=1 OUT=/tmp/out ITERS=1 SKIP_MEMORY=1 bash run_h100.sh checks the SFD part on a CPU.
set -u
cd "$(dirname "$0")/../../../.."
if [ -z "${LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD/src
fi
export PYTHONUNBUFFERED=1
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, diffusers, diffusers_pd, datasets; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())" || exit 1
if [ -z "${SKIP_MEMORY:-}" ]; then
  python3 -c "import bitsandbytes, torch; p = torch.nn.Parameter(torch.ones(4096, device='cuda')); o = bitsandbytes.optim.Adam8bit([p]); p.grad = torch.ones_like(p); o.step(); print('bitsandbytes', bitsandbytes.__version__, 'steps:', p[0].item())"
  python3 benchmarks/memory_options.py --device cuda --model sd15 --batch_size 8 --repeats 5 | tee "$OUT/memory_sd15.md"
  echo "memory rows done at $((SECONDS - START)) s"
fi
T=benchmarks/results/fashion-mnist-cpu/teacher
R=${R:-/tmp/r}
ITERS=${ITERS:-256}
END=${END:-520}  # seconds after START by which every run has stopped (the call's limit is above it)
C="--method sfd --teacher $T --num_trajectories $((ITERS*128)) --train_batch_size 128 --learning_rate 2e-4 --checkpointing_steps 32 --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0 --grid trailing --no-afs"
run() { local name=$1; shift; local t0=$SECONDS left=$((END - (SECONDS - START)))
  timeout "$left" python3 examples/train_distill.py $C "$@" --output_dir "$R/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall=$((SECONDS - t0))s"; }
mkdir -p "$R"
run sfd-2-trailing-k32 --nfe 2 --teacher_steps_per_step 32 &
run sfd-3-trailing-k8 --nfe 3 --teacher_steps_per_step 8 &
run sfd-5-trailing-k8 --nfe 5 --teacher_steps_per_step 8 &
wait
for d in "$R"/*/; do [ -f "$d/summary.json" ] && rm -rf "$d"/checkpoint-*; done
du -sh "$R"/*
tar cf - -C "$R" . | split -b 15m - "$OUT/runs.tar."
ls -la "$OUT"
