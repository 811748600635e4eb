"""The policy node's motion rules, without ROS: what the node commands on each control tick.

The policy node is a thin ROS shell around ``MotionController``: it reports input arrivals
(camera frames, command, robot state, measured position), hands over every predicted chunk,
parameter changes, the emergency stop and the lifecycle state, and publishes what ``tick()``
returns. The controller runs on an injectable monotonic clock, so every rule below is
unit-tested without DDS or sleeping (test/test_motion_controller.py).

Rules (the README's "Policy node" section states them for robot owners):
1. Commands leave only on the control tick, one per period of control_rate_hz, whatever the
   inference rate: a chunk predicted between two ticks starts (its step 0) at the next tick.
2. The velocity limit bounds the change of each commanded value per control period (gripper
   excluded). In joint and pose modes this holds also when the previous command or the measured
   position lies outside the limits (narrowed at run time): commands move back inside at that
   rate; in ee_twist a narrowed bound applies at once (it only slows down). joint_trajectory
   limits the new trajectory's first point against the target commanded for now, and each
   following point against the one before it.
3. After start-up, after any hold and after re-enabling (enable_output, emergency-stop release,
   lifecycle activation), motion ramps from the measured position (joint_state,
   joint_trajectory: the JointState; ee_pose: the measured PoseStamped) or from zero (ee_twist).
   Joint and pose modes never move without a fresh measured position.
4. Every hold commands an explicit stop: ee_twist a zero twist on every tick; joint_state and
   ee_pose the position measured when the hold began, on every tick; joint_trajectory a
   one-point trajectory to that position, once per hold. Setting enable_output to false sends
   that stop once, then the dry run publishes no commands; the emergency stop repeats it on every
   tick until released (also in a dry run).
5. A chunk is executed only while its inputs are young: its oldest camera frame at most
   watchdog.max_image_age_s old and its robot state at most watchdog.max_state_age_s old, at the
   tick that executes it; and only while its instruction is the current one. After an
   emergency-stop release, re-enabling or activation only chunks computed from frames and a robot
   state received after that moment run ("fresh inputs").
6. The emergency stop latches until released; inference goes on, every chunk is dropped.
7. Every chunk handed over is reported exactly once: started (its first step executed, or
   would have been in a dry run) or dropped (superseded before a tick, too old, or held).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from actdistill_ros.ros.action_output import (ACTION_MODES, ChunkScheduler, MotionWatchdog, SafetyLimits,
                                              is_finite_chunk, pose_from_action)

# Modes that command positions: they ramp from, and hold at, a measured position.
MEASURED_MODES = ("joint_state", "joint_trajectory", "ee_pose")
ESTOP_REASON = "emergency stop engaged (release it with false on ~/emergency_stop)"


@dataclass(frozen=True)
class ControlSettings:
    """The run-time parameters the rules depend on (rebuilt as a whole on every parameter set)."""

    control_rate_hz: float
    limits: SafetyLimits
    temporal_ensemble: bool = False
    ensemble_decay: float = 0.01
    max_image_age_s: float = 0.5
    max_state_age_s: float = 0.5
    enable_output: bool = True


@dataclass(frozen=True)
class ChunkSource:
    """When the inputs of one inference were received (controller clock), plus the caller's token."""

    frames_s: tuple[float, ...]  # one per camera
    state_s: float | None = None  # the robot state fed to the policy; None: none
    token: Any = None  # handed back in TickResult.started / dropped
    command_s: float | None = None  # when its instruction arrived (note_command); None: not checked

    @property
    def oldest_frame_s(self) -> float:
        return min(self.frames_s)


@dataclass
class TickResult:
    """What to publish now. ``arm`` is the arm command: (A,) values, or for joint_trajectory (K, A)
    points one control period apart; None = publish nothing for the arm."""

    arm: np.ndarray | None = None
    gripper: float | None = None
    stop: bool = False  # arm is an explicit stop (zero twist / hold position), not a policy step
    started: list = field(default_factory=list)  # tokens of chunks whose first step this tick executed
    dropped: list = field(default_factory=list)  # tokens of chunks discarded without being executed
    reason: str = ""  # why motion is held; "" while the policy drives (or waits for its next chunk)
    reason_changed: bool = False  # the reason differs from the last tick's: log it once


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


class MotionController:
    """All motion rules of the policy node (see the module docstring). Thread-safe."""

    def __init__(self, mode: str, settings: ControlSettings, action_dim: int, gripper_index: int | None = None, *,
                 cameras: Sequence[str] = ("camera",), needs_state: bool = False, active: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in ACTION_MODES:
            raise ValueError(f"action.mode must be one of {list(ACTION_MODES)}, got {mode!r}")
        self.mode = mode
        self.clock = clock
        self._lock = threading.Lock()
        self._dim = int(action_dim)
        self._gripper_index = gripper_index
        self._arm = np.array([i for i in range(self._dim) if i != gripper_index], dtype=int)
        self._cameras = list(cameras)
        self._needs_state = bool(needs_state)
        self._needs_measured = mode in MEASURED_MODES
        self._settings = settings
        self._scheduler = ChunkScheduler(self._ensembles(settings), settings.ensemble_decay)
        self._watchdog = MotionWatchdog(settings.max_image_age_s, settings.max_state_age_s)
        # Newest inputs (controller clock).
        self._frames_s: list[float | None] = [None] * len(self._cameras)
        self._has_command = False
        self._command_s = -math.inf  # when the current instruction arrived
        self._state_s: float | None = None
        self._measured: np.ndarray | None = None  # (A,) measured arm position (joint / pose modes)
        self._measured_s: float | None = None
        # Plan and command state.
        self._pending: list[tuple[np.ndarray, ChunkSource]] = []  # handed over since the last tick
        self._tick = 0
        self._last: np.ndarray | None = None  # (D,) action commanded at the last tick that moved
        self._moving = False  # False: holding (start-up too); the next motion ramps from the reference
        self._hold_target: np.ndarray | None = None  # (A,) position held during this hold
        self._hold_sent = False  # joint_trajectory: this hold's one-point trajectory went out
        self._active = bool(active)
        self._estop = False
        self._fresh_after = -math.inf  # only chunks from inputs received after this run
        self._stop_once = False  # enable_output went false: send one stop at the next tick
        self._reason_kind: str | None = None
        self.reason = "starting"
        self.counts = {"chunks_started": 0, "chunks_superseded": 0, "chunks_dropped_stale": 0,
                       "chunks_dropped_holding": 0, "commands_sent": 0, "stops_sent": 0}

    # ------------------------------------------------------------------ inputs
    def note_frame(self, camera: int, received_s: float | None = None) -> float:
        """A frame from camera ``camera`` (index into ``cameras``) arrived; returns its receipt time."""
        with self._lock:
            t = self.clock() if received_s is None else float(received_s)
            self._frames_s[camera] = t
            return t

    def note_command(self, present: bool, received_s: float | None = None) -> float:
        """A new instruction (``present``) or an empty one arrived; returns its receipt time. Chunks
        computed for an earlier instruction no longer run."""
        with self._lock:
            self._has_command = bool(present)
            self._command_s = self.clock() if received_s is None else float(received_s)
            return self._command_s

    def note_state(self, received_s: float | None = None) -> float:
        """The robot state the policy reads arrived; returns its receipt time."""
        with self._lock:
            t = self.clock() if received_s is None else float(received_s)
            self._state_s = t
            return t

    def note_measured(self, arm: np.ndarray, received_s: float | None = None) -> None:
        """The measured arm position (joint positions in command order, or the pose xyz + xyzw)."""
        arm = np.asarray(arm, dtype=np.float64)
        if arm.shape != self._arm.shape or not np.isfinite(arm).all():
            raise ValueError(f"measured position must be {self._arm.size} finite values, got {arm.tolist()}")
        if self.mode == "ee_pose" and pose_from_action(arm) is None:  # a hold at it could not be sent
            raise ValueError(f"measured pose has a zero quaternion {arm[3:7].tolist()}, expected a unit "
                             f"quaternion xyzw")
        with self._lock:
            self._measured = arm
            self._measured_s = self.clock() if received_s is None else float(received_s)

    def add_chunk(self, actions: np.ndarray, source: ChunkSource) -> np.ndarray | None:
        """Queue a predicted chunk for the next tick; returns it clamped to the limits, or None when
        it holds NaN/inf (refused; not reported by ``tick``: the caller accounts for it)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] != self._dim:
            raise ValueError(f"an action chunk must have shape (H>0, {self._dim}), got {actions.shape}")
        if not is_finite_chunk(actions):
            return None
        with self._lock:
            clamped = self._settings.limits.clamp(actions)
            self._pending.append((clamped, source))
            return clamped

    # ------------------------------------------------------------------ settings and state changes
    @property
    def settings(self) -> ControlSettings:
        return self._settings

    @property
    def emergency_stopped(self) -> bool:
        return self._estop

    def set_settings(self, settings: ControlSettings, now: float | None = None) -> None:
        with self._lock:
            previous, self._settings = self._settings, settings
            self._watchdog.max_image_age_s = settings.max_image_age_s
            self._watchdog.max_state_age_s = settings.max_state_age_s
            ensemble = self._ensembles(settings)
            if ensemble != self._scheduler.temporal_ensemble:
                self._scheduler.clear()
            self._scheduler.temporal_ensemble = ensemble
            self._scheduler.decay = settings.ensemble_decay
            if previous.enable_output and not settings.enable_output:
                self._stop_once = True
            elif settings.enable_output and not previous.enable_output:
                self._restart(self.clock() if now is None else now)

    def emergency_stop(self, engaged: bool, now: float | None = None) -> bool:
        """Engage (latched) or release the emergency stop; True when the state changed."""
        with self._lock:
            if bool(engaged) == self._estop:
                return False
            self._estop = bool(engaged)
            if self._estop:
                self._scheduler.clear()
            else:
                self._restart(self.clock() if now is None else now)
            return True

    def set_active(self, active: bool, now: float | None = None) -> TickResult:
        """Lifecycle activate / deactivate. Deactivating returns the explicit stop to publish now."""
        with self._lock:
            result = TickResult()
            if active and not self._active:
                self._active = True
                self._restart(self.clock() if now is None else now)
            elif not active and self._active:
                result = self._stop_now()
                self._active = False
                self._scheduler.clear()
            return result

    def stop_now(self) -> TickResult:
        """The explicit stop to publish at once (shutdown): nothing while inactive, nor in a dry run
        whose one stop (enable_output switched off) already went out."""
        with self._lock:
            return self._stop_now() if self._active else TickResult()

    # ------------------------------------------------------------------ the control tick
    def tick(self, now: float | None = None) -> TickResult:
        with self._lock:
            now = self.clock() if now is None else float(now)
            self._tick += 1
            result = TickResult()
            usable = self._take_pending(now, result)
            # A running chunk whose inputs aged past the watchdog limits stops counting.
            self._scheduler.drop_where(lambda source: not self._inputs_young(source, now))
            kind, reason = self._gate(now)
            result.reason, result.reason_changed = reason, kind != self._reason_kind
            self._reason_kind, self.reason = kind, reason
            publish = self._active and (self._settings.enable_output or self._estop)
            stop_once, self._stop_once = self._stop_once and self._active, False
            if reason:
                self._scheduler.clear()
                self._drop(result, [source for _, source in usable], "chunks_dropped_holding")
                self._hold(result, publish or stop_once)
            else:
                for actions, source in usable:
                    self._scheduler.add(actions, self._tick, source)
                action = self._scheduler.action_at(self._tick)
                if action is None:
                    self._hold(result, publish or stop_once)  # ran dry: no chunk covers this tick
                else:
                    self._move(result, action)
                    result.started = [source.token for _, source in usable]
                    self.counts["chunks_started"] += len(usable)
                    if not publish:  # dry run: the plan runs (statistics), nothing is commanded
                        result.arm = result.gripper = None
                        if stop_once:
                            result.arm, result.stop = self._stop_arm(), True
            if result.arm is not None:
                self.counts["stops_sent" if result.stop else "commands_sent"] += 1
            return result

    # ------------------------------------------------------------------ internals (under the lock)
    def _ensembles(self, settings: ControlSettings) -> bool:
        return settings.temporal_ensemble and self.mode != "joint_trajectory"  # a trajectory is one chunk

    def _inputs_young(self, source: ChunkSource, now: float) -> bool:
        """The chunk's frames and state are young enough, and its instruction is the current one."""
        settings = self._settings
        return (now - source.oldest_frame_s <= settings.max_image_age_s
                and (source.state_s is None or now - source.state_s <= settings.max_state_age_s)
                and (source.command_s is None or source.command_s >= self._command_s))

    def _received_since_restart(self, source: ChunkSource) -> bool:
        """Its frames and robot state all arrived after the last restart (release, re-enable, activate)."""
        return (source.oldest_frame_s > self._fresh_after
                and (source.state_s is None or source.state_s > self._fresh_after))

    def _take_pending(self, now: float, result: TickResult) -> list[tuple[np.ndarray, ChunkSource]]:
        """The chunks handed over since the last tick that may start now (the others: dropped)."""
        arrived, self._pending = self._pending, []
        fresh = [self._received_since_restart(s) and self._inputs_young(s, now) for _, s in arrived]
        usable = [entry for entry, ok in zip(arrived, fresh) if ok]
        self._drop(result, [s for (_, s), ok in zip(arrived, fresh) if not ok], "chunks_dropped_stale")
        if not self._scheduler.temporal_ensemble and len(usable) > 1:
            self._drop(result, [s for _, s in usable[:-1]], "chunks_superseded")  # only the newest starts
            usable = usable[-1:]
        return usable

    def _drop(self, result: TickResult, sources: list[ChunkSource], counter: str) -> None:
        result.dropped.extend(source.token for source in sources)
        self.counts[counter] += len(sources)

    def _gate(self, now: float) -> tuple[str, str]:
        """(kind, reason) motion is held for; ("ok", "") when the policy may drive."""
        if not self._active:
            return "inactive", "inactive (lifecycle state)"
        if self._estop:
            return "emergency_stop", ESTOP_REASON
        verdict = self._watchdog.check(now, self._frames_s, self._has_command, cameras=self._cameras,
                                       needs_state=self._needs_state, newest_state_s=self._state_s,
                                       needs_measured=self._needs_measured, newest_measured_s=self._measured_s)
        return verdict.kind, verdict.reason

    def _restart(self, now: float) -> None:
        """After a stop: hold until a chunk from inputs received from now on, then ramp from the reference."""
        self._fresh_after = now
        self._scheduler.clear()
        self._moving = False
        self._hold_target, self._hold_sent = None, False

    def _reference(self) -> np.ndarray:
        """Where motion ramps from after a hold: zero twist, or the measured position."""
        reference = np.zeros(self._dim) if self._last is None else self._last.copy()
        reference[self._arm] = 0.0 if self.mode == "ee_twist" else self._measured
        return reference

    def _move(self, result: TickResult, action: np.ndarray) -> None:
        limits = self._settings.limits
        previous = self._last if self._moving else self._reference()
        if self.mode == "joint_trajectory":
            start = self._scheduler.newest_start()
            step = self._tick - start
            if step == 0 or not self._moving:  # a new trajectory: send it whole, limited from now on
                chunk = self._scheduler.newest().copy()
                chunk[step:] = limits.limit_sequence(chunk[step:], previous)
                self._scheduler.replace_newest(chunk)
                result.arm = chunk[step:][:, self._arm]
            action = self._scheduler.newest()[step]  # the target the running trajectory commands for now
        else:
            if self.mode == "ee_pose":
                previous = self._same_hemisphere(previous, action)
            elif self.mode == "ee_twist":  # a narrowed speed bound bites at once: slowing down is never delayed
                previous = limits.clamp(previous)
            action = limits.limit_step(action, previous)
            result.arm = action[self._arm]
        if self._gripper_index is not None:
            result.gripper = float(action[self._gripper_index])
        self._last = action
        self._moving = True
        self._hold_target, self._hold_sent = None, False

    def _same_hemisphere(self, previous: np.ndarray, action: np.ndarray) -> np.ndarray:
        """q and -q are the same rotation: limit towards the target from the nearer sign."""
        quaternion = self._arm[3:7]
        if float(np.dot(previous[quaternion], action[quaternion])) < 0.0:
            previous = previous.copy()
            previous[quaternion] = -previous[quaternion]
        return previous

    def _hold(self, result: TickResult, publish: bool) -> None:
        if self._moving:  # entering a hold
            self._moving = False
            self._hold_target, self._hold_sent = None, False
        arm = self._stop_arm()
        if self.mode == "joint_trajectory" and arm is not None:
            arm = None if self._hold_sent else arm  # once per hold: re-sending would restart its timing
            self._hold_sent = self._hold_sent or publish
        if publish and arm is not None:
            result.arm, result.stop = arm, True

    def _stop_arm(self) -> np.ndarray | None:
        """The stop command: zero twist, or the position held (measured when the hold began)."""
        if self.mode == "ee_twist":
            return np.zeros(self._arm.size)
        if self._hold_target is None:
            if self._measured is not None:
                self._hold_target = self._measured.copy()
            elif self._last is not None:
                self._hold_target = self._last[self._arm].copy()
        if self._hold_target is None:
            return None  # nothing measured or commanded yet: nothing to hold
        return self._hold_target[None] if self.mode == "joint_trajectory" else self._hold_target.copy()

    def _stop_now(self) -> TickResult:
        result = TickResult()
        # Output switched off since the last tick: its one stop has not gone out yet, send it now.
        pending_stop, self._stop_once = self._stop_once, False
        if self._settings.enable_output or self._estop or pending_stop:
            if self._moving:
                self._moving = False
                self._hold_target, self._hold_sent = None, False
            arm = self._stop_arm()
            if arm is not None:
                result.arm, result.stop = arm, True
                self._hold_sent = True
                self.counts["stops_sent"] += 1
        return result
