"""From predicted action chunks to the action commanded at each control tick.

Chunk execution (with optional temporal ensembling), safety limits (clamp, per-step change
limit, NaN/inf rejection), the stale-input watchdog and the mapping of an action vector onto
twist / pose fields. No torch and no ROS here, so all of it unit-tests without DDS. The rules
that apply these pieces tick by tick are in motion_controller.py; the policy node wraps its
results in messages.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

ACTION_MODES = ("joint_state", "joint_trajectory", "ee_pose", "ee_twist")


# ---- safety ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SafetyLimits:
    """Per-dimension bounds and the largest change allowed between two consecutive commands."""

    low: np.ndarray  # (D,) float64
    high: np.ndarray  # (D,)
    max_step_delta: float = 0.0  # 0 disables the per-step limit
    rate_limited: np.ndarray | None = None  # (D,) bool: dims the per-step limit applies to

    @classmethod
    def combine(cls, card_low, card_high, param_low=(), param_high=(), max_step_delta: float = 0.0,
                gripper_index: int | None = None) -> "SafetyLimits":
        """The card's limits narrowed by the optional parameter limits (empty = card only).

        Raises ValueError when the lengths do not match or the intersection is empty.
        """
        low = np.asarray(card_low, dtype=np.float64)
        high = np.asarray(card_high, dtype=np.float64)
        dim = low.size
        for name, values in (("position_limits_low", param_low), ("position_limits_high", param_high)):
            if len(values) not in (0, dim):
                raise ValueError(f"action.{name} has {len(values)} values, expected 0 (card limits) or {dim} "
                                 f"(one per action dimension)")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"action.{name} contains NaN or inf")
        if len(param_low):
            low = np.maximum(low, np.asarray(param_low, dtype=np.float64))
        if len(param_high):
            high = np.minimum(high, np.asarray(param_high, dtype=np.float64))
        bad = np.flatnonzero(low > high)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"action limits are empty in dimension {i}: low {low[i]:g} > high {high[i]:g} "
                             f"(card limits intersected with action.position_limits_low/high)")
        if not (math.isfinite(max_step_delta) and max_step_delta >= 0.0):
            raise ValueError(f"action.velocity_limit must be >= 0 (0 disables it), got {max_step_delta}")
        rate_limited = np.ones(dim, dtype=bool)
        if gripper_index is not None:
            rate_limited[gripper_index] = False  # open/close commands are not rate-limited
        return cls(low, high, float(max_step_delta), rate_limited)

    def clamp(self, actions: np.ndarray) -> np.ndarray:
        return np.clip(actions, self.low, self.high)

    def limit_step(self, action: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """Towards ``action`` clamped to the bounds, at most ``max_step_delta`` away from ``previous``
        in each rate-limited dimension. The change limit always holds: from a ``previous`` inside the
        bounds the result is inside them; from one outside (bounds narrowed at run time, an arm
        measured beyond them) it moves back towards them at that rate instead of jumping."""
        target = self.clamp(action)
        if previous is None or self.max_step_delta <= 0.0:
            return target
        delta = np.clip(target - previous, -self.max_step_delta, self.max_step_delta)
        return np.where(self.rate_limited, previous + delta, target)

    def limit_sequence(self, actions: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """Apply ``limit_step`` along a chunk, each step relative to the one before it."""
        out = np.empty_like(actions)
        for i, action in enumerate(actions):
            previous = out[i] = self.limit_step(action, previous)
        return out


def is_finite_chunk(actions: np.ndarray) -> bool:
    """A chunk with any NaN or inf is dropped whole: the model's output cannot be trusted."""
    return bool(np.isfinite(actions).all())


# ---- chunk execution -------------------------------------------------------------------------
class ChunkScheduler:
    """Hands out one action per control tick from the chunks predicted so far.

    A chunk added with ``start_tick`` s supplies its step k at tick s + k. Without ensembling the
    newest chunk is followed alone. With temporal ensembling (ACT, Zhao et al. 2023) every chunk
    that covers the tick contributes, weighted exp(-decay * i) with i = 0 for the oldest: a
    larger decay trusts earlier predictions more, 0 is a plain average. Each chunk may carry a
    ``source`` (what it was computed from) for ``drop_where``.
    """

    def __init__(self, temporal_ensemble: bool = False, decay: float = 0.01):
        self.temporal_ensemble = temporal_ensemble
        self.decay = float(decay)
        self._chunks: deque[tuple[int, np.ndarray, Any]] = deque()

    def add(self, actions: np.ndarray, start_tick: int, source: Any = None) -> None:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"an action chunk must have shape (H>0, D), got {actions.shape}")
        if not self.temporal_ensemble:
            self._chunks.clear()
        self._chunks.append((int(start_tick), actions, source))

    def clear(self) -> None:
        self._chunks.clear()

    def drop_where(self, predicate: Callable[[Any], bool]) -> int:
        """Remove the chunks whose ``source`` satisfies ``predicate``; returns how many."""
        kept = deque(entry for entry in self._chunks if not predicate(entry[2]))
        dropped = len(self._chunks) - len(kept)
        self._chunks = kept
        return dropped

    def __len__(self) -> int:
        return len(self._chunks)

    def newest(self) -> np.ndarray:
        return self._chunks[-1][1]

    def newest_start(self) -> int:
        return self._chunks[-1][0]

    def replace_newest(self, actions: np.ndarray) -> None:
        """Swap the newest chunk's actions (e.g. after rate-limiting it as a whole trajectory)."""
        start, _, source = self._chunks[-1]
        self._chunks[-1] = (start, np.asarray(actions, dtype=np.float64), source)

    def action_at(self, tick: int) -> np.ndarray | None:
        """The action for ``tick``, or None when no chunk covers it (hold)."""
        while self._chunks and tick - self._chunks[0][0] >= len(self._chunks[0][1]):
            self._chunks.popleft()  # fully executed
        covering = [chunk[tick - start] for start, chunk, _ in self._chunks if 0 <= tick - start < len(chunk)]
        if not covering:
            return None
        if len(covering) == 1:
            return covering[0].copy()
        weights = np.exp(-self.decay * np.arange(len(covering)))
        return np.average(np.stack(covering), axis=0, weights=weights)


# ---- watchdog ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MotionVerdict:
    allowed: bool
    reason: str  # why motion is held ("" when allowed)
    kind: str = "ok"  # no_command, no_frame, stale_frame, no_state, stale_state, no_measured, stale_measured, ok


class MotionWatchdog:
    """Allows motion only with a command, a frame newer than ``max_image_age_s`` from EVERY camera
    and, when needed, a robot state (the policy's input) and a measured position (what joint and
    pose modes ramp from) newer than ``max_state_age_s``. Stateless: the motion controller logs changes."""

    def __init__(self, max_image_age_s: float, max_state_age_s: float = math.inf):
        self.max_image_age_s = float(max_image_age_s)
        self.max_state_age_s = float(max_state_age_s)

    def check(self, now_s: float, newest_frames_s: float | None | Sequence[float | None], has_command: bool, *,
              cameras: Sequence[str] = (), needs_state: bool = False, newest_state_s: float | None = None,
              needs_measured: bool = False, newest_measured_s: float | None = None) -> MotionVerdict:
        """``newest_frames_s``: receipt time of each camera's newest frame (None = none yet), or one
        value for one camera; ``cameras`` names them in reasons. ``newest_state_s`` /
        ``newest_measured_s``: None = none received yet."""
        frames = list(newest_frames_s) if isinstance(newest_frames_s, (list, tuple)) else [newest_frames_s]
        names = list(cameras) or [""] * len(frames)
        missing = [name for name, t in zip(names, frames) if t is None]
        ages = [(now_s - t, name) for name, t in zip(names, frames) if t is not None]
        oldest_age, oldest_name = max(ages) if ages else (0.0, "")
        if not has_command:
            kind, reason = "no_command", "no command received yet"
        elif missing:
            kind, reason = "no_frame", "no camera frame received yet" + _on(missing)
        elif oldest_age > self.max_image_age_s:
            kind, reason = "stale_frame", (f"camera frame is {oldest_age:.2f} s old{_on([oldest_name])} "
                                           f"(watchdog.max_image_age_s {self.max_image_age_s:g})")
        elif needs_state and newest_state_s is None:
            kind, reason = "no_state", "no robot state received yet"
        elif needs_state and now_s - newest_state_s > self.max_state_age_s:
            kind, reason = "stale_state", (f"robot state is {now_s - newest_state_s:.2f} s old "
                                           f"(watchdog.max_state_age_s {self.max_state_age_s:g})")
        elif needs_measured and newest_measured_s is None:
            kind, reason = "no_measured", "no measured robot position received yet (motion starts from it)"
        elif needs_measured and now_s - newest_measured_s > self.max_state_age_s:
            kind, reason = "stale_measured", (f"measured robot position is {now_s - newest_measured_s:.2f} s old "
                                              f"(watchdog.max_state_age_s {self.max_state_age_s:g})")
        else:
            kind, reason = "ok", ""
        return MotionVerdict(allowed=not reason, reason=reason, kind=kind)


def _on(names: Sequence[str]) -> str:
    named = [name for name in names if name]
    return f" on {', '.join(named)}" if named else ""


# ---- action vector -> command fields ------------------------------------------------------------
def twist_from_action(arm: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(linear xyz, angular xyz) from a 3-D (delta xyz) or 6-D (delta xyz + rpy) EE action."""
    if arm.size not in (3, 6):
        raise ValueError(f"ee_twist needs 3 (xyz) or 6 (xyz + rpy) non-gripper action values, got {arm.size}")
    scaled = np.asarray(arm, dtype=np.float64) * scale
    angular = scaled[3:6] if arm.size == 6 else np.zeros(3)
    return scaled[:3], angular


def pose_from_action(arm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(position xyz, unit quaternion xyzw) from a 7-D pose action; None if the quaternion is ~0."""
    if arm.size != 7:
        raise ValueError(f"ee_pose needs 7 non-gripper action values (xyz + quaternion xyzw), got {arm.size}")
    quat = np.asarray(arm[3:7], dtype=np.float64)
    norm = float(np.linalg.norm(quat))
    if not norm > 1e-6:
        return None
    return np.asarray(arm[:3], dtype=np.float64), quat / norm


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


# ---- run-time statistics --------------------------------------------------------------------------
class RollingPercentiles:
    """Percentiles over the newest ``size`` samples."""

    def __init__(self, size: int = 300):
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self._samples.append(float(value))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self._samples, q)) if self._samples else float("nan")

    def __len__(self) -> int:
        return len(self._samples)
