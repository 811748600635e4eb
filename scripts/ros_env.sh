# Source me (bash):  source scripts/ros_env.sh
# Environment for running the ROS 2 parts from this source tree: loopback-only discovery,
# logs in a temp dir, the colcon-built messages (scripts/build_msgs.sh), and the Fast DDS
# profile for large camera images. Python equivalent: actdistill_ros.ros.env.ros_environment().

_actdistill_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Discovery never leaves loopback.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST

# Logs go to a temp dir instead of ~/.ros/log (rclpy.init fails without a usable HOME).
if [ -z "${ROS_LOG_DIR:-}" ]; then
  ROS_LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/actdistill_ros_log.XXXXXX")"
  export ROS_LOG_DIR
fi

_actdistill_py="$_actdistill_root/.venv/bin/python"
[ -x "$_actdistill_py" ] || _actdistill_py="$(command -v python3)"

# A domain id free right now (domain_coordinator), unless one is already chosen. Test fixtures
# reserve their own per process; this keeps interactive runs off the shared default domain 0.
if [ -z "${ROS_DOMAIN_ID:-}" ]; then
  _actdistill_domain="$("$_actdistill_py" -c 'import random
from domain_coordinator import domain_id
s = random.randrange(100); c = iter(range(s, s + 100))
with domain_id(lambda: next(c) % 100 + 1) as d: print(d)' 2>/dev/null)"
  [ -n "$_actdistill_domain" ] && export ROS_DOMAIN_ID="$_actdistill_domain"
  unset _actdistill_domain
fi

# Built messages: actdistill_ros.msg.RouterStats.
_actdistill_pyver="$("$_actdistill_py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
_actdistill_site="$_actdistill_root/build/ros/install/lib/python$_actdistill_pyver/site-packages"
if [ -d "$_actdistill_site/actdistill_ros/msg" ]; then
  export PYTHONPATH="$_actdistill_site${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$_actdistill_root/build/ros/install/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  echo "ros_env.sh: messages not built yet (run scripts/build_msgs.sh); actdistill_ros.msg unavailable" >&2
fi

# Large camera images: must be set in the PUBLISHER's process (see the XML's comment).
export FASTRTPS_DEFAULT_PROFILES_FILE="${FASTRTPS_DEFAULT_PROFILES_FILE:-$_actdistill_root/config/fastdds_large_images.xml}"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$FASTRTPS_DEFAULT_PROFILES_FILE}"

unset _actdistill_root _actdistill_py _actdistill_pyver _actdistill_site
