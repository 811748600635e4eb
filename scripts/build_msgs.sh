#!/usr/bin/env bash
# Build the package's custom messages (msg/*.msg) with colcon into build/ros/{build,install,log},
# using the ROS 2 Jazzy build wheels from PyPI (no ROS install needed).
#
# Afterwards actdistill_ros.msg.RouterStats imports with
#   PYTHONPATH=build/ros/install/lib/python3.X/site-packages  LD_LIBRARY_PATH=build/ros/install/lib
# (scripts/ros_env.sh sets both).
#
# Usage: scripts/build_msgs.sh [--force]    (VENV=<dir> overrides .venv)
# On a robot with ROS 2 Jazzy from apt, build the normal way instead:
#   source /opt/ros/jazzy/setup.bash && colcon build --packages-select actdistill_ros
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"
ROS_BUILD_DIR="$REPO_ROOT/build/ros"
STAMP="$ROS_BUILD_DIR/.build_msgs.stamp"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { echo "[build_msgs] $*"; }

if [[ ! -x "$PY" ]]; then
  echo "[build_msgs] error: no virtual environment at $VENV (run scripts/setup.sh first)" >&2
  exit 1
fi
for tool in cmake make c++; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "[build_msgs] error: '$tool' not found; install cmake, make and g++ (apt-get install cmake g++)" >&2
    exit 1
  fi
done

# Everything the build output depends on; unchanged inputs -> nothing to do.
inputs_hash() {
  cat msg/*.msg CMakeLists.txt package.xml actdistill_ros/__init__.py scripts/ros2_run/* \
      requirements-ros-build.txt scripts/build_msgs.sh | sha256sum | cut -d' ' -f1
  "$PY" -c 'import sys; print(sys.version)'
}
WANT="$(inputs_hash | sha256sum | cut -d' ' -f1)"
PY_SITE_REL="$("$PY" -c 'import sys; print(f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages")')"
GENERATED_PY="$ROS_BUILD_DIR/install/$PY_SITE_REL/actdistill_ros/msg/_router_stats.py"
if [[ $FORCE == 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -f "$GENERATED_PY" ]]; then
  log "messages up to date ($ROS_BUILD_DIR/install)"
  exit 0
fi

# 1. Build wheels (rosidl generators, ament_cmake, colcon).
if ! "$PY" -c 'import colcon_core, ament_package, rosidl_pycommon, catkin_pkg' >/dev/null 2>&1; then
  log "installing ROS 2 build wheels (requirements-ros-build.txt)"
  "$VENV/bin/pip" install -q -r requirements-ros-build.txt
fi

# 2. Repair: the wheels' exported CMake files name the wheel builder's Python and numpy
#    include directories; point them at this interpreter's. Idempotent.
log "repairing Python/numpy include paths in the wheels' CMake exports"
"$PY" - "$VENV" <<'PYEOF'
import glob, re, sys, sysconfig
import numpy

venv = sys.argv[1]
py_include = sysconfig.get_paths()["include"]
np_include = numpy.get_include()
foreign_np = re.compile(r'[^;"\s]*/site-packages/numpy/(?:_core|core)/include')
foreign_py = re.compile(r'/[^;"\s]*?/cp3\d+-cp3\d+[^;"\s]*?/include/python3\.\d+\w*')
fixed = 0
for path in glob.glob(f"{venv}/share/*/cmake/*.cmake"):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "cp3" not in text:
        continue
    new = foreign_np.sub(lambda m: np_include, text)
    new = foreign_py.sub(lambda m: py_include, new)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        fixed += 1
print(f"[build_msgs] repaired {fixed} CMake export file(s)")
PYEOF

# 3. Stage the package sources outside the repository root: the venv lives in the repository,
#    and CMake refuses to export include paths (the venv's numpy headers) that lie inside
#    the source directory ("prefixed in the source directory").
STAGE="$ROS_BUILD_DIR/src/actdistill_ros"
mkdir -p "$ROS_BUILD_DIR"
rm -f "$STAMP"
rm -rf "$STAGE"
mkdir -p "$STAGE/actdistill_ros" "$STAGE/scripts"
cp -r msg CMakeLists.txt package.xml "$STAGE/"
cp -r scripts/ros2_run "$STAGE/scripts/"
cp actdistill_ros/__init__.py "$STAGE/actdistill_ros/"
for share_dir in launch config; do
  [[ -d "$share_dir" ]] && cp -r "$share_dir" "$STAGE/"
done

# 4. colcon build. Only the generated messages and our __init__.py are installed
#    (ACTDISTILL_INSTALL_PYTHON_SOURCES=OFF): the sources are used in place (pip install -e .).
log "colcon build -> $ROS_BUILD_DIR (about 15-60 s)"
CACHE="$ROS_BUILD_DIR/build/actdistill_ros/CMakeCache.txt"
if [[ -f "$CACHE" ]] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$STAGE" "$CACHE"; then
  rm -rf "$ROS_BUILD_DIR/build/actdistill_ros"   # configured from another source directory
fi
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
export COLCON_HOME="$ROS_BUILD_DIR/colcon_home"   # no user-wide colcon defaults or mixins
"$VENV/bin/colcon" --log-base "$ROS_BUILD_DIR/log" build \
  --paths "$STAGE" \
  --build-base "$ROS_BUILD_DIR/build" \
  --install-base "$ROS_BUILD_DIR/install" \
  --merge-install --event-handlers console_direct- \
  --cmake-args -DACTDISTILL_INSTALL_PYTHON_SOURCES=OFF -DBUILD_TESTING=OFF \
               "-DPython3_EXECUTABLE=$PY" -DCMAKE_BUILD_TYPE=Release

# 5. Prove the result imports exactly as ros_env.sh will set it up.
PYTHONPATH="$ROS_BUILD_DIR/install/$PY_SITE_REL${PYTHONPATH:+:$PYTHONPATH}" \
LD_LIBRARY_PATH="$ROS_BUILD_DIR/install/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$PY" -c 'from actdistill_ros.msg import RouterStats; RouterStats()' \
  || { echo "[build_msgs] error: built messages do not import" >&2; exit 1; }
# ...and the installed package __init__ is ours (extend_path), not rosidl's empty one, which
# would hide the Python sources behind the install directory.
cmp -s actdistill_ros/__init__.py "$ROS_BUILD_DIR/install/$PY_SITE_REL/actdistill_ros/__init__.py" \
  || { echo "[build_msgs] error: installed actdistill_ros/__init__.py is not the package's own" >&2; exit 1; }
echo "$WANT" > "$STAMP"
log "done: actdistill_ros.msg.RouterStats built in $ROS_BUILD_DIR/install"
