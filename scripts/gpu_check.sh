#!/usr/bin/env bash
# GPU readiness check, in under 5 minutes on a CUDA machine: the CUDA / bf16 tests (pytest marker
# `cuda`), `actdistill bench` (float32 and bf16; the shipped Meta-World models too when present) and
# `actdistill bench-node`, then the figures to paste into docs/BENCHMARKS.md.
# Without CUDA it says so in one line and exits 0 without running anything.
#   bash scripts/gpu_check.sh            (after `make setup`)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
[[ -x "$PY" ]] || PY="$(command -v python3)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here; nothing run"
  exit 0
fi
source scripts/ros_env.sh >/dev/null
OUT="$(mktemp -d "${TMPDIR:-/tmp}/actdistill_gpu_check.XXXXXX")"
BUDGET_S=285  # the whole script stays under 5 minutes: each step gets at most what is left
FAILED=()

# step NAME CAP_S COMMAND...: run with a timeout of min(CAP_S, time left); output to $OUT/NAME.log.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 15)); then
    echo "gpu_check: $name skipped (time budget spent)" >&2; FAILED+=("$name (skipped)"); return
  fi
  ((cap > left)) && cap=$left
  echo "gpu_check: $name (at most ${cap}s)..." >&2
  if ! timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1; then
    FAILED+=("$name"); echo "gpu_check: $name FAILED; last lines of $OUT/$name.log:" >&2
    tail -n 15 "$OUT/$name.log" >&2
  fi
}

mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" test/test_*.py)
step cuda_tests 100 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
BENCH=(bench --device cuda --iters 200 --warmup 20 --json)
step bench_fp32 40 "$PY" -m actdistill_ros.cli "${BENCH[@]}" --dtype float32
step bench_bf16 40 "$PY" -m actdistill_ros.cli "${BENCH[@]}" --dtype bfloat16
step bench_node 100 "$PY" -m actdistill_ros.cli bench-node --device cuda --duration 20 --json "$OUT/bench_node.json"
step bench_keep_bf16 30 "$PY" -m actdistill_ros.cli "${BENCH[@]}" --dtype bfloat16 --keep-fraction 0.5
SHIPPED=weights/metaworld
if [[ -f "$SHIPPED/student/card.json" && -f "$SHIPPED/teacher/card.json" ]]; then
  for dtype in float32 bfloat16; do
    step "bench_shipped_$dtype" 30 "$PY" -m actdistill_ros.cli "${BENCH[@]}" --dtype "$dtype" \
      --teacher "$SHIPPED/teacher" --student "$SHIPPED/student"
  done
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])


def last_json(name):
    """The JSON object a step printed last (bench prints one line; bench-node writes a file)."""
    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log = out / f"{name}.log"
    for line in reversed(log.read_text(errors="replace").splitlines() if log.is_file() else []):
        if line.startswith("{"):
            return json.loads(line)
    return None


print(f"\n### GPU figures ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda})\n")
tests = (out / "cuda_tests.log").read_text(errors="replace").strip().splitlines() if (out / "cuda_tests.log").is_file() else []
print(f"CUDA / bf16 tests: {tests[-1] if tests else 'not run'}\n")
print("| models | dtype | routing | teacher step ms | student step ms | step speedup | backbone speedup "
      "| executed layers |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, models in (("bench_fp32", "untrained bench size"), ("bench_bf16", "untrained bench size"),
                     ("bench_keep_bf16", "untrained bench size"), ("bench_shipped_float32", "shipped Meta-World"),
                     ("bench_shipped_bfloat16", "shipped Meta-World")):
    r = last_json(name)
    if r is None:
        continue
    keep = r.get("keep_fraction") or 0.0
    routing = f"keep {keep:g}" if keep else f"threshold {r.get('threshold', float('nan')):g}"
    print(f"| {models} | {r.get('dtype')} | {routing} | {r.get('teacher_ms')} | {r.get('student_ms')} "
          f"| {r.get('end_to_end_speedup')}x | {r.get('backbone_speedup')}x | {r.get('executed_layer_fraction')} |")
node = last_json("bench_node")
if node:
    def p(key):
        value = node.get(key) or {}
        return f"p50 {value.get('p50')} / p99 {value.get('p99')}"
    print(f"\nbench-node (640x480 rgb8 at 30 Hz, --device cuda): inference ms {p('inference_ms')}; "
          f"node latency ms {p('node_latency_ms')}; overhead ms {p('overhead_ms')}; "
          f"end to end ms {p('end_to_end_ms')}")
print(f"\nlogs: {out}")
EOF

if ((${#FAILED[@]})); then
  echo "gpu_check: failed: ${FAILED[*]} (${SECONDS}s)"
  exit 1
fi
echo "gpu_check: all passed in ${SECONDS}s"
