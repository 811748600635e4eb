"""Environment for processes that touch ROS 2: loopback-only discovery, a private domain id,
logs in a temp dir, the colcon-built messages, the large-image Fast DDS profile, and where the
shipped config files are (``config_file``).

Importable without rclpy (only `domain_coordinator`, and only when a domain id is needed).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROS_INSTALL_DIR = REPO_ROOT / "build" / "ros" / "install"
FASTDDS_PROFILE_NAME = "fastdds_large_images.xml"

# Domain ids reserved by this process; domain_coordinator keeps one reserved for as long as
# its context is open, so the contexts stay open until the process exits.
_domain_reservations = contextlib.ExitStack()


def _site_packages_rel() -> str:
    return f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def built_messages_path() -> Path | None:
    """site-packages dir of the colcon-built messages (scripts/build_msgs.sh), or None if not built."""
    site_packages = ROS_INSTALL_DIR / _site_packages_rel()
    if (site_packages / "actdistill_ros" / "msg" / "__init__.py").is_file():
        return site_packages
    return None


def _in_source_tree() -> bool:
    return (REPO_ROOT / "package.xml").is_file() and (REPO_ROOT / "config").is_dir()


def config_file(name: str) -> Path:
    """A shipped config file: the repo's config/ when running from the source tree, else the
    installed share/actdistill_ros/config/ (found with ament_index_python). FileNotFoundError if neither has it."""
    if _in_source_tree():
        path = REPO_ROOT / "config" / name
        if path.is_file():
            return path
        raise FileNotFoundError(f"config file {name!r}: not in {REPO_ROOT / 'config'}")
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        raise FileNotFoundError(f"config file {name!r}: not running from the source tree and ament_index_python "
                                "is not importable; expected an installed actdistill_ros (source its setup)") from None
    try:
        path = Path(get_package_share_directory("actdistill_ros")) / "config" / name
    except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH is not set
        raise FileNotFoundError(f"config file {name!r}: not running from the source tree and actdistill_ros is "
                                "not in AMENT_PREFIX_PATH; expected an installed actdistill_ros (source its setup)"
                                ) from None
    if not path.is_file():
        raise FileNotFoundError(f"config file {name!r}: not in {path.parent}")
    return path


def fastdds_profile_path() -> Path | None:
    """The shipped Fast DDS profile (config_file), or None where the package ships none."""
    try:
        return config_file(FASTDDS_PROFILE_NAME)
    except FileNotFoundError:
        return None


def reserve_domain_id() -> int:
    """A ROS_DOMAIN_ID (1-100) no other domain_coordinator user holds; reserved until this process exits."""
    from domain_coordinator import domain_id as coordinated_domain_id

    start = random.randrange(100)  # spread parallel runs instead of all probing 1, 2, 3...
    counter = iter(range(start, start + 100))
    return _domain_reservations.enter_context(coordinated_domain_id(lambda: next(counter) % 100 + 1))


def _prepend(paths: list[str], existing: str | None) -> str:
    parts = [p for p in paths if p]
    parts += [p for p in (existing or "").split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def ros_environment(base_env: dict[str, str] | None = None, domain_id: int | None = None) -> dict[str, str]:
    """Environment dict for a subprocess that uses ROS 2.

    Sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, ROS_DOMAIN_ID (a reserved free one unless
    given), ROS_LOG_DIR (a fresh temp dir unless already set), the built-message paths when
    build/ros/install exists, and the Fast DDS large-image profile.
    """
    env = dict(os.environ if base_env is None else base_env)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if domain_id is None:
        domain_id = reserve_domain_id()
    if not 0 <= int(domain_id) <= 232:
        raise ValueError(f"domain_id: expected an integer in 0..232, got {domain_id!r}")
    env["ROS_DOMAIN_ID"] = str(int(domain_id))
    if not env.get("ROS_LOG_DIR"):
        env["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="actdistill_ros_log_")

    messages = built_messages_path()
    if messages is not None:
        env["PYTHONPATH"] = _prepend([str(messages)], env.get("PYTHONPATH"))
        env["LD_LIBRARY_PATH"] = _prepend([str(ROS_INSTALL_DIR / "lib")], env.get("LD_LIBRARY_PATH"))

    profile = fastdds_profile_path()
    if profile is not None:
        env.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", str(profile))
        env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(profile))
    return env
