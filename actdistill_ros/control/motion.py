"""The policy node's motion rules, without ROS: what the node commands on each control tick.

The policy node is a thin ROS shell around ``MotionController``: it reports input arrivals
(camera frames, command, robot state, measured position, each with its header stamp), hands over
every predicted chunk, parameter changes, the emergency stop and the lifecycle state, and
publishes what ``tick()`` returns. The controller runs on an injectable clock (the node's ROS
clock, the one stamps are written in), so every rule below is unit-tested without DDS or sleeping
(test/test_control_motion.py).

Rules (the README's "Policy node" section states them for robot owners):
1. Commands leave only on the control tick, one per period of control_rate_hz, whatever the
   inference rate: a chunk predicted between two ticks starts (its step 0) at the next tick.
2. Every command is physical and moves at most one period's worth of the limits (``ActionLimits``,
   per second) from the command before it, so the arm's speed does not depend on control_rate_hz.
   joint_trajectory limits the new trajectory's first point against the target commanded for
   now, and each following point against the one before it.
3. After start-up, after any hold and after re-enabling (enable_output, emergency-stop release,
   lifecycle activation), position modes ramp from the measured position (joint_state,
   joint_trajectory: the JointState; ee_pose: the measured PoseStamped) and never move without a
   fresh one; ee_twist ramps from the last commanded twist (zero after a completed stop).
4. Inputs are judged by their stamps (``freshness``): motion holds when any camera, the robot
   state or the measured position is stale, frozen or from the future beyond the clock skew.
5. Every hold commands an explicit stop. Position modes: the hold target is the measured position
   when it is fresh, else the last commanded target, and the commands move to it within the limits
   (joint_trajectory: one trajectory to it per hold). ee_twist: the twist decelerates to zero at the
   acceleration limits; the emergency stop, deactivation and shutdown command zero at once.
   Setting enable_output to false stops like a hold, then the dry run publishes no commands; the
   emergency stop repeats its stop on every tick until released (also in a dry run).
6. A chunk is executed only while its inputs are young (its oldest frame stamp at most
   watchdog.max_image_age_s old, its robot state stamp at most watchdog.max_state_age_s old, at the
   tick that executes it) and its instruction is the current one. After an emergency-stop release,
   re-enabling or activation only chunks computed from inputs received after that moment run.
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

from actdistill_ros.control.chunks import ChunkScheduler, is_finite_chunk
from actdistill_ros.control.commands import pose_from_command
from actdistill_ros.control.freshness import StampedInput, young_enough
from actdistill_ros.control.limits import ACTION_MODES, ActionLimits

# Modes that command positions: they ramp from, and hold at, a measured position.
MEASURED_MODES = ("joint_state", "joint_trajectory", "ee_pose")
ESTOP_REASON = "emergency stop engaged (release it with false on ~/emergency_stop)"
MAX_STOP_POINTS = 10_000  # joint_trajectory: a stop trajectory longer than this many periods is cut


@dataclass(frozen=True)
class ControlSettings:
    """The run-time parameters the rules depend on (rebuilt as a whole on every parameter set)."""

    limits: ActionLimits
    temporal_ensemble: bool = False
    ensemble_decay: float = 0.01
    max_image_age_s: float = 0.5
    max_state_age_s: float = 0.5
    max_clock_skew_s: float = 0.05
    enable_output: bool = False

    @property
    def control_rate_hz(self) -> float:
        return 1.0 / self.limits.period_s


@dataclass(frozen=True)
class ChunkSource:
    """What one inference was computed from (controller clock), plus the caller's token."""

    frames_s: tuple[float, ...]  # the effective stamp of each camera's frame
    state_s: float | None = None  # the robot state's stamp; None: no state input
    token: Any = None  # handed back in TickResult.started / dropped
    command_s: float | None = None  # when its instruction arrived (note_command); None: not checked
    received_s: float | None = None  # when its oldest input arrived; None: its oldest stamp

    @property
    def oldest_frame_s(self) -> float:
        return min(self.frames_s)

    @property
    def oldest_received_s(self) -> float:
        if self.received_s is not None:
            return self.received_s
        return min(self.frames_s + (() if self.state_s is None else (self.state_s,)))


@dataclass
class TickResult:
    """What to publish now. ``arm`` is the arm command in physical units: (A,) values, or for
    joint_trajectory (K, A) points one control period apart; None = publish nothing for the arm."""

    arm: np.ndarray | None = None
    gripper: float | None = None
    stop: bool = False  # arm is an explicit stop (zero twist / hold position), not a policy step
    started: list = field(default_factory=list)  # tokens of chunks whose first step this tick executed
    dropped: list = field(default_factory=list)  # tokens of chunks discarded without being executed
    reason: str = ""  # why motion is held; "" while the policy drives (or waits for its next chunk)
    reason_changed: bool = False  # the reason differs from the last tick's: log it once


class MotionController:
    """All motion rules of the policy node (see the module docstring). Thread-safe."""

    def __init__(self, mode: str, settings: ControlSettings, *, cameras: Sequence[str] = ("camera",),
                 needs_state: bool = False, active: bool = True, clock: Callable[[], float] = time.time):
        if mode not in ACTION_MODES:
            raise ValueError(f"action.mode must be one of {list(ACTION_MODES)}, got {mode!r}")
        if settings.limits.mode != mode:
            raise ValueError(f"the limits are for {settings.limits.mode}, the controller for {mode}")
        self.mode = mode
        self.clock = clock
        self._lock = threading.Lock()
        self._dim = settings.limits.low.size
        self._gripper_index = settings.limits.gripper_index
        self._arm = settings.limits.arm
        self._cameras = list(cameras)
        self._needs_state = bool(needs_state)
        self._needs_measured = mode in MEASURED_MODES
        self._settings = settings
        self._scheduler = ChunkScheduler(self._ensembles(settings), settings.ensemble_decay)
        # Newest inputs, judged by their stamps.
        self._frames = [StampedInput(f"camera {name}", "frame", "watchdog.max_image_age_s") for name in cameras]
        self._state = StampedInput("robot state", "state", "watchdog.max_state_age_s")
        self._measured_input = StampedInput("measured robot position", "measured", "watchdog.max_state_age_s")
        self._has_command = False
        self._command_s = -math.inf  # when the current instruction arrived
        self._measured: np.ndarray | None = None  # (A,) measured arm position (joint / pose modes)
        # Plan and command state (physical units).
        self._pending: list[tuple[np.ndarray, ChunkSource]] = []  # handed over since the last tick
        self._tick = 0
        self._planned: np.ndarray | None = None  # (D,) the plan's last step (commanded, or not in a dry run)
        self._sent: np.ndarray | None = None  # (D,) the last command published (motion or stop)
        self._moving = False  # False: holding (start-up too); the next motion ramps from the reference
        self._hold_target: np.ndarray | None = None  # (A,) position held during this hold
        self._hold_sent = False  # joint_trajectory: this hold's stop trajectory went out
        self._active = bool(active)
        self._estop = False
        self._fresh_after = -math.inf  # only chunks from inputs received after this run
        self._stopping = False  # enable_output went false: stop commands go out until the stop is complete
        self._reason_kind: str | None = None
        self.reason = "starting"
        self.counts = {"chunks_started": 0, "chunks_superseded": 0, "chunks_dropped_stale": 0,
                       "chunks_dropped_holding": 0, "commands_sent": 0, "stops_sent": 0}

    # ------------------------------------------------------------------ inputs
    def note_frame(self, camera: int, stamp_s: float | None = None,
                   received_s: float | None = None) -> tuple[float, str | None]:
        """A frame from camera ``camera`` (index into ``cameras``) with header stamp ``stamp_s``
        (None: stamped on receipt; 0: unstamped) arrived. Returns (its effective stamp, a warning
        to log once or None)."""
        with self._lock:
            return self._note(self._frames[camera], stamp_s, received_s)

    def note_command(self, present: bool, received_s: float | None = None) -> float:
        """A new instruction (``present``) or an empty one arrived; returns its receipt time. Chunks
        computed for an earlier instruction no longer run."""
        with self._lock:
            self._has_command = bool(present)
            self._command_s = self.clock() if received_s is None else float(received_s)
            return self._command_s

    def note_state(self, stamp_s: float | None = None,
                   received_s: float | None = None) -> tuple[float, str | None]:
        """The robot state the policy reads arrived (see ``note_frame``)."""
        with self._lock:
            return self._note(self._state, stamp_s, received_s)

    def note_measured(self, arm: np.ndarray, stamp_s: float | None = None,
                      received_s: float | None = None) -> str | None:
        """The measured arm position (joint positions in command order, or the pose xyz + xyzw);
        returns a warning to log once or None."""
        arm = np.asarray(arm, dtype=np.float64)
        if arm.shape != self._arm.shape or not np.isfinite(arm).all():
            raise ValueError(f"measured position must be {self._arm.size} finite values, got {arm.tolist()}")
        if self.mode == "ee_pose" and pose_from_command(arm) is None:  # a hold at it could not be sent
            raise ValueError(f"measured pose has a zero quaternion {arm[3:7].tolist()}, expected a unit "
                             f"quaternion xyzw")
        with self._lock:
            self._measured = arm
            return self._note(self._measured_input, stamp_s, received_s)[1]

    def _note(self, stamped: StampedInput, stamp_s: float | None,
              received_s: float | None) -> tuple[float, str | None]:
        received = self.clock() if received_s is None else float(received_s)
        return stamped.note(received if stamp_s is None else float(stamp_s), received)

    def add_chunk(self, actions: np.ndarray, source: ChunkSource) -> np.ndarray | None:
        """Queue a predicted chunk (card units) for the next tick; returns it as physical commands
        within the bounds, or None when it holds NaN/inf (refused; not reported by ``tick``: the
        caller accounts for it)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] != self._dim:
            raise ValueError(f"an action chunk must have shape (H>0, {self._dim}), got {actions.shape}")
        if not is_finite_chunk(actions):
            return None
        with self._lock:
            physical = self._settings.limits.to_physical(actions)
            self._pending.append((physical, source))
            return physical

    def input_ages(self, now: float | None = None) -> dict[str, float]:
        """Age by stamp (s) of each input's newest sample (NaN: none yet), for diagnostics."""
        with self._lock:
            now = self.clock() if now is None else float(now)
            inputs = list(self._frames) + ([self._state] if self._needs_state else []) + (
                [self._measured_input] if self._needs_measured else [])
            return {stamped.name: (math.nan if stamped.stamp_s is None else now - stamped.stamp_s)
                    for stamped in inputs}

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
            ensemble = self._ensembles(settings)
            if ensemble != self._scheduler.temporal_ensemble:
                self._scheduler.clear()
            self._scheduler.temporal_ensemble = ensemble
            self._scheduler.decay = settings.ensemble_decay
            if previous.enable_output and not settings.enable_output:
                self._stopping = True
            elif settings.enable_output and not previous.enable_output:
                self._stopping = False
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
                result = self._stop_now(self.clock() if now is None else now)
                self._active = False
                self._scheduler.clear()
            return result

    def stop_now(self, now: float | None = None) -> TickResult:
        """The explicit stop to publish at once (shutdown): nothing while inactive, nor in a dry run
        whose stop (enable_output switched off) is complete."""
        with self._lock:
            return self._stop_now(self.clock() if now is None else now) if self._active else TickResult()

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
            stopping = self._active and self._stopping and not publish
            if reason:
                self._scheduler.clear()
                self._drop(result, [source for _, source in usable], "chunks_dropped_holding")
                self._hold(result, now, publish or stopping, at_once=self._estop and self._active)
            else:
                for actions, source in usable:
                    self._scheduler.add(actions, self._tick, source)
                action = self._scheduler.action_at(self._tick)
                if action is None:
                    self._hold(result, now, publish or stopping)  # ran dry: no chunk covers this tick
                else:
                    self._move(result, action, ends_hold=publish)
                    result.started = [source.token for _, source in usable]
                    self.counts["chunks_started"] += len(usable)
                    if not publish:  # dry run: the plan runs (statistics), nothing is commanded
                        result.arm = result.gripper = None
                        if stopping:
                            self._hold(result, now, True, plan_holds=False)
                    else:
                        self._sent = self._planned.copy()
            if stopping and self._stop_complete():
                self._stopping = False
            if result.arm is not None:
                self.counts["stops_sent" if result.stop else "commands_sent"] += 1
            return result

    # ------------------------------------------------------------------ internals (under the lock)
    def _ensembles(self, settings: ControlSettings) -> bool:
        return settings.temporal_ensemble and self.mode != "joint_trajectory"  # a trajectory is one chunk

    def _inputs_young(self, source: ChunkSource, now: float) -> bool:
        """The chunk's frames and state are young enough, and its instruction is the current one."""
        settings = self._settings
        return (young_enough(source.oldest_frame_s, now, settings.max_image_age_s)
                and young_enough(source.state_s, now, settings.max_state_age_s)
                and (source.command_s is None or source.command_s >= self._command_s))

    def _take_pending(self, now: float, result: TickResult) -> list[tuple[np.ndarray, ChunkSource]]:
        """The chunks handed over since the last tick that may start now (the others: dropped)."""
        arrived, self._pending = self._pending, []
        fresh = [s.oldest_received_s > self._fresh_after and self._inputs_young(s, now) for _, s in arrived]
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
        settings = self._settings
        if not self._active:
            return "inactive", "inactive (lifecycle state)"
        if self._estop:
            return "emergency_stop", ESTOP_REASON
        if not self._has_command:
            return "no_command", "no command received yet"
        missing = [name for name, frame in zip(self._cameras, self._frames) if frame.stamp_s is None]
        if missing:
            return "no_frame", f"no camera frame received yet on {', '.join(missing)}"
        for frame in self._frames:
            stale = frame.staleness(now, settings.max_image_age_s, settings.max_clock_skew_s)
            if stale is not None:
                return stale.kind, stale.reason
        checks = [(self._needs_state, self._state, "no_state", "no robot state received yet"),
                  (self._needs_measured, self._measured_input, "no_measured",
                   "no measured robot position received yet (motion starts from it)")]
        for needed, stamped, kind, missing_reason in checks:
            if not needed:
                continue
            if stamped.stamp_s is None:
                return kind, missing_reason
            stale = stamped.staleness(now, settings.max_state_age_s, settings.max_clock_skew_s)
            if stale is not None:
                return stale.kind, stale.reason
        return "ok", ""

    def _measured_fresh(self, now: float) -> bool:
        settings = self._settings
        return (self._measured is not None and self._measured_input.staleness(
            now, settings.max_state_age_s, settings.max_clock_skew_s) is None)

    def _restart(self, now: float) -> None:
        """After a stop: hold until a chunk from inputs received from now on, then ramp from the reference."""
        self._fresh_after = now
        self._scheduler.clear()
        self._moving = False
        self._hold_target, self._hold_sent = None, False
        if self._sent is None:  # a dry run's plan was never commanded: the stop must not start from it
            self._planned = None

    def _reference(self) -> np.ndarray:
        """Where motion ramps from after a hold: the last commanded twist, or the measured position."""
        reference = np.zeros(self._dim) if self._sent is None else self._sent.copy()
        if self.mode != "ee_twist":
            reference[self._arm] = self._measured
        return reference

    def _move(self, result: TickResult, action: np.ndarray, ends_hold: bool = True) -> None:
        """The plan's next step; ``ends_hold`` False: a dry run, whose stop (if any) goes on."""
        limits = self._settings.limits
        previous = self._planned if self._moving else self._reference()
        if self.mode == "joint_trajectory":
            start = self._scheduler.newest_start()
            step = self._tick - start
            if step == 0 or not self._moving:  # a new trajectory: send it whole, limited from now on
                chunk = self._scheduler.newest().copy()
                chunk[step:] = limits.sequence(chunk[step:], previous)
                self._scheduler.replace_newest(chunk)
                result.arm = chunk[step:][:, self._arm]
            action = self._scheduler.newest()[step]  # the target the running trajectory commands for now
        else:
            action = limits.step(action, previous)
            result.arm = action[self._arm]
        if self._gripper_index is not None:
            result.gripper = float(action[self._gripper_index])
        self._planned = action
        self._moving = True
        if ends_hold:
            self._hold_target, self._hold_sent = None, False

    def _hold(self, result: TickResult, now: float, publish: bool, at_once: bool = False,
              plan_holds: bool = True) -> None:
        """Publish (when ``publish``) this tick's stop command. ``plan_holds`` False: a dry run's plan
        keeps running; only the stop of switching output off goes out."""
        if self._moving and plan_holds:  # entering a hold
            self._moving = False
            self._hold_target, self._hold_sent = None, False
        if not publish:
            return
        command = self._stop_command(now, at_once)
        if command is None:
            return  # nothing measured or commanded yet: nothing to hold
        if self.mode == "joint_trajectory":
            if self._hold_sent:
                return  # once per hold: re-sending would restart its timing
            self._hold_sent = True
        if command.ndim == 2:  # a stop trajectory: where it ends is what was commanded last
            result.arm, self._sent = command[:, self._arm], command[-1]
        else:
            result.arm, self._sent = command[self._arm], command
        result.stop = True

    def _stop_command(self, now: float, at_once: bool) -> np.ndarray | None:
        """The stop command (D,), or (K, D) for joint_trajectory: towards zero twist, or towards the
        position held, within the limits from the last command sent."""
        limits = self._settings.limits
        if self.mode == "ee_twist":
            target = np.zeros(self._dim) if self._sent is None else self._sent.copy()
            target[self._arm] = 0.0
            return target if at_once or self._sent is None else limits.step(target, self._sent)
        if self._hold_target is None:
            if self._measured_fresh(now):
                self._hold_target = self._measured.copy()
            elif self._sent is not None:
                self._hold_target = self._sent[self._arm].copy()
            elif self._planned is not None:
                self._hold_target = self._planned[self._arm].copy()
        if self._hold_target is None:
            return None
        base = self._sent if self._sent is not None else self._planned
        target = np.zeros(self._dim) if base is None else base.copy()
        target[self._arm] = self._hold_target
        if base is None:
            return target[None] if self.mode == "joint_trajectory" else target
        if self.mode != "joint_trajectory":
            return limits.step(target, base)
        points = [limits.step(target, base)]
        while len(points) < MAX_STOP_POINTS and not np.allclose(points[-1][self._arm], self._hold_target):
            points.append(limits.step(target, points[-1]))
        return np.stack(points)

    def _stop_complete(self) -> bool:
        """The stop of switching output off has arrived: zero twist, or the hold target commanded."""
        if self._sent is None:
            return True
        if self.mode == "ee_twist":
            return self._settings.limits.stopped(self._sent)
        if self.mode == "joint_trajectory":
            return self._hold_sent
        return self._hold_target is not None and bool(np.allclose(self._sent[self._arm], self._hold_target))

    def _stop_now(self, now: float) -> TickResult:
        result = TickResult()
        if self._settings.enable_output or self._estop or self._stopping:
            self._stopping = False
            if self._moving:
                self._moving = False
                self._hold_target, self._hold_sent = None, False
            self._hold_sent = False
            self._hold(result, now, True, at_once=True)
            if result.arm is not None:
                self.counts["stops_sent"] += 1
        return result
