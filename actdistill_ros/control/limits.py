"""The safety contract: every limit on what the policy node commands, in physical units per second.

The card's action space says what each action dimension is and in which unit; the node's
``action.*`` parameters (``LimitSettings``) say how far and how fast the arm may go. From both,
``ActionLimits`` turns model outputs into physical commands and moves each command at most one
control period's worth of motion away from the one before it. The period enters only as the time
step, so the speed the arm reaches is the same at any ``control_rate_hz``.

Physical units, per action mode (the non-gripper dimensions):
- joint_state, joint_trajectory: joint positions in rad (revolute) or m (prismatic);
  ``action.max_joint_velocity`` bounds each joint, in its unit per second.
- ee_pose: position xyz in m, orientation as a quaternion xyzw; ``action.max_linear_velocity`` bounds
  the norm of the position change per second, ``action.max_angular_velocity`` the rotation angle
  per second (between orientations, not per quaternion component).
- ee_twist: linear velocity xyz in m/s (+ angular velocity xyz in rad/s); the velocity limits bound
  the norms, ``action.max_linear_acceleration`` / ``action.max_angular_acceleration`` how fast they
  change: ramps and decelerating stops.
A dimension whose card unit is not the one its mode needs (``normalized``, a policy's own scale)
needs an explicit ``action.scale``: physical value = action x scale. The gripper dimension keeps
the card's unit (an open/close fraction is fine) and moves at most ``action.max_gripper_velocity``
of it per second. Bounds are the card's ``low``/``high`` (x scale), narrowed by
``action.position_limits_low/high`` (physical units; ee_twist: per-axis velocities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ACTION_MODES = ("joint_state", "joint_trajectory", "ee_pose", "ee_twist")
JOINT_UNITS = ("rad", "m")
UNITLESS = ("1", "", "quaternion", "unitless")  # quaternion components
# Parameters that were replaced; setting one is refused with the name of its replacement.
REMOVED_PARAMETERS = {
    "action.velocity_limit": "action.max_joint_velocity, action.max_linear_velocity and action.max_angular_velocity "
                             "(physical units per second; ee_twist also action.max_linear_acceleration / "
                             "action.max_angular_acceleration)",
    "action.twist_scale": "action.scale (one value per action dimension: physical unit per action unit)",
    "camera.transport": "camera.transports (one per camera topic, or one for all: raw or compressed)",
}


@dataclass(frozen=True)
class LimitSettings:
    """The ``action.*`` limit parameters as the user set them."""

    scale: tuple[float, ...] = ()  # one per action dimension; () = the card's units are physical
    position_low: tuple[float, ...] = ()  # physical; () = the card's bounds only
    position_high: tuple[float, ...] = ()
    max_joint_velocity: tuple[float, ...] = (0.5,)  # one for every joint, or one per joint (unit/s)
    max_linear_velocity: float = 0.25  # m/s
    max_angular_velocity: float = 0.5  # rad/s
    max_linear_acceleration: float = 0.5  # m/s^2 (ee_twist)
    max_angular_acceleration: float = 1.0  # rad/s^2 (ee_twist)
    max_gripper_velocity: float = 2.0  # gripper unit/s


def check_mode_fits(mode: str, kind: str, arm_dims: int) -> None:
    """Raise ValueError with a one-line reason when ``mode`` cannot express the card's actions."""
    if mode not in ACTION_MODES:
        raise ValueError(f"action.mode must be one of {list(ACTION_MODES)}, got {mode!r}")
    if mode in ("joint_state", "joint_trajectory") and kind != "joint":
        raise ValueError(f"action.mode {mode} needs a joint action space, the model's is {kind!r} "
                         f"(use ee_twist or ee_pose)")
    if mode == "ee_twist" and (kind != "end_effector" or arm_dims not in (3, 6)):
        raise ValueError(f"action.mode ee_twist needs an end_effector action space with 3 or 6 non-gripper "
                         f"dimensions, the model's is {kind!r} with {arm_dims}")
    if mode == "ee_pose" and (kind != "end_effector" or arm_dims != 7):
        raise ValueError(f"action.mode ee_pose needs an end_effector action space with 7 non-gripper "
                         f"dimensions (xyz + quaternion), the model's is {kind!r} with {arm_dims}")


def _roles(mode: str, arm_dims: int) -> list[tuple[str, tuple[str, ...]]]:
    """(physical unit, card units accepted without a scale) of each non-gripper dimension."""
    if mode in ("joint_state", "joint_trajectory"):
        return [("rad or m", JOINT_UNITS)] * arm_dims
    if mode == "ee_pose":
        return [("m", ("m",))] * 3 + [("quaternion", UNITLESS)] * 4
    return [("m/s", ("m/s",))] * 3 + [("rad/s", ("rad/s",))] * (arm_dims - 3)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"action.{name} must be a finite number > 0, got {value!r}")
    return value


def _clip_norm(vector: np.ndarray, limit: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector * (limit / norm) if norm > limit else vector


def unit_quaternion(q: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(q))
    return q / norm if norm > 1e-6 else None


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (rad) of the rotation between unit quaternions ``a`` and ``b`` (q and -q are one rotation)."""
    return 2.0 * math.acos(min(1.0, abs(float(np.dot(a, b)))))


def slerp_towards(start: np.ndarray, goal: np.ndarray, max_angle: float) -> np.ndarray:
    """From unit quaternion ``start`` towards ``goal`` (the nearer sign), rotating at most ``max_angle``."""
    if float(np.dot(start, goal)) < 0.0:
        goal = -goal
    angle = rotation_angle(start, goal)
    if angle <= max_angle or angle < 1e-12:
        return goal
    half = angle / 2.0
    t = max_angle / angle
    out = (math.sin((1.0 - t) * half) * start + math.sin(t * half) * goal) / math.sin(half)
    return out / np.linalg.norm(out)


@dataclass(frozen=True)
class ActionLimits:
    """Physical bounds and per-second limits of one action mode, applied per control period."""

    mode: str
    period_s: float
    scale: np.ndarray  # (D,) physical value per action unit
    low: np.ndarray  # (D,) physical bounds
    high: np.ndarray
    units: tuple[str, ...]  # (D,) physical unit of each dimension
    gripper_index: int | None
    max_joint_velocity: np.ndarray  # (arm dims,) joint modes
    max_linear_velocity: float
    max_angular_velocity: float
    max_linear_acceleration: float
    max_angular_acceleration: float
    max_gripper_velocity: float

    @classmethod
    def build(cls, mode: str, space, settings: LimitSettings, control_rate_hz: float) -> "ActionLimits":
        """The contract for ``space`` (the card's ActionSpace) under ``settings``.

        Raises ValueError with one line naming the dimension or parameter at fault: a unit the mode
        cannot command without ``action.scale``, lists of the wrong length, a limit that is not > 0,
        bounds that leave nothing."""
        dim = space.dim
        gripper = space.gripper_index
        arm = [i for i in range(dim) if i != gripper]
        check_mode_fits(mode, space.kind, len(arm))
        if not (math.isfinite(control_rate_hz) and control_rate_hz > 0):
            raise ValueError(f"control_rate_hz must be > 0, got {control_rate_hz!r}")
        for name, values in (("scale", settings.scale), ("position_limits_low", settings.position_low),
                             ("position_limits_high", settings.position_high)):
            if len(values) not in (0, dim):
                raise ValueError(f"action.{name} has {len(values)} values, expected 0 or {dim} (one per action "
                                 f"dimension: {list(space.names)})")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"action.{name} contains NaN or inf")
        if any(v <= 0 for v in settings.scale):
            raise ValueError(f"action.scale must be > 0 in every dimension, got {list(settings.scale)}")
        scale = np.asarray(settings.scale or [1.0] * dim, dtype=np.float64)
        units = [space.units[i] for i in range(dim)]
        for i, (physical, accepted) in zip(arm, _roles(mode, len(arm))):
            if physical == "quaternion":
                if settings.scale and scale[i] != 1.0:
                    raise ValueError(f"action.scale must be 1 for the quaternion dimension {space.names[i]!r}, "
                                     f"got {scale[i]:g}")
                units[i] = "1"
            elif settings.scale:
                units[i] = space.units[i] if space.units[i] in accepted else physical
            elif space.units[i] not in accepted:
                raise ValueError(
                    f"action dimension {space.names[i]!r} has unit {space.units[i]!r}, which {mode} cannot command "
                    f"as {physical}: set action.scale (one value per action dimension, {physical} per action unit)")
        low, high = np.asarray(space.low, np.float64) * scale, np.asarray(space.high, np.float64) * scale
        if settings.position_low:
            low = np.maximum(low, np.asarray(settings.position_low, np.float64))
        if settings.position_high:
            high = np.minimum(high, np.asarray(settings.position_high, np.float64))
        bad = np.flatnonzero(low > high)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"action limits are empty for {space.names[i]!r}: low {low[i]:g} > high {high[i]:g} "
                             f"(card bounds x action.scale, intersected with action.position_limits_low/high)")
        joint_velocity = np.asarray([_positive("max_joint_velocity", v) for v in settings.max_joint_velocity])
        if joint_velocity.size not in (1, len(arm)):
            raise ValueError(f"action.max_joint_velocity has {joint_velocity.size} values, expected 1 or {len(arm)} "
                             f"(one per joint)")
        return cls(mode=mode, period_s=1.0 / float(control_rate_hz), scale=scale, low=low, high=high,
                   units=tuple(units), gripper_index=gripper,
                   max_joint_velocity=np.broadcast_to(joint_velocity, (len(arm),)).copy(),
                   max_linear_velocity=_positive("max_linear_velocity", settings.max_linear_velocity),
                   max_angular_velocity=_positive("max_angular_velocity", settings.max_angular_velocity),
                   max_linear_acceleration=_positive("max_linear_acceleration", settings.max_linear_acceleration),
                   max_angular_acceleration=_positive("max_angular_acceleration", settings.max_angular_acceleration),
                   max_gripper_velocity=_positive("max_gripper_velocity", settings.max_gripper_velocity))

    # ---------------------------------------------------------------- bounds
    @property
    def arm(self) -> np.ndarray:
        return np.array([i for i in range(self.low.size) if i != self.gripper_index], dtype=int)

    def to_physical(self, actions: np.ndarray) -> np.ndarray:
        """Model outputs (H, D) in card units -> physical values within the bounds (the box; speed
        limits bite per command, in ``step``)."""
        return self._box(np.asarray(actions, dtype=np.float64) * self.scale)

    def bound(self, command: np.ndarray) -> np.ndarray:
        """One physical command (D,) inside the bounds: ee_twist also within the speed limits, ee_pose
        with a unit quaternion (unchanged when it has none: the caller refuses it)."""
        out = self._box(np.asarray(command, dtype=np.float64))
        if self.mode == "ee_twist":
            arm = self.arm
            out[arm[:3]] = _clip_norm(out[arm[:3]], self.max_linear_velocity)
            if arm.size == 6:
                out[arm[3:]] = _clip_norm(out[arm[3:]], self.max_angular_velocity)
        return out

    def _box(self, physical: np.ndarray) -> np.ndarray:
        """Within low/high per dimension; ee_pose quaternions of any length made unit ones."""
        out = np.clip(physical, self.low, self.high)
        if self.mode == "ee_pose":
            quaternion = self.arm[3:7]
            norms = np.linalg.norm(physical[..., quaternion], axis=-1, keepdims=True)
            out[..., quaternion] = np.where(norms > 1e-6, physical[..., quaternion] / np.maximum(norms, 1e-6),
                                            physical[..., quaternion])
        return out

    # ---------------------------------------------------------------- one control period
    def step(self, target: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The command one period after ``previous`` (D,), towards ``target`` (D,), both physical.

        ``previous`` None (nothing commanded yet) gives the bounded target. From a ``previous``
        outside the bounds (narrowed at run time, an arm measured beyond them) commands move back
        inside at the limit instead of jumping; in ee_twist a narrowed speed bound bites at once, since
        slowing down is never delayed."""
        target = self.bound(np.asarray(target, dtype=np.float64))
        if previous is None:
            return target
        previous = np.asarray(previous, dtype=np.float64)
        dt = self.period_s
        out = target.copy()
        arm = self.arm
        if self.mode in ("joint_state", "joint_trajectory"):
            reach = self.max_joint_velocity * dt
            out[arm] = previous[arm] + np.clip(target[arm] - previous[arm], -reach, reach)
        elif self.mode == "ee_pose":
            position = arm[:3]
            out[position] = previous[position] + _clip_norm(target[position] - previous[position],
                                                            self.max_linear_velocity * dt)
            start = unit_quaternion(previous[arm[3:7]])
            if start is not None:
                out[arm[3:7]] = slerp_towards(start, target[arm[3:7]], self.max_angular_velocity * dt)
        else:  # ee_twist: commands are velocities; the acceleration limits bound their change
            previous = self.bound(previous)
            linear = arm[:3]
            out[linear] = previous[linear] + _clip_norm(target[linear] - previous[linear],
                                                        self.max_linear_acceleration * dt)
            if arm.size == 6:
                angular = arm[3:]
                out[angular] = previous[angular] + _clip_norm(target[angular] - previous[angular],
                                                              self.max_angular_acceleration * dt)
        if self.gripper_index is not None:
            g = self.gripper_index
            reach = self.max_gripper_velocity * dt
            out[g] = previous[g] + float(np.clip(target[g] - previous[g], -reach, reach))
        return out

    def sequence(self, targets: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """``step`` along a chunk (H, D), each command one period after the one before it."""
        out = np.empty((len(targets), self.low.size))
        for i, target in enumerate(targets):
            previous = out[i] = self.step(target, previous)
        return out

    def stopped(self, previous: np.ndarray) -> bool:
        """ee_twist: the commanded velocity is zero (a decelerating stop has arrived)."""
        return bool(np.all(np.asarray(previous)[self.arm] == 0.0))

    def describe(self, names: Sequence[str]) -> str:
        """One line for the start-up log: what the arm may do."""
        arm = self.arm
        if self.mode in ("joint_state", "joint_trajectory"):
            speeds = ", ".join(f"{names[i]} {v:g} {self.units[i]}/s" for i, v in zip(arm, self.max_joint_velocity))
            text = f"joint speed {speeds}"
        elif self.mode == "ee_pose":
            text = f"{self.max_linear_velocity:g} m/s, {self.max_angular_velocity:g} rad/s"
        else:
            text = (f"{self.max_linear_velocity:g} m/s, {self.max_angular_velocity:g} rad/s; "
                    f"{self.max_linear_acceleration:g} m/s^2, {self.max_angular_acceleration:g} rad/s^2")
        if self.gripper_index is not None:
            text += f"; gripper {self.max_gripper_velocity:g} {self.units[self.gripper_index]}/s"
        return text
