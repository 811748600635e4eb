"""The policy node's motion rules (actdistill_ros/control/motion.py), one test per rule.

A fake clock drives the controller; the model outputs fed in exceed the limits each rule
enforces, and inputs really go stale (old stamps, frozen stamps, gaps), so a broken rule fails
its test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from actdistill_ros.control.commands import select_named
from actdistill_ros.control.limits import ActionLimits, LimitSettings
from actdistill_ros.control.motion import ChunkSource, ControlSettings, MotionController
from actdistill_ros.weights import ActionSpace

RATE = 10.0  # control_rate_hz
PERIOD = 1.0 / RATE
AGE = 0.5  # watchdog.max_image_age_s and max_state_age_s
FAST = 1000.0  # a limit far above any change the tests ask for


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float = PERIOD) -> float:
        self.t += dt
        return self.t


def action_space(mode: str, dim: int, gripper: int | None) -> ActionSpace:
    arm = dim - (gripper is not None)
    units = {"ee_twist": ["m/s"] * 3 + ["rad/s"] * (arm - 3), "ee_pose": ["m"] * 3 + ["1"] * 4}.get(mode, ["rad"] * arm)
    units = units[:]
    if gripper is not None:
        units.insert(gripper, "1")
    kind = "end_effector" if mode.startswith("ee_") else "joint"
    return ActionSpace(kind=kind, names=[f"a{i}" for i in range(dim)], units=units, low=[-1.0] * dim,
                       high=[1.0] * dim, gripper_index=gripper)


def make_settings(mode: str = "ee_twist", dim: int = 4, gripper: int | None = 3, *, speed: float = FAST,
                  accel: float = FAST, rate: float = RATE, low=(), high=(), **overrides) -> ControlSettings:
    """Limits per second: ``speed`` for joints and linear/angular speed, ``accel`` for twist changes."""
    limits = ActionLimits.build(mode, action_space(mode, dim, gripper), LimitSettings(
        position_low=tuple(low), position_high=tuple(high), max_joint_velocity=(speed,), max_linear_velocity=speed,
        max_angular_velocity=speed, max_linear_acceleration=accel, max_angular_acceleration=accel,
        max_gripper_velocity=FAST), rate)
    overrides.setdefault("enable_output", True)
    return ControlSettings(limits=limits, max_image_age_s=AGE, max_state_age_s=AGE, **overrides)


class Rig:
    """A controller with fresh inputs on demand and a counter for chunk tokens."""

    def __init__(self, mode: str = "ee_twist", dim: int = 4, gripper: int | None = 3, cameras=("front",),
                 needs_state: bool = False, **settings):
        self.clock = Clock()
        self.mode, self.dim, self.gripper = mode, dim, gripper
        self.controller = MotionController(mode, make_settings(mode, dim, gripper, **settings), cameras=cameras,
                                           needs_state=needs_state, clock=self.clock)
        self.cameras = len(cameras)
        self.tokens = 0
        self.controller.note_command(True)

    def settings(self, **settings) -> None:
        self.controller.set_settings(make_settings(self.mode, self.dim, self.gripper, **settings))

    def inputs(self, measured=None, stamp_age: float = 0.0) -> float:
        """Frames from every camera (+ state, + measured position) stamped ``stamp_age`` s ago."""
        stamp = self.clock.t - stamp_age
        for camera in range(self.cameras):
            self.controller.note_frame(camera, stamp)
        self.controller.note_state(stamp)
        if measured is not None:
            self.controller.note_measured(np.asarray(measured, dtype=float), stamp)
        return stamp

    def chunk(self, actions, frames_s=None, state_s=None) -> int:
        """Hand over a chunk computed from frames stamped ``frames_s`` (default: now)."""
        self.tokens += 1
        frames = tuple(frames_s) if frames_s is not None else (self.clock.t,) * self.cameras
        self.controller.add_chunk(np.asarray(actions, dtype=float), ChunkSource(frames, state_s, self.tokens))
        return self.tokens

    def tick(self):
        self.clock.advance()
        return self.controller.tick()


def constant(value, steps: int = 4, dim: int = 4) -> np.ndarray:
    return np.full((steps, dim), float(value))


def along_x(speed: float, steps: int = 4) -> np.ndarray:
    """ee_twist: ``speed`` m/s along x, gripper at 0 (the limits bound the norm, so one axis is clearer)."""
    chunk = np.zeros((steps, 4))
    chunk[:, 0] = speed
    return chunk


# ---------------------------------------------------------------- 1. commands only on the tick
def test_commands_leave_only_on_the_tick_whatever_the_inference_rate():
    rig = Rig()
    rig.inputs()
    published = 0
    for tick in range(10):
        for _ in range(3):  # inference three times faster than the control rate
            rig.inputs()
            rig.chunk(constant(0.3 + 0.01 * tick))
            rig.clock.advance(PERIOD / 4)
        result = rig.tick()
        published += result.arm is not None
        assert result.arm is not None and not result.stop
        assert len(result.started) == 1 and len(result.dropped) == 2  # the newest starts, two superseded
        np.testing.assert_allclose(result.arm, [0.3 + 0.01 * tick] * 3)
    assert published == 10  # one command per tick, not one per chunk
    assert rig.controller.counts["chunks_superseded"] == 20


def test_a_chunk_starts_at_the_next_tick_and_its_steps_follow_tick_by_tick():
    rig = Rig()
    rig.inputs()
    chunk = np.array([[0.1, 0, 0, 1], [0.2, 0, 0, 1], [0.3, 0, 0, 1]])
    token = rig.chunk(chunk)
    first = rig.tick()
    assert first.started == [token] and first.arm[0] == pytest.approx(0.1)
    rig.inputs()
    assert rig.tick().arm[0] == pytest.approx(0.2)
    rig.inputs()
    assert rig.tick().arm[0] == pytest.approx(0.3)
    rig.inputs()
    ran_dry = rig.tick()
    assert ran_dry.stop and ran_dry.arm.tolist() == [0, 0, 0]  # no chunk covers this tick: a stop


# ---------------------------------------------------------------- 2. limits per second, whatever the rate
@pytest.mark.parametrize("mode, dim, gripper", [("joint_state", 3, None), ("joint_trajectory", 3, None),
                                                ("ee_pose", 7, None), ("ee_twist", 4, 3)])
@pytest.mark.parametrize("rate", [5.0, 20.0, 50.0])
def test_top_speed_per_second_does_not_depend_on_the_control_rate(mode, dim, gripper, rate):
    """Same limits at 5, 20 and 50 Hz: the arm covers the same distance per second (within a period)."""
    rig = Rig(mode, dim, gripper, speed=0.2, accel=0.4, rate=rate)
    start = np.zeros(dim)
    if mode == "ee_pose":
        start[6] = 1.0  # identity rotation
    target = start.copy()
    target[:3] = 1.0  # far beyond what 2 s at 0.2 m/s (or rad/s) reach
    measured = None if mode == "ee_twist" else start[:dim - (gripper is not None)]
    position = np.zeros(3)
    for _ in range(int(round(2 * rate))):  # 2 s, a fresh chunk every period
        rig.inputs(measured=measured)
        rig.chunk(np.tile(target, (4, 1)))
        rig.clock.advance(1.0 / rate)
        command = rig.controller.tick().arm
        if mode == "joint_trajectory":
            position = command[0]  # each new trajectory's first point: the target for now
        elif mode == "ee_twist":
            position = position + command[:3] / rate  # integrate the commanded velocity
        else:
            position = command[:3]
    if mode in ("joint_state", "joint_trajectory"):
        np.testing.assert_allclose(position, [0.4] * 3, atol=0.2 / rate + 1e-9)  # 0.2 rad/s for 2 s, each joint
    elif mode == "ee_pose":
        assert np.linalg.norm(position) == pytest.approx(0.4, abs=0.2 / rate + 1e-9)  # 0.2 m/s along the norm
    else:  # a 0.5 s ramp at 0.4 m/s^2 up to 0.2 m/s (0.05 m), then 1.5 s at 0.2 m/s (0.3 m)
        assert np.linalg.norm(position) == pytest.approx(0.35, abs=0.2 / rate + 1e-9)


def test_actions_beyond_the_bounds_are_clamped_and_narrowed_bounds_apply_to_running_chunks():
    rig = Rig(low=[-0.2, -0.2, -0.2, -1.0], high=[0.2, 0.2, 0.2, 1.0])
    rig.inputs()
    rig.chunk(np.array([[5.0, -5.0, 0.1, 3.0]] * 4))
    result = rig.tick()
    np.testing.assert_allclose(result.arm, [0.2, -0.2, 0.1])
    assert result.gripper == 1.0
    rig.settings(low=[-0.05] * 3 + [-1.0], high=[0.05] * 3 + [1.0])
    rig.inputs()
    np.testing.assert_allclose(rig.tick().arm, [0.05, -0.05, 0.05])  # the chunk was clamped before the change


def test_joint_trajectory_points_are_limited_from_the_measured_state_and_from_each_other():
    rig = Rig("joint_trajectory", dim=3, gripper=None, speed=1.0)  # 0.1 rad per period
    rig.inputs(measured=[0.5, 0.0, -0.5])
    rig.chunk(np.array([[-1.0, 1.0, -0.5]] * 4))
    first = rig.tick()
    np.testing.assert_allclose(first.arm, [[0.4, 0.1, -0.5], [0.3, 0.2, -0.5], [0.2, 0.3, -0.5], [0.1, 0.4, -0.5]])
    rig.inputs(measured=[0.4, 0.1, -0.5])
    assert rig.tick().arm is None  # the running trajectory needs nothing new on this tick
    # The next trajectory starts from the target commanded for now (point 1 = [0.3, 0.2]).
    rig.inputs(measured=[0.35, 0.15, -0.5])
    rig.chunk(np.array([[1.0, -1.0, 1.0]] * 4))
    second = rig.tick()
    np.testing.assert_allclose(second.arm[0], [0.4, 0.1, -0.4])
    np.testing.assert_allclose(np.diff(second.arm, axis=0), np.full((3, 3), [0.1, -0.1, 0.1]))


def test_an_arm_beyond_narrowed_bounds_comes_back_at_the_limit_and_a_fast_twist_slows_at_once():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0, low=[-0.5] * 3, high=[0.5] * 3)
    rig.inputs(measured=[0.9, -0.9, 0.0])
    rig.chunk(constant(0.5, steps=8, dim=3))
    commanded = []
    for _ in range(5):
        rig.inputs(measured=[0.9, -0.9, 0.0])
        commanded.append(rig.tick().arm)
    np.testing.assert_allclose(commanded, [[0.8, -0.8, 0.1], [0.7, -0.7, 0.2], [0.6, -0.6, 0.3], [0.5, -0.5, 0.4],
                                           [0.5, -0.4, 0.5]])
    twist = Rig(accel=2.5)  # 0.25 m/s per period
    for _ in range(4):
        twist.inputs()
        twist.chunk(constant(0.5))
        last = twist.tick().arm
    assert np.linalg.norm(last) == pytest.approx(math.sqrt(3) * 0.5)
    twist.settings(accel=2.5, speed=0.3)  # the speed limit is narrowed while moving fast
    twist.inputs()
    twist.chunk(constant(0.5))
    assert np.linalg.norm(twist.tick().arm) == pytest.approx(0.3)  # at once, not at the deceleration limit


# ---------------------------------------------------------------- 3. ramps from the measured state
def test_joint_state_ramps_from_the_measured_state_at_start_after_a_hold_and_after_re_enabling():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.5, 0.5, 0.5])
    rig.chunk(constant(-1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [0.4, 0.4, 0.4])  # start-up: from the measured state
    rig.inputs(measured=[0.45, 0.45, 0.45])
    np.testing.assert_allclose(rig.tick().arm, [0.3, 0.3, 0.3])  # then from the last command
    # A camera gap: hold at the (fresh) measured position, within the limits, then ramp from there.
    rig.clock.advance(AGE + 0.2)
    rig.controller.note_measured(np.array([0.25, 0.25, 0.25]), rig.clock.t)
    held = rig.tick()
    assert held.stop and "camera front is" in held.reason
    np.testing.assert_allclose(held.arm, [0.25, 0.25, 0.25])
    rig.inputs(measured=[0.25, 0.25, 0.25])
    rig.chunk(constant(-1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [0.15, 0.15, 0.15])
    # Dry run, arm moved by hand, output enabled again: from the measured state again.
    rig.settings(speed=1.0, enable_output=False)
    rig.inputs(measured=[-0.6, 0.0, 0.6])
    rig.chunk(constant(1.0, dim=3))
    assert rig.tick().stop
    rig.settings(speed=1.0, enable_output=True)
    rig.clock.advance(0.01)
    rig.inputs(measured=[-0.6, 0.0, 0.6])
    rig.chunk(constant(1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [-0.5, 0.1, 0.7])


def test_ee_twist_ramps_from_the_last_commanded_twist():
    rig = Rig(accel=2.5)  # 0.25 m/s per period
    for _ in range(4):
        rig.inputs()
        rig.chunk(along_x(1.0))
        rig.tick()
    rig.inputs()
    rig.chunk(along_x(1.0))
    assert rig.tick().arm[0] == pytest.approx(1.0)  # full speed reached
    rig.controller.note_command(False)  # an empty command: hold, decelerating
    assert rig.tick().arm[0] == pytest.approx(0.75)
    rig.controller.note_command(True)
    rig.inputs()
    rig.chunk(along_x(1.0))
    assert rig.tick().arm[0] == pytest.approx(1.0)  # from 0.75, not from 0 (a jump) nor at once to 1 from 0


@pytest.mark.parametrize("mode, dim", [("joint_state", 3), ("joint_trajectory", 3), ("ee_pose", 7)])
def test_position_modes_never_move_without_a_measured_position(mode, dim):
    rig = Rig(mode, dim=dim, gripper=None)
    rig.inputs()
    rig.chunk(constant(0.5, dim=dim))
    result = rig.tick()
    assert result.arm is None and "no measured robot position" in result.reason
    assert rig.controller.counts["chunks_dropped_holding"] == 1
    # A measured position that stops coming is as bad as none.
    rig.inputs(measured=np.eye(1, dim, dim - 1)[0])  # ee_pose: the identity rotation (xyzw)
    rig.chunk(constant(0.5, dim=dim))
    assert rig.tick().arm is not None
    rig.clock.advance(AGE)
    for camera in range(rig.cameras):
        rig.controller.note_frame(camera, rig.clock.t)
    rig.controller.note_state(rig.clock.t)
    assert "measured robot position is" in rig.tick().reason


def test_ee_pose_ramps_from_the_measured_pose_through_the_nearer_quaternion_sign():
    rig = Rig("ee_pose", dim=8, gripper=7, speed=1.0)
    measured = np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, -1.0])  # -q: the same orientation as the target's
    rig.inputs(measured=measured)
    rig.chunk(np.array([[0.8, 0.0, 0.4, 0.0, 0.0, 0.0, 1.0, 0.5]] * 4))
    result = rig.tick()
    np.testing.assert_allclose(result.arm[:3], [0.4, 0.0, 0.4])
    np.testing.assert_allclose(np.abs(result.arm[3:]), [0, 0, 0, 1.0])  # not shrunk towards a zero quaternion


# ---------------------------------------------------------------- 4. staleness by stamp
def test_frames_that_keep_arriving_with_old_stamps_stop_the_arm():
    rig = Rig()
    rig.inputs()
    rig.chunk(constant(0.5, steps=40))
    assert not rig.tick().stop
    moving = 0
    for _ in range(20):  # 2 s of frames arriving on time, each stamped 2 s before it arrived
        rig.inputs(stamp_age=2.0)
        rig.chunk(constant(0.5), frames_s=(rig.clock.t - 2.0,))
        result = rig.tick()
        moving += not result.stop
    assert moving == 0 and "2.10 s old by its stamp" in rig.controller.reason


def test_frames_re_published_with_one_frozen_stamp_stop_the_arm():
    rig = Rig(cameras=("front", "wrist"))
    frozen = rig.inputs()
    rig.chunk(constant(0.5, steps=40))
    results = []
    for _ in range(10):
        rig.controller.note_frame(0, rig.clock.t)
        rig.controller.note_frame(1, frozen)  # the wrist driver hung: its last frame again and again
        rig.chunk(constant(0.5), frames_s=(rig.clock.t, frozen))
        results.append(rig.tick())
    stopped_at = next(i for i, result in enumerate(results) if result.stop)
    assert stopped_at <= round(AGE / PERIOD)  # within the max age, though frames never stopped arriving
    assert all(result.stop for result in results[stopped_at:])
    assert "camera wrist" in results[-1].reason


def test_a_stamp_from_the_future_beyond_the_skew_holds_and_a_leading_clock_within_it_does_not():
    rig = Rig(max_clock_skew_s=0.2)
    rig.inputs(stamp_age=-0.1)  # the driver's clock leads by 0.1 s
    rig.chunk(constant(0.5), frames_s=(rig.clock.t + 0.1,))
    assert not rig.tick().stop
    rig.inputs(stamp_age=-1.0)
    result = rig.tick()
    assert result.stop and "in the future" in result.reason and result.reason_changed


def test_a_chunk_from_a_frame_older_than_the_watchdog_age_is_never_executed():
    rig = Rig(cameras=("front", "wrist"))
    rig.inputs()
    before_gap = rig.clock.t
    rig.clock.advance(AGE + 0.3)  # a camera gap; the chunk computed before it arrives late
    rig.inputs()  # frames are back: the newest frames are fresh
    old = rig.chunk(constant(0.8), frames_s=(rig.clock.t, before_gap))  # the wrist frame was from before
    result = rig.tick()
    assert result.stop and result.dropped == [old] and not result.started
    fresh = rig.chunk(constant(0.8))
    assert rig.tick().started == [fresh]


def test_a_running_chunk_stops_when_its_frame_ages_past_the_limit():
    rig = Rig()
    rig.inputs()
    rig.chunk(constant(0.5, steps=20))
    executed = 0
    for _ in range(10):
        rig.controller.note_frame(0, rig.clock.t)  # newer frames keep coming, but no newer chunk
        result = rig.tick()
        executed += not result.stop
    assert executed == round(AGE / PERIOD)  # the chunk's frame is too old after AGE


def test_a_chunk_whose_robot_state_is_too_old_is_not_executed():
    rig = Rig(needs_state=True)
    rig.inputs()
    old = rig.chunk(constant(0.4), state_s=rig.clock.t - AGE - 0.05)
    result = rig.tick()
    assert result.dropped == [old] and result.stop


def test_a_chunk_for_a_replaced_instruction_is_not_executed():
    rig = Rig()
    first = rig.controller.note_command(True)
    rig.inputs()
    rig.controller.add_chunk(constant(0.5, steps=8), ChunkSource((rig.clock.t,), None, "running", first))
    assert rig.tick().started == ["running"]
    rig.clock.advance(0.01)
    second = rig.controller.note_command(True)  # "open the drawer" replaces the goal
    rig.inputs()
    rig.controller.add_chunk(constant(0.5), ChunkSource((rig.clock.t,), None, "late", first))  # was in flight
    result = rig.tick()
    assert result.dropped == ["late"] and result.stop  # neither the running nor the late chunk goes on
    rig.controller.add_chunk(constant(0.3), ChunkSource((rig.clock.t,), None, "new", second))
    assert rig.tick().started == ["new"]


def test_the_watchdog_holds_when_any_camera_is_stale_or_missing():
    rig = Rig(cameras=("front", "wrist"))
    rig.controller.note_frame(0, rig.clock.t)
    assert "no camera frame received yet on wrist" in rig.tick().reason
    rig.inputs()
    rig.clock.advance(AGE + 0.1)
    rig.controller.note_frame(0, rig.clock.t)
    rig.chunk(constant(0.4), frames_s=(rig.clock.t, rig.clock.t))
    result = rig.tick()
    assert result.stop and "camera wrist is" in result.reason and result.reason_changed
    assert not rig.tick().reason_changed  # logged once per episode


# ---------------------------------------------------------------- 5. stops
def test_a_stop_holds_a_fresh_measurement_and_moves_to_it_within_the_limits():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, steps=8, dim=3))
    for _ in range(3):
        rig.inputs(measured=[0.0, 0.0, 0.0])
        rig.tick()  # commanded 0.3, the arm lags at 0.0..0.25
    rig.controller.note_measured(np.array([0.25, 0.25, 0.25]), rig.clock.t)
    rig.controller.note_command(False)
    holds = [rig.tick() for _ in range(3)]
    rig.controller.note_measured(np.array([0.6, 0.6, 0.6]), rig.clock.t)  # drifting: the hold target stays put
    holds.append(rig.tick())
    assert all(h.stop and h.arm.tolist() == [0.25, 0.25, 0.25] for h in holds)


def test_a_stop_with_a_stale_measurement_holds_the_last_commanded_target():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, steps=8, dim=3))
    rig.tick()
    rig.inputs(measured=[0.0, 0.0, 0.0])
    assert rig.tick().arm.tolist() == pytest.approx([0.2] * 3)
    rig.controller.note_measured(np.array([-0.9, -0.9, -0.9]), rig.clock.t - 5.0)  # a 5 s old measurement
    rig.controller.note_command(False)
    stops = [rig.tick() for _ in range(3)]
    assert all(s.stop for s in stops)
    np.testing.assert_allclose([s.arm for s in stops], [[0.2] * 3] * 3)  # not a jump to -0.9


def test_a_stop_towards_a_far_measurement_moves_no_further_per_period_than_the_limits():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, steps=8, dim=3))
    for _ in range(5):
        rig.inputs(measured=[0.0, 0.0, 0.0])  # the arm does not follow at all
        rig.tick()
    rig.controller.emergency_stop(True)
    stops = [rig.tick().arm[0] for _ in range(7)]
    np.testing.assert_allclose(stops, [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0], atol=1e-12)  # from 0.5 back to the arm at 0.1/period


def test_joint_trajectory_stop_is_one_trajectory_to_the_hold_target_within_the_limits():
    rig = Rig("joint_trajectory", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(0.9, steps=8, dim=3))
    rig.tick()
    rig.inputs(measured=[-0.2, 0.0, 0.0])  # the arm went the other way
    rig.controller.note_command(False)
    first, second = rig.tick(), rig.tick()
    # From the target commanded for now (0.1) to the measured position, 0.1 rad per period.
    np.testing.assert_allclose(first.arm[:, 0], [0.0, -0.1, -0.2])
    assert first.stop and second.arm is None  # once per hold


def test_ee_twist_stops_decelerate_at_the_limit_and_the_emergency_stop_is_at_once():
    rig = Rig(accel=2.0)  # 0.2 m/s per period
    for _ in range(6):
        rig.inputs()
        rig.chunk(along_x(0.6, steps=8))
        last = rig.tick()
    assert last.arm[0] == pytest.approx(0.6)
    rig.clock.advance(AGE)  # camera gap: the stale input decelerates
    stops = [rig.tick() for _ in range(5)]
    assert all(s.stop and s.gripper is None for s in stops)
    np.testing.assert_allclose([s.arm[0] for s in stops], [0.4, 0.2, 0.0, 0.0, 0.0])
    for _ in range(5):
        rig.inputs()
        rig.chunk(along_x(0.6, steps=8))
        rig.tick()
    rig.controller.emergency_stop(True)
    assert rig.tick().arm.tolist() == [0, 0, 0]  # zero at once


def test_enable_output_false_decelerates_then_a_silent_dry_run_still_reports_chunks():
    rig = Rig(accel=3.0)
    for _ in range(4):
        rig.inputs()
        rig.chunk(along_x(0.6, steps=8))
        rig.tick()
    rig.settings(accel=3.0, enable_output=False)
    stops = []
    for _ in range(5):
        rig.inputs()
        token = rig.chunk(along_x(0.6, steps=8))
        result = rig.tick()
        assert result.started == [token]  # the plan runs: statistics go on
        stops.append(None if result.arm is None else result.arm[0])
    assert stops[:2] == pytest.approx([0.3, 0.0]) and stops[2:] == [None] * 3  # ramps down, one zero, then silent


@pytest.mark.parametrize("leave", ["deactivate", "shutdown"])
def test_output_switched_off_then_left_before_the_next_tick_still_stops(leave):
    rig = Rig()
    rig.inputs()
    rig.chunk(constant(0.6, steps=8))
    assert rig.tick().arm[0] == pytest.approx(0.6)
    rig.settings(enable_output=False)
    stop = rig.controller.set_active(False) if leave == "deactivate" else rig.controller.stop_now()
    assert stop.stop and stop.arm.tolist() == [0, 0, 0]  # not left moving at 0.6
    assert rig.controller.stop_now().arm is None  # sent once: the dry run stays silent


def test_a_measured_pose_without_a_rotation_is_refused():
    rig = Rig("ee_pose", dim=7, gripper=None)
    with pytest.raises(ValueError, match="zero quaternion"):
        rig.controller.note_measured(np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0]))
    rig.controller.note_measured(np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 2.0]))  # not unit: normalized on output


# ---------------------------------------------------------------- 6. emergency stop
def test_emergency_stop_stops_within_a_period_latches_and_resumes_only_on_fresh_inputs():
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, steps=20, dim=3))
    for _ in range(3):
        rig.inputs(measured=[0.0, 0.0, 0.0])  # the arm lags: motion continues from the last command
        moving = rig.tick()
    assert not moving.stop and moving.arm[0] == pytest.approx(0.3)
    assert rig.controller.emergency_stop(True)
    rig.controller.note_measured(np.array([0.28, 0.28, 0.28]), rig.clock.t)
    stopped = rig.tick()  # the very next tick
    assert stopped.stop and stopped.arm.tolist() == [0.28, 0.28, 0.28] and "emergency stop" in stopped.reason
    for _ in range(5):  # latched: new chunks from fresh inputs are dropped, the stop is repeated
        rig.inputs(measured=[0.28, 0.28, 0.28])
        token = rig.chunk(constant(1.0, dim=3))
        result = rig.tick()
        assert result.stop and result.dropped == [token]
    before_release = rig.chunk(constant(1.0, dim=3))  # computed from frames before the release
    assert rig.controller.emergency_stop(False)
    assert not rig.controller.emergency_stop(False)  # already released
    result = rig.tick()
    assert result.stop and result.dropped == [before_release]
    rig.inputs(measured=[0.28, 0.28, 0.28])
    old_state = rig.chunk(constant(1.0, dim=3), state_s=rig.clock.t - 0.2)  # new frames, state from before
    result = rig.tick()
    assert result.stop and result.dropped == [old_state]
    rig.inputs(measured=[0.28, 0.28, 0.28])
    rig.chunk(constant(1.0, dim=3), state_s=rig.clock.t)
    np.testing.assert_allclose(rig.tick().arm, [0.38, 0.38, 0.38])  # ramps from the measured state


def test_emergency_stop_is_sent_even_in_a_dry_run():
    rig = Rig(enable_output=False)
    rig.inputs()
    rig.chunk(constant(0.5))
    assert rig.tick().arm is None
    rig.controller.emergency_stop(True)
    assert all(rig.tick().arm.tolist() == [0, 0, 0] for _ in range(3))


# ---------------------------------------------------------------- 7. chunk accounting, ensembling, lifecycle
def test_every_chunk_is_reported_once_with_temporal_ensembling():
    rig = Rig(temporal_ensemble=True, ensemble_decay=0.0)
    reported: list[int] = []
    rig.inputs()
    first = rig.chunk(constant(0.2, steps=4))
    second = rig.chunk(constant(0.6, steps=4))
    result = rig.tick()
    np.testing.assert_allclose(result.arm, [0.4] * 3)  # plain average of two chunks (decay 0)
    reported += result.started + result.dropped
    for _ in range(12):
        for _ in range(3):
            rig.inputs()
            rig.chunk(constant(0.5))
        result = rig.tick()
        reported += result.started + result.dropped
    assert sorted(reported) == list(range(1, rig.tokens + 1))  # each exactly once
    assert {first, second} <= set(reported)


def test_deactivation_stops_at_once_and_activation_waits_for_fresh_inputs():
    rig = Rig()
    rig.inputs()
    rig.chunk(constant(0.5, steps=8))
    rig.tick()
    stop = rig.controller.set_active(False)
    assert stop.stop and stop.arm.tolist() == [0, 0, 0]
    rig.inputs()
    token = rig.chunk(constant(0.5))
    inactive = rig.tick()
    assert inactive.arm is None and inactive.dropped == [token] and "inactive" in inactive.reason
    stale = rig.chunk(constant(0.5))
    rig.controller.set_active(True)
    result = rig.tick()
    assert result.dropped == [stale] and result.stop
    rig.inputs()
    rig.chunk(constant(0.5))
    assert rig.tick().arm[0] == pytest.approx(0.5)


def test_non_finite_chunks_are_refused_and_malformed_ones_raise():
    rig = Rig()
    bad = constant(0.1)
    bad[2, 1] = np.nan
    assert rig.controller.add_chunk(bad, ChunkSource((rig.clock.t,))) is None
    with pytest.raises(ValueError, match="shape"):
        rig.controller.add_chunk(np.zeros((4, 3)), ChunkSource((rig.clock.t,)))


# ---------------------------------------------------------------- state names
def test_state_names_are_reordered_and_missing_ones_named():
    values = select_named(["b", "c", "a"], [2.0, 3.0, 1.0], ["a", "b", "c"])
    assert values.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"lacks joints \['c'\]"):
        select_named(["a", "b", "x"], [1.0, 2.0, 3.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no joint names"):
        select_named([], [1.0, 2.0, 3.0], ["a", "b", "c"])  # the right count is not enough
    with pytest.raises(ValueError, match="2 names for 3 positions"):
        select_named(["a", "b"], [1.0, 2.0, 3.0], ["a"])


def test_enabling_output_after_a_dry_run_start_holds_at_the_measured_state_not_the_dry_run_plan():
    """The node starts with output off; the dry run's plan moves on paper. Enabled, the first tick
    holds (no chunk from fresh inputs yet): its command is the arm's measured position, not the
    plan's (which was 0.6 rad away here)."""
    rig = Rig("joint_state", dim=3, gripper=None, speed=1.0, enable_output=False)
    for _ in range(6):
        rig.inputs(measured=[0.0, 0.0, 0.0])
        rig.chunk(constant(1.0, dim=3))
        assert rig.tick().arm is None
    rig.settings(speed=1.0, enable_output=True)
    rig.clock.advance(0.01)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    held = rig.tick()
    assert held.stop
    np.testing.assert_allclose(held.arm, [0.0, 0.0, 0.0])
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [0.1, 0.1, 0.1])  # then one step from the arm
