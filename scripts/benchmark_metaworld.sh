#!/usr/bin/env bash
# The Meta-World MT10 benchmark of docs/BENCHMARKS.md, end to end. Every step is resumable:
# re-running skips finished work (collected bags, finished training stages).
#   bash scripts/benchmark_metaworld.sh [OUT_DIR]      (default: runs/metaworld)
# Sized for a 2-core CPU machine (~2-3 hours); on a GPU workstation raise the steps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/metaworld}"
ACT=".venv/bin/actdistill"
export MUJOCO_GL=egl

# 1. Scripted-expert demos as rosbags: MT10, 50 successful episodes per task, 64 px, noisy execution.
$ACT collect --tasks mt10 --episodes 50 --out "$OUT/demos" --image-size 64 --horizon 200 --noise 0.1 --workers 2

# 2. Teacher: reference VLA, 12 layers of width 192, 64 px input with 16 px patches (34 tokens).
[[ -f "$OUT/teacher/teacher/card.json" ]] || \
  $ACT train-teacher --data "$OUT/demos" --out "$OUT/teacher" --size default --image-size 64 --patch-size 16 \
    --width 192 --layers 12 --heads 4 --chunk-size 8 --steps "${TEACHER_STEPS:-2000}" --batch-size 32 --lr 5e-4 \
    --action-space metaworld --checkpoint-every 200 --resume

# 3. ActDistill: stage 1 + stage 2 (config/distill.yaml), target: execute half of the layers.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$OUT/teacher/teacher" --data "$OUT/demos" --out "$OUT/distill" \
    --config config/distill.yaml --probe-steps "${PROBE_STEPS:-150}" --distill-steps "${DISTILL_STEPS:-500}" \
    --batch-size 32 --target-keep 0.5 --resume

# 4. Closed loop on unseen seeds (10000+), 20 episodes per task, teacher and student.
$ACT eval-sim --policy "$OUT/teacher/teacher" --tasks mt10 --episodes 20 --horizon 200 --image-size 64 \
  --out "$OUT/eval_teacher"
$ACT eval-sim --policy "$OUT/distill/student" --tasks mt10 --episodes 20 --horizon 200 --image-size 64 \
  --out "$OUT/eval_student" --gif

# 5. Speed of the same two models, measured in one run.
$ACT bench --teacher "$OUT/teacher/teacher" --student "$OUT/distill/student" --json | tee "$OUT/bench.json"
