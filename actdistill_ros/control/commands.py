"""Physical command vectors <-> message fields, and named joint values -> vectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from actdistill_ros.control.limits import unit_quaternion


def twist_from_command(arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(linear xyz m/s, angular xyz rad/s) from a 3-D (linear) or 6-D (linear + angular) command."""
    if arm.size not in (3, 6):
        raise ValueError(f"ee_twist needs 3 (xyz) or 6 (xyz + rpy) non-gripper values, got {arm.size}")
    arm = np.asarray(arm, dtype=np.float64)
    return arm[:3], (arm[3:6] if arm.size == 6 else np.zeros(3))


def pose_from_command(arm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(position xyz, unit quaternion xyzw) from a 7-D pose command; None if the quaternion is ~0."""
    if arm.size != 7:
        raise ValueError(f"ee_pose needs 7 non-gripper values (xyz + quaternion xyzw), got {arm.size}")
    quaternion = unit_quaternion(np.asarray(arm[3:7], dtype=np.float64))
    return None if quaternion is None else (np.asarray(arm[:3], dtype=np.float64), quaternion)


def select_named(names: Sequence[str], values: Sequence[float], wanted: Sequence[str],
                 what: str = "joint state") -> np.ndarray:
    """The values of the ``wanted`` names, in that order, whatever the message's order.

    Raises ValueError naming the missing names (a count match is not enough: joints could be
    fed to the policy in the wrong order)."""
    names = list(names)
    if not names:
        raise ValueError(f"{what} has no joint names, expected {list(wanted)}")
    if len(names) != len(values):
        raise ValueError(f"{what} has {len(names)} names for {len(values)} positions")
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in wanted if name not in index]
    if missing:
        shown = names[:12] + (["..."] if len(names) > 12 else [])
        raise ValueError(f"{what} lacks joints {missing} (it has {shown})")
    return np.asarray(values, dtype=np.float64)[[index[name] for name in wanted]]
