#!/usr/bin/env bash
# The Meta-World MT10 benchmark of a Hugging Face VLM-family teacher (docs/BENCHMARKS.md): a
# PaliGemma-architecture model built from scratch (real transformers classes, random init, sized
# for a CPU), fine-tuned into a VLA teacher, then distilled. Re-running skips finished work.
#   bash scripts/benchmark_metaworld_hf.sh [OUT_DIR]     (default: runs/hf_metaworld)
# Reuses the demos of scripts/benchmark_metaworld.sh (collected when missing). About 1 hour on
# 2 CPU cores; on a GPU workstation start from a pretrained hub model instead (README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
source scripts/ros_env.sh >/dev/null
OUT="${1:-runs/hf_metaworld}"
DEMOS="${DEMOS:-runs/metaworld/demos}"
ACT=".venv/bin/actdistill"
export MUJOCO_GL=egl HF_HUB_OFFLINE=1

# 1. Scripted-expert demos (same as the reference benchmark).
$ACT collect --tasks mt10 --episodes 50 --out "$DEMOS" --image-size 64 --horizon 200 --noise 0.1 --workers 2

# 2. A from-scratch PaliGemma: Gemma decoder 12 x 192 (4 query / 2 KV heads), SigLIP 2 x 128 at 64 px.
[[ -f "$OUT/backbone/config.json" ]] || $ACT make-backbone --family paligemma --size metaworld --out "$OUT/backbone"

# 3. Teacher: the vision tower is random, so it trains too (--train-vision).
[[ -f "$OUT/teacher/teacher/card.json" ]] || \
  $ACT train-teacher --backbone "$OUT/backbone" --train-vision --data "$DEMOS" --out "$OUT/teacher" \
    --chunk-size 8 --steps "${TEACHER_STEPS:-1000}" --batch-size 32 --lr 5e-4 --action-space metaworld \
    --checkpoint-every 100 --resume

# 4. ActDistill, one student for every keep in [0.25, 1] (config/distill.yaml); card default keep 0.5.
[[ -f "$OUT/distill/student/card.json" ]] || \
  $ACT distill --teacher "$OUT/teacher/teacher" --data "$DEMOS" --out "$OUT/distill" --config config/distill.yaml \
    --probe-steps "${PROBE_STEPS:-100}" --distill-steps "${DISTILL_STEPS:-300}" --batch-size 32 --target-keep 0.5 \
    --teacher-targets on_the_fly --resume

# 5. Closed loop on unseen seeds (10000+), 20 episodes per task; then speed, measured in one run.
for role in teacher/teacher distill/student; do
  $ACT eval-sim --policy "$OUT/$role" --tasks mt10 --episodes 20 --horizon 200 --image-size 64 \
    --out "$OUT/eval20_$(basename "$role")"
done
$ACT bench --teacher "$OUT/teacher/teacher" --student "$OUT/distill/student" --json --iters 50 | tee "$OUT/bench.json"
