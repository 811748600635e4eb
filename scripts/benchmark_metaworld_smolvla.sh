#!/usr/bin/env bash
# The Meta-World MT10 benchmark of a SmolVLA-architecture teacher (docs/BENCHMARKS.md): SmolVLA's
# layout (SmolVLM vision tower + pixel-shuffle connector + Llama text layers, an action expert of
# interleaved self-/cross-attention layers, flow matching) at a CPU size, trained from scratch with
# LeRobot's conventions into a LeRobot SmolVLA directory, distilled, evaluated closed loop and timed.
# Re-running skips finished work; a killed step resumes.
#   bash scripts/benchmark_metaworld_smolvla.sh [OUT_DIR]     (default: runs/smolvla_mt10)
# Reuses the 128 px demos of scripts/benchmark_metaworld.sh (collected when missing). About 2 hours
# on one CPU core of a shared machine (training 48 min, distillation 8 min, evaluation 10-20 min per 200 episodes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/smolvla_mt10}"
DEMOS="${DEMOS:-runs/metaworld/demos128}"
ACT=".venv/bin/actdistill"
EPISODES="${EPISODES:-20}"
export MUJOCO_GL=egl HF_HUB_OFFLINE=1

# 1. Scripted-expert demos (the reference benchmark's 128 px set).
$ACT collect --tasks mt10 --episodes 50 --out "$DEMOS" --image-size 128 --horizon 200 --noise 0.1 --workers 2

# 2. Teacher: SmolVLM 4 x 128 vision (16 px patches, 128 px: 16 image tokens after the shuffle),
#    8 text layers x 192, expert width 0.75, chunk 8 (all 8 executed by LeRobot; eval-sim runs 4), 10 steps.
[[ -f "$OUT/teacher_run/teacher/model.safetensors" ]] || \
  $ACT train-teacher --family smolvla --size metaworld --data "$DEMOS" --out "$OUT/teacher_run" \
    --steps "${TEACHER_STEPS:-4000}" --batch-size 32 --action-space metaworld --resume

# 3. ActDistill, one student for every keep in [0.25, 1] (config/distill.yaml); card default keep 0.5.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$OUT/teacher_run/teacher" --data "$DEMOS" --out "$OUT/distill" --config config/distill.yaml \
    --probe-steps "${PROBE_STEPS:-100}" --distill-steps "${DISTILL_STEPS:-400}" --batch-size 32 --resume

# 4. Speed and FLOPs: per part (vision, prefix, expert) per keep, then teacher and student end to end,
#    interleaved in one run.
$ACT bench --teacher "$OUT/teacher_run/teacher" --keep-fractions 1.0 0.5 0.3 --iters 20 --json | tee "$OUT/bench_parts.json"
for keep in 0.5 0.3; do
  $ACT bench --teacher "$OUT/teacher_run/teacher" --student "$OUT/distill/student" --keep-fraction "$keep" --iters 100 \
    --json | tee "$OUT/bench_keep$keep.json"
done

# 5. Closed loop on unseen seeds (10000+): the teacher whole, the student at keep 0.5 and 0.3.
$ACT eval-sim --policy "$OUT/distill/student" --teacher "$OUT/teacher_run/teacher" --sweep-keep 0.5 0.3 \
  --tasks mt10 --episodes "$EPISODES" --horizon 200 --image-size 128 --out "$OUT/sweep_keep" --resume
