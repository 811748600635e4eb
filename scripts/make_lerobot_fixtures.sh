#!/usr/bin/env bash
# Regenerate test/fixtures/lerobot/: tiny SmolVLA, pi0 and pi0.5 policies made and run by LeRobot
# itself, the oracle that `actdistill predict` is tested against (test/test_smolvla_parity.py,
# test/test_pi0_parity.py; pi0 and pi0.5 go to OUT/pi0).
#
# LeRobot is never a dependency of this package (0.4.x pins an older torch, 0.5 needs Python 3.12):
# it goes into a throwaway virtual environment, installed without its dependency resolver, beside
# the CPU torch this project uses, with the imports it needs pinned by hand.
#
# Usage: scripts/make_lerobot_fixtures.sh [OUT_DIR]   (default: test/fixtures/lerobot)
# Environment:
#   LEROBOT_VENV  where the throwaway environment lives (default: $TMPDIR/actdistill-lerobot-venv);
#                 it is reused when it already imports lerobot's SmolVLA
#   PYTHON        the interpreter it is made from (default: python3.11)
#   TORCH_SPEC    how torch is installed (default: torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)
#   FAMILIES      which fixtures to make (default: "smolvla pi0")
#   OPENPI_DIR    a checkout of openpi (github.com/Physical-Intelligence/openpi) whose
#                 src/openpi/models_pytorch/transformers_replace LeRobot's pi0 needs over transformers
#                 4.53.2 (default: a clone of OPENPI_COMMIT into the environment)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/test/fixtures/lerobot}"
VENV="${LEROBOT_VENV:-${TMPDIR:-/tmp}/actdistill-lerobot-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu}"
FAMILIES="${FAMILIES:-smolvla pi0}"
OPENPI_COMMIT=15a9616a00943ada6c20a0f158e3adb39df2ccac
# LeRobot's pi0/pi0.5 check for exactly this transformers, patched by openpi; it goes into its own
# directory, first on PYTHONPATH for the pi0 run only (SmolVLA keeps transformers 4.57).
PI0_TRANSFORMERS="$VENV/pi0-transformers"

log() { echo "[lerobot-fixtures] $*"; }

# What lerobot 0.4.4's SmolVLA and processor modules import, at versions that work together with
# torch 2.13 (lerobot's own pins ask for torch < 2.11, which is why the resolver is bypassed).
PINS=(
  "transformers==4.57.6" "tokenizers==0.22.2" "huggingface-hub==0.35.3" "safetensors" "accelerate"
  "datasets==4.8.5" "diffusers==0.35.2" "draccus==0.10.0" "einops" "num2words" "av==15.1.0"
  "torchvision==0.28.0" "pyarrow" "pandas" "gymnasium" "pyserial" "jsonlines" "deepdiff" "termcolor"
  "opencv-python-headless" "packaging" "typing-extensions" "imageio" "pillow"
)

venv_ready() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import lerobot.policies.smolvla.modeling_smolvla, lerobot.policies.smolvla.processor_smolvla" >/dev/null 2>&1
}

patch_torchvision() {
  # The registry's torchvision 0.28 is a CUDA build; beside the CPU torch, its fake-kernel
  # registrations of ops that are not compiled in fail at import. Skip those registrations.
  local meta
  meta="$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
PY
)"
  if ! grep -q "actdistill: skip ops not compiled in" "$meta"; then
    "$VENV/bin/python" - "$meta" <<'PY'
import re, sys, pathlib
path = pathlib.Path(sys.argv[1])
text = path.read_text()
guard = '''
def _actdistill_register_fake(name):  # actdistill: skip ops not compiled in
    def decorate(function):
        try:
            return torch.library.register_fake(name)(function)
        except (RuntimeError, AttributeError):
            return function
    return decorate
'''
text = text.replace("@torch.library.register_fake(", "@_actdistill_register_fake(")
# The helper goes right after the imports.
first_def = re.search(r"^(def |@)", text, flags=re.M).start()
path.write_text(text[:first_def] + guard + "\n\n" + text[first_def:])
PY
  fi
}

if venv_ready; then
  log "reusing $VENV"
else
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $TORCH_SPEC
  TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "torch==$TORCH_VERSION" > "$VENV/torch-constraint.txt"
  "$VENV/bin/pip" install -q -c "$VENV/torch-constraint.txt" "${PINS[@]}"
  "$VENV/bin/pip" install -q --no-deps "lerobot==0.4.4"
  patch_torchvision
  venv_ready || { log "lerobot's SmolVLA does not import in $VENV:"; \
    "$VENV/bin/python" -c "import lerobot.policies.smolvla.modeling_smolvla"; exit 1; }
fi

pi0_transformers_ready() {
  PYTHONPATH="$PI0_TRANSFORMERS" "$VENV/bin/python" -c \
    "from transformers.models.siglip import check; assert check.check_whether_transformers_replace_is_installed_correctly()" \
    >/dev/null 2>&1
}

install_pi0_transformers() {
  local openpi="${OPENPI_DIR:-$VENV/openpi}"
  if [ ! -d "$openpi/src/openpi/models_pytorch/transformers_replace" ]; then
    git clone -q https://github.com/Physical-Intelligence/openpi "$openpi"
    git -C "$openpi" checkout -q "$OPENPI_COMMIT"
  fi
  "$VENV/bin/pip" install -q --no-deps --target "$PI0_TRANSFORMERS" "transformers==4.53.2" "tokenizers==0.21.4"
  cp -r "$openpi/src/openpi/models_pytorch/transformers_replace/." "$PI0_TRANSFORMERS/transformers/"
  pi0_transformers_ready || { log "openpi's patched transformers 4.53.2 does not import from $PI0_TRANSFORMERS"; exit 1; }
}

log "building fixtures ($FAMILIES) in $OUT"
HF_HOME_DIR="$(mktemp -d)"
trap 'rm -rf "$HF_HOME_DIR"' EXIT
# Nothing is downloaded: the tiny VLMs and tokenizers are written into a private Hugging Face cache first.
for family in $FAMILIES; do
  if [ "$family" = pi0 ]; then
    pi0_transformers_ready || install_pi0_transformers
    HF_HOME="$HF_HOME_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PI0_TRANSFORMERS" \
      "$VENV/bin/python" "$ROOT/scripts/lerobot_fixtures.py" --family pi0 --out "$OUT"
  else
    HF_HOME="$HF_HOME_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      "$VENV/bin/python" "$ROOT/scripts/lerobot_fixtures.py" --family "$family" --out "$OUT"
  fi
done
log "done: $(du -sh "$OUT" | cut -f1) in $OUT"
