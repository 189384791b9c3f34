#!/usr/bin/env bash
# Offline guided-distillation benchmark (issue 12): a small latent text-to-image teacher on Fashion-MNIST, its guided
# students (one UNet call per step) at 8, 4, 2 and 1 steps, and the teacher with classifier-free guidance (two calls per
# step) side by side at s = 1, 3, 5, every row sampled by the stock StableDiffusionPipeline.
#
#   bash benchmarks/text_to_image_fashion.sh        # the 2-core CPU run in README (about 1.5 h at 1 thread)
#
# A finished step is skipped; the evaluation keeps finished rows. Results land in $RESULTS (committed); the captioned
# imagefolder, distillation run and sampled images in $RUN (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/t2i}
RESULTS=${RESULTS:-benchmarks/results/text-to-image-fashion}
VAE_STEPS=${VAE_STEPS:-600}
UNET_STEPS=${UNET_STEPS:-1800}
GUIDED=${GUIDED:-1000}           # guided-stage updates (250 left the guidance input half-live: README)
K=${K:-1000}                     # updates per halving (250 left the 4-step student 6x its own DDIM's distance)
END_STEPS=${END_STEPS:-1}
BATCH=${BATCH:-64}
SAMPLES=${SAMPLES:-500}          # images per evaluation row (50 per prompt)
REFERENCE=${REFERENCE:-1000}     # test images of the Inception reference
INCEPTION_ROWS=${INCEPTION_ROWS:-"teacher-ddim64-s1 teacher-ddim64-s3 teacher-ddim64-s5 student4-s1 student4-s3 student4-s5"}  # the targets' pairs

# 1. the teacher pipeline (<= 10 MB) and the captioned imagefolder the distillation reads (a committed teacher is
#    kept: on a fresh clone this step only writes the imagefolder)
[ -f "$RESULTS/teacher/model_index.json" ] && [ -f "$RUN/captioned/metadata.jsonl" ] || python benchmarks/text_to_image_teacher.py \
  --output_dir "$RESULTS/teacher" --data_dir "$RUN/captioned" --work_dir "$RUN/teacher-work" --num_data_images 4000 \
  --vae_steps "$VAE_STEPS" --unet_steps "$UNET_STEPS"

# 2. the classifier that scores prompted-class accuracy
[ -f "$RESULTS/classifier/classifier.pt" ] || python benchmarks/fashion_classifier.py --output_dir "$RESULTS/classifier"

# 3. guided distillation (stage one at 8 steps) then halvings 8 -> ... -> END_STEPS, s in [1, 5]
[ -f "$RUN/distill/summary.json" ] || python examples/train_distill.py --teacher "$RESULTS/teacher" \
  --train_data_dir "$RUN/captioned" --caption_column text --resolution 32 --guidance_scale_min 1 --guidance_scale_max 5 \
  --start_steps 8 --end_steps "$END_STEPS" --guidance_iterations "$GUIDED" --iterations_per_stage "$K" --train_batch_size "$BATCH" \
  --checkpointing_steps 200 --checkpoints_total_limit 1 --num_validation_samples 64 --report_to none --seed 0 \
  --output_dir "$RUN/distill"

# 4. every row through the stock pipeline (the teacher's rows need no student: they may run during step 3);
#    Inception FID for the target rows
python benchmarks/text_to_image_eval.py --teacher "$RESULTS/teacher" --students "$RUN"/distill/student-*steps \
  --classifier_dir "$RESULTS/classifier" --guidance_scales 1 3 5 --teacher_steps 64 --teacher_nfe_steps 4 8 \
  --dpm_solver_steps 4 8 --num_samples "$SAMPLES" --inception_rows $INCEPTION_ROWS --num_reference "$REFERENCE" \
  --output_dir "$RUN/eval"
mkdir -p "$RESULTS/samples"
cp "$RUN"/eval/{results.json,results.md,quality_vs_unet_evaluations.png} "$RESULTS/"
cp "$RUN"/eval/samples/*.png "$RESULTS/samples/"
cp "$RUN"/distill/summary.{json,md} "$RESULTS/"
python benchmarks/text_to_image_targets.py --results "$RESULTS/results.json" --output "$RESULTS/targets.md"
