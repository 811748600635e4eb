#!/usr/bin/env bash
# Closed-loop Meta-World evaluation of one policy, one eval-sim run per task, so that a killed run
# resumes where it stopped (a finished task's eval.json is kept) and a quick screen on the first
# seeds extends to the full evaluation without re-running them:
#   bash scripts/eval_by_task.sh WEIGHTS OUT [SEED_BASE] [EPISODES] [TASKS]
#   e.g. screen: ... 10000 5   then the rest of 20 per task: ... 10005 15
#   CAMERA=corner4,topview bash scripts/eval_by_task.sh ...   for a policy that takes two cameras
# Finally it prints the success per task and overall, with a 95% Wilson interval, over every
# episode found under OUT (one per task and seed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WEIGHTS="$1"; OUT="$2"; SEED_BASE="${3:-10000}"; EPISODES="${4:-20}"
TASKS="${5:-reach push pick-place door-open drawer-open drawer-close button-press-topdown peg-insert-side window-open window-close}"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p "$OUT"
for task in $TASKS; do
  run="$OUT/${task}_s${SEED_BASE}_n${EPISODES}"
  [[ -f "$run/eval.json" ]] && continue
  echo "[eval_by_task] $task: seeds $SEED_BASE..$((SEED_BASE + EPISODES - 1))"
  .venv/bin/actdistill eval-sim --policy "$WEIGHTS" --tasks "$task" --episodes "$EPISODES" --seed-base "$SEED_BASE" \
    --horizon 200 ${CAMERA:+--camera "$CAMERA"} --out "$run" > "$run.log" 2>&1 || { tail -3 "$run.log"; exit 1; }
done
.venv/bin/python - "$OUT" $TASKS <<'PY'
import json, sys
from pathlib import Path
from actdistill_ros.sim.report import wilson_interval
episodes = {}
for path in sorted(Path(sys.argv[1]).glob("*/eval.json")):
    for e in json.loads(path.read_text())["episodes"]:
        episodes[(e["task"], e["seed"])] = e["success"]
for task in sys.argv[2:]:
    runs = [s for (t, _), s in episodes.items() if t == task]
    if not runs:
        continue
    print(f"{task:22s} {sum(runs):3d}/{len(runs):3d} = {sum(runs) / len(runs):.2f}")
n, k = len(episodes), sum(episodes.values())
low, high = wilson_interval(k, n)
print(f"{'overall':22s} {k:3d}/{n:3d} = {k / n:.3f} [{low:.2f}, {high:.2f}]")
PY
