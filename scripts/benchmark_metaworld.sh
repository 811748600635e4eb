#!/usr/bin/env bash
# The Meta-World MT10 benchmark of docs/BENCHMARKS.md, end to end: the shipped teacher and student,
# the compute-dial sweep against static layer skipping, and the speed of both models. Every step
# is resumable: re-running skips finished work (collected bags, finished training, swept points).
#   bash scripts/benchmark_metaworld.sh [OUT_DIR]      (default: runs/metaworld)
# Sized for a 2-core CPU machine (about 4 hours); on a GPU workstation raise the steps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/metaworld}"
ACT=".venv/bin/actdistill"
export MUJOCO_GL=egl

# 1. Scripted-expert demos as rosbags: MT10, 50 successful episodes per task, noisy execution; the same
#    episodes rendered at 64 px (to train the teacher cheaply) and at 128 px (to fine-tune it).
$ACT collect --tasks mt10 --episodes 50 --out "$OUT/demos" --image-size 64 --horizon 200 --noise 0.1 --workers 2
$ACT collect --tasks mt10 --episodes 50 --out "$OUT/demos128" --image-size 128 --horizon 200 --noise 0.1 --workers 2

# 2. Teacher: reference VLA, 12 layers of width 192, 64 px input with 16 px patches (34 tokens):
#    2,000 steps, then 4,000 more from those weights at a lower learning rate; then 3,000 steps at
#    128 px (64 image tokens, 82 in all), its position embeddings resampled to the finer patch grid.
[[ -f "$OUT/teacher/teacher/card.json" ]] || \
  $ACT train-teacher --data "$OUT/demos" --out "$OUT/teacher" --size default --image-size 64 --patch-size 16 \
    --width 192 --layers 12 --heads 4 --chunk-size 8 --steps 2000 --batch-size 32 --lr 5e-4 \
    --action-space metaworld --checkpoint-every 200 --resume
[[ -f "$OUT/teacher2/teacher/card.json" ]] || \
  $ACT train-teacher --data "$OUT/demos" --out "$OUT/teacher2" --init-from "$OUT/teacher/teacher" --steps 4000 \
    --batch-size 32 --lr 3e-4 --action-space metaworld --checkpoint-every 200 --resume
[[ -f "$OUT/teacher128/teacher/card.json" ]] || \
  $ACT train-teacher --data "$OUT/demos128" --out "$OUT/teacher128" --init-from "$OUT/teacher2/teacher" \
    --image-size 128 --steps 3000 --batch-size 32 --lr 3e-4 --action-space metaworld --checkpoint-every 200 --resume
TEACHER="$OUT/teacher128/teacher"

# 3. ActDistill: one student for every keep in [0.25, 1] (config/distill.yaml); card default keep 0.5.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$TEACHER" --data "$OUT/demos128" --out "$OUT/distill" --config config/distill.yaml \
    --probe-steps 150 --distill-steps "${DISTILL_STEPS:-1500}" --batch-size 32 --target-keep 0.5 \
    --teacher-targets on_the_fly --resume

# 4. "Train a smaller model": the teacher's first 6 layers fine-tuned for as many steps as stage 2.
[[ -f "$OUT/truncated6/teacher/card.json" ]] || \
  $ACT train-teacher --data "$OUT/demos128" --out "$OUT/truncated6" --init-from "$TEACHER" --layers 6 \
    --steps "${DISTILL_STEPS:-1500}" --batch-size 32 --lr 3e-4 --action-space metaworld --checkpoint-every 200 --resume

# 5. Closed loop on unseen seeds (10000+), 20 episodes per task: the student over the dial against
#    the teacher's first / evenly spaced / random k layers and the fine-tuned truncated model.
$ACT eval-sim --policy "$OUT/distill/student" --teacher "$TEACHER" --finetuned-truncated "$OUT/truncated6/teacher" \
  --sweep-keep 0.3 0.4 0.5 0.6 0.8 1.0 --tasks mt10 --episodes 20 --horizon 200 --image-size 128 \
  --out "$OUT/sweep_keep" --resume

# 6. Speed of the two models, measured in one run.
$ACT bench --teacher "$TEACHER" --student "$OUT/distill/student" --json | tee "$OUT/bench.json"
