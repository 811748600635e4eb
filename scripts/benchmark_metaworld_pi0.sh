#!/usr/bin/env bash
# The Meta-World MT10 benchmark of a pi0-architecture teacher (docs/BENCHMARKS.md, "pi0"): pi0's
# layout (SigLIP vision tower, Gemma VLM, Gemma action expert attending jointly over every VLM
# layer's keys/values, flow matching) at a CPU size, trained from scratch into a LeRobot pi0
# directory; the routed student (keep 0.5 and 0.3 from one run) against static students that keep
# the first k or evenly spaced k VLM + expert layers (same steps and losses), closed loop and timed.
# Re-running skips finished work; a killed step resumes.
#   bash scripts/benchmark_metaworld_pi0.sh [OUT_DIR]     (default: runs/pi0_mt10)
# Reuses the 128 px demos of scripts/benchmark_metaworld.sh (collected when missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/pi0_mt10}"
DEMOS="${DEMOS:-runs/metaworld/demos128}"
ACT=".venv/bin/actdistill"
EPISODES="${EPISODES:-20}"
export MUJOCO_GL=egl HF_HUB_OFFLINE=1

# 1. Scripted-expert demos (the reference benchmark's 128 px set).
$ACT collect --tasks mt10 --episodes 50 --out "$DEMOS" --image-size 128 --horizon 200 --noise 0.1 --workers 2

# 2. Teacher: SigLIP 4 x 128 (16 px patches at 96 px: 36 image tokens), Gemma VLM 8 x 192 and expert
#    8 x 128 (head_dim 48, one key/value head), 16 prompt tokens, chunk 8, 10 flow steps.
[[ -f "$OUT/teacher_run/teacher/model.safetensors" ]] || \
  $ACT train-teacher --family pi0 --size metaworld --data "$DEMOS" --out "$OUT/teacher_run" \
    --steps "${TEACHER_STEPS:-4000}" --batch-size 32 --action-space metaworld --resume

# 3. ActDistill, one student for every keep in [0.25, 1] (config/distill.yaml); card default keep 0.5.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$OUT/teacher_run/teacher" --data "$DEMOS" --out "$OUT/distill" --config config/distill.yaml \
    --probe-steps "${PROBE_STEPS:-100}" --distill-steps "${DISTILL_STEPS:-600}" --batch-size 32 --resume

# 4. Speed and FLOPs: per part per keep, then teacher and student end to end, interleaved.
$ACT bench --teacher "$OUT/teacher_run/teacher" --keep-fractions 1.0 0.5 0.3 --iters 20 --json | tee "$OUT/bench_parts.json"
$ACT bench --teacher "$OUT/teacher_run/teacher" --student "$OUT/distill/student" --keep-fraction 0.5 --iters 100 \
  --json | tee "$OUT/bench.json"

# 5. Closed loop on unseen seeds (10000+): the teacher whole, the routed student at keep 0.5 and 0.3.
$ACT eval-sim --policy "$OUT/distill/student" --teacher "$OUT/teacher_run/teacher" --sweep-keep 0.5 0.3 \
  --tasks mt10 --episodes "$EPISODES" --horizon 200 --image-size 128 --out "$OUT/sweep_keep" --resume
