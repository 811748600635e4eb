#!/usr/bin/env bash
# The Meta-World MT10 benchmark of a pi0-architecture teacher (docs/BENCHMARKS.md, "pi0"): pi0's
# layout (SigLIP vision tower, Gemma VLM, Gemma action expert attending jointly over every VLM
# layer's keys/values, flow matching) at a CPU size, trained from scratch into a LeRobot pi0
# directory; the routed student (keep 0.5 and 0.3 from one run) against static students that keep
# the first k or evenly spaced k VLM + expert layer pairs at equal chunk FLOPs (same steps and losses),
# closed loop and timed.
# Re-running skips finished work; a killed step resumes.
#   bash scripts/benchmark_metaworld_pi0.sh [OUT_DIR]     (default: runs/pi0_mt10)
# Smaller runs: TEACHER_STEPS, PROBE_STEPS, DISTILL_STEPS, EPISODES, TASKS, HORIZON, BENCH_ITERS.
# Reuses the 128 px demos of scripts/benchmark_metaworld.sh (collected when missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/pi0_mt10}"
DEMOS="${DEMOS:-runs/metaworld/demos128}"
ACT=".venv/bin/actdistill"
EPISODES="${EPISODES:-20}"
TASKS="${TASKS:-mt10}"
HORIZON="${HORIZON:-200}"
ITERS="${BENCH_ITERS:-100}"
export MUJOCO_GL=egl HF_HUB_OFFLINE=1

# 1. Scripted-expert demos (the reference benchmark's 128 px set), collected only when missing: an
#    existing set is only read.
[[ -d "$DEMOS" ]] || \
  $ACT collect --tasks mt10 --episodes 50 --out "$DEMOS" --image-size 128 --horizon 200 --noise 0.1 --workers 2

# 2. Teacher: SigLIP 4 x 128 (16 px patches at 96 px: 36 image tokens), Gemma VLM 8 x 192 and expert
#    8 x 128 (head_dim 48, one key/value head), 16 prompt tokens, chunk 8, 10 flow steps.
[[ -f "$OUT/teacher_run/teacher/model.safetensors" ]] || \
  $ACT train-teacher --family pi0 --size metaworld --data "$DEMOS" --out "$OUT/teacher_run" \
    --steps "${TEACHER_STEPS:-4000}" --batch-size 32 --action-space metaworld --resume
TEACHER="$OUT/teacher_run/teacher"
STEPS=(--probe-steps "${PROBE_STEPS:-100}" --distill-steps "${DISTILL_STEPS:-600}" --batch-size 32)

# 3. ActDistill, one routed student for every keep in [0.25, 1] (config/distill.yaml); card default keep 0.5.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$TEACHER" --data "$DEMOS" --out "$OUT/distill" --config config/distill.yaml "${STEPS[@]}" \
    --resume

# 4. The static recipe: the first k / evenly spaced k of the 7 routed VLM layers, each with its paired
#    expert layer, k chosen so that a chunk costs what the routed student's does at keep 0.5 / 0.3
#    (--static-drop-expert); same config, steps and losses (less the router's). Stage 1 (probe heads
#    on the frozen teacher, same seed and steps) is the routed run's, copied.
STATIC=()
for kind in first even; do
  for keep in 0.5 0.3; do
    dir="$OUT/static_${kind}_${keep}"
    mkdir -p "$dir"
    [[ -f "$dir/teacher_heads.safetensors" ]] || cp "$OUT/distill/teacher_heads.safetensors" "$dir/"
    [[ -f "$dir/student/card.json" ]] || \
      $ACT distill --teacher "$TEACHER" --data "$DEMOS" --out "$dir" --config config/distill.yaml "${STEPS[@]}" \
        --static-layers "$kind" --static-drop-expert --target-keep "$keep" --resume
    STATIC+=(--static-student "$dir/student")
  done
done

# 5. Speed and FLOPs: per part per keep; then each student against the teacher end to end, interleaved.
$ACT bench --teacher "$TEACHER" --keep-fractions 1.0 0.5 0.3 --iters 20 --json | tee "$OUT/bench_parts.json"
for keep in 0.5 0.3; do
  $ACT bench --teacher "$TEACHER" --student "$OUT/distill/student" --keep-fraction "$keep" --iters "$ITERS" --json \
    | tee "$OUT/bench_routed_${keep}.json"
  for kind in first even; do
    $ACT bench --teacher "$TEACHER" --student "$OUT/static_${kind}_${keep}/student" --keep-fraction "$keep" \
      --iters "$ITERS" --json | tee "$OUT/bench_static_${kind}_${keep}.json"
  done
done

# 6. Closed loop on unseen seeds (10000+), all on the same seeds: the teacher whole, the routed
#    student at keep 0.5 and 0.3, the four static students at their own k (chunk GFLOPs per point).
$ACT eval-sim --policy "$OUT/distill/student" --teacher "$TEACHER" --sweep-keep 0.5 0.3 "${STATIC[@]}" \
  --tasks "$TASKS" --episodes "$EPISODES" --horizon "$HORIZON" --image-size 128 --out "$OUT/sweep_keep" --resume
