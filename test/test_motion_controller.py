"""The policy node's motion rules (actdistill_ros/ros/motion_controller.py), one test per rule.

A fake monotonic clock drives the controller; the model outputs fed in exceed the limits each
rule enforces, so a broken rule fails its test.
"""

from __future__ import annotations

import numpy as np
import pytest

from actdistill_ros.ros.action_output import SafetyLimits
from actdistill_ros.ros.motion_controller import ChunkSource, ControlSettings, MotionController, select_named

PERIOD = 0.1  # control_rate_hz 10
AGE = 0.5  # watchdog.max_image_age_s and max_state_age_s


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float = PERIOD) -> float:
        self.t += dt
        return self.t


def make_settings(dim: int = 4, gripper: int | None = 3, velocity: float = 0.1, low=None, high=None,
                  **overrides) -> ControlSettings:
    limits = SafetyLimits.combine([-1.0] * dim, [1.0] * dim, low or [], high or [], velocity, gripper)
    return ControlSettings(control_rate_hz=1.0 / PERIOD, limits=limits, max_image_age_s=AGE, max_state_age_s=AGE,
                           **overrides)


class Rig:
    """A controller with fresh inputs on demand and a counter for chunk tokens."""

    def __init__(self, mode: str = "ee_twist", dim: int = 4, gripper: int | None = 3, cameras=("front",),
                 needs_state: bool = False, **settings):
        self.clock = Clock()
        self.mode, self.dim, self.gripper = mode, dim, gripper
        self.controller = MotionController(mode, make_settings(dim, gripper, **settings), dim, gripper,
                                           cameras=cameras, needs_state=needs_state, clock=self.clock)
        self.cameras = len(cameras)
        self.tokens = 0
        self.controller.note_command(True)

    def inputs(self, measured=None) -> float:
        """Fresh frames from every camera (+ state, + measured position); returns their time."""
        for camera in range(self.cameras):
            self.controller.note_frame(camera)
        self.controller.note_state()
        if measured is not None:
            self.controller.note_measured(np.asarray(measured, dtype=float))
        return self.clock.t

    def chunk(self, actions, frames_s=None, state_s=None) -> int:
        """Hand over a chunk computed from frames received at ``frames_s`` (default: now)."""
        self.tokens += 1
        frames = tuple(frames_s) if frames_s is not None else (self.clock.t,) * self.cameras
        self.controller.add_chunk(np.asarray(actions, dtype=float), ChunkSource(frames, state_s, self.tokens))
        return self.tokens

    def tick(self):
        self.clock.advance()
        return self.controller.tick()


def constant(value, steps: int = 4, dim: int = 4) -> np.ndarray:
    return np.full((steps, dim), float(value))


# ---------------------------------------------------------------- 1. commands only on the tick
def test_commands_leave_only_on_the_tick_whatever_the_inference_rate():
    rig = Rig(velocity=0.0)
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
    rig = Rig(velocity=0.0)
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
    assert ran_dry.stop and ran_dry.arm.tolist() == [0, 0, 0]  # no chunk covers this tick: zero twist


# ---------------------------------------------------------------- 2. velocity limit per control period
def test_velocity_limit_bounds_the_change_per_period_even_when_chunks_arrive_faster():
    rig = Rig(velocity=0.1)
    commanded = []
    for _ in range(8):
        for _ in range(4):  # four chunks per period, each asking for full speed
            rig.inputs()
            rig.chunk(constant(1.0))
        commanded.append(rig.tick().arm[0])
    np.testing.assert_allclose(commanded, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # from zero, 0.1 per period


def test_actions_beyond_the_limits_are_clamped_and_narrowed_limits_apply_to_running_chunks():
    rig = Rig(velocity=0.0, low=[-0.2, -0.2, -0.2, -1.0], high=[0.2, 0.2, 0.2, 1.0])
    rig.inputs()
    rig.chunk(np.array([[5.0, -5.0, 0.1, 3.0]] * 4))
    result = rig.tick()
    np.testing.assert_allclose(result.arm, [0.2, -0.2, 0.1])
    assert result.gripper == 1.0
    narrower = make_settings(velocity=0.0, low=[-0.05] * 3 + [-1.0], high=[0.05] * 3 + [1.0])
    rig.controller.set_settings(narrower)
    rig.inputs()
    np.testing.assert_allclose(rig.tick().arm, [0.05, -0.05, 0.05])  # the chunk was clamped before the change


def test_joint_trajectory_points_are_limited_from_the_measured_state_and_from_each_other():
    rig = Rig("joint_trajectory", dim=3, gripper=None, velocity=0.1)
    rig.inputs(measured=[0.5, 0.0, -0.5])
    rig.chunk(np.array([[-1.0, 1.0, -0.5]] * 4))
    first = rig.tick()
    np.testing.assert_allclose(first.arm, [[0.4, 0.1, -0.5], [0.3, 0.2, -0.5], [0.2, 0.3, -0.5], [0.1, 0.4, -0.5]])
    rig.inputs(measured=[0.4, 0.1, -0.5])
    assert rig.tick().arm is None  # the running trajectory needs nothing new on this tick
    # The next trajectory starts from the target commanded for now (point 1 = [0.3, 0.2]), not from
    # the previous trajectory's first point.
    rig.inputs(measured=[0.35, 0.15, -0.5])
    rig.chunk(np.array([[1.0, -1.0, 1.0]] * 4))
    second = rig.tick()
    np.testing.assert_allclose(second.arm[0], [0.4, 0.1, -0.4])
    np.testing.assert_allclose(np.diff(second.arm, axis=0), np.full((3, 3), [0.1, -0.1, 0.1]))


def test_the_velocity_limit_holds_when_the_arm_or_the_last_command_lies_outside_the_limits():
    # An arm parked beyond narrowed limits: back inside at the velocity limit, not in one jump.
    rig = Rig("joint_state", dim=3, gripper=None, velocity=0.1, low=[-0.5] * 3, high=[0.5] * 3)
    rig.inputs(measured=[0.9, -0.9, 0.0])
    rig.chunk(constant(0.5, steps=8, dim=3))
    commanded = []
    for _ in range(5):
        rig.inputs(measured=[0.9, -0.9, 0.0])
        commanded.append(rig.tick().arm)
    np.testing.assert_allclose(commanded, [[0.8, -0.8, 0.1], [0.7, -0.7, 0.2], [0.6, -0.6, 0.3], [0.5, -0.5, 0.4],
                                           [0.5, -0.4, 0.5]])
    # ee_twist: limits narrowed while moving fast bite at once (slowing down is never delayed).
    twist = Rig(velocity=0.25)
    for _ in range(4):
        twist.inputs()
        twist.chunk(constant(1.0))
        last = twist.tick().arm[0]
    assert last == pytest.approx(1.0)
    twist.controller.set_settings(make_settings(velocity=0.25, low=[-0.3] * 3 + [-1.0], high=[0.3] * 3 + [1.0]))
    slowing = []
    for _ in range(4):
        twist.inputs()
        twist.chunk(constant(1.0))
        slowing.append(twist.tick().arm[0])
    np.testing.assert_allclose(slowing, [0.3, 0.3, 0.3, 0.3])


# ---------------------------------------------------------------- 3. ramps from the measured state / zero
def test_joint_state_ramps_from_the_measured_state_at_start_after_a_hold_and_after_re_enabling():
    rig = Rig("joint_state", dim=3, gripper=None, velocity=0.1)
    rig.inputs(measured=[0.5, 0.5, 0.5])
    rig.chunk(constant(-1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [0.4, 0.4, 0.4])  # start-up: from the measured state
    rig.inputs(measured=[0.45, 0.45, 0.45])
    np.testing.assert_allclose(rig.tick().arm, [0.3, 0.3, 0.3])  # then from the last command
    # A camera gap: hold at the measured position, then ramp again from where the arm really is.
    rig.clock.advance(AGE + 0.2)
    rig.controller.note_measured(np.array([0.2, 0.2, 0.2]))
    held = rig.tick()
    assert held.stop and "camera frame is" in held.reason
    np.testing.assert_allclose(held.arm, [0.2, 0.2, 0.2])
    rig.inputs(measured=[0.25, 0.25, 0.25])
    rig.chunk(constant(-1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [0.15, 0.15, 0.15])
    # Dry run, arm moved by hand, output enabled again: from the measured state again.
    rig.controller.set_settings(make_settings(3, None, velocity=0.1, enable_output=False))
    rig.inputs(measured=[-0.6, 0.0, 0.6])
    rig.chunk(constant(1.0, dim=3))
    stop = rig.tick()
    assert stop.stop
    rig.controller.set_settings(make_settings(3, None, velocity=0.1, enable_output=True))
    rig.clock.advance(0.01)
    rig.inputs(measured=[-0.6, 0.0, 0.6])
    rig.chunk(constant(1.0, dim=3))
    np.testing.assert_allclose(rig.tick().arm, [-0.5, 0.1, 0.7])


def test_ee_twist_ramps_from_zero_after_a_hold():
    rig = Rig(velocity=0.25)
    for _ in range(4):
        rig.inputs()
        rig.chunk(constant(1.0))
        rig.tick()
    rig.inputs()
    rig.chunk(constant(1.0))
    assert rig.tick().arm[0] == pytest.approx(1.0)  # full speed reached
    rig.controller.note_command(False)  # an empty command: hold
    assert rig.tick().arm.tolist() == [0, 0, 0]
    rig.controller.note_command(True)
    rig.inputs()
    rig.chunk(constant(1.0))
    assert rig.tick().arm[0] == pytest.approx(0.25)  # not 1.0: from standstill again


@pytest.mark.parametrize("mode, dim", [("joint_state", 3), ("joint_trajectory", 3), ("ee_pose", 7)])
def test_position_modes_never_move_without_a_measured_position(mode, dim):
    rig = Rig(mode, dim=dim, gripper=None, velocity=0.1)
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
        rig.controller.note_frame(camera)
    rig.controller.note_state()
    assert "measured robot position is" in rig.tick().reason


def test_ee_pose_ramps_from_the_measured_pose_through_the_nearer_quaternion_sign():
    rig = Rig("ee_pose", dim=8, gripper=7, velocity=0.1)
    measured = np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, -1.0])  # -q: the same orientation as the target's
    rig.inputs(measured=measured)
    rig.chunk(np.array([[0.8, 0.0, 0.4, 0.0, 0.0, 0.0, 1.0, 0.5]] * 4))
    result = rig.tick()
    np.testing.assert_allclose(result.arm[:3], [0.4, 0.0, 0.4])
    np.testing.assert_allclose(np.abs(result.arm[3:]), [0, 0, 0, 1.0])  # not shrunk towards a zero quaternion


# ---------------------------------------------------------------- 4. explicit stops
def test_holds_publish_an_explicit_stop_per_mode():
    twist = Rig(velocity=0.0)
    twist.inputs()
    twist.chunk(constant(0.7, steps=8))
    assert twist.tick().arm[0] == pytest.approx(0.7)
    twist.clock.advance(AGE)  # camera gap
    stops = [twist.tick() for _ in range(3)]
    assert all(s.stop and s.arm.tolist() == [0, 0, 0] and s.gripper is None for s in stops)  # every tick

    joints = Rig("joint_state", dim=3, gripper=None, velocity=0.0)
    joints.inputs(measured=[0.1, 0.2, 0.3])
    joints.chunk(constant(0.9, steps=8, dim=3))
    joints.tick()
    joints.controller.note_measured(np.array([0.5, 0.5, 0.5]))  # where the arm got to
    joints.controller.note_command(False)
    holds = [joints.tick() for _ in range(3)]
    joints.controller.note_measured(np.array([0.6, 0.6, 0.6]))  # drifting: the hold target stays put
    holds.append(joints.tick())
    assert all(h.stop and h.arm.tolist() == [0.5, 0.5, 0.5] for h in holds)

    trajectory = Rig("joint_trajectory", dim=3, gripper=None, velocity=0.0)
    trajectory.inputs(measured=[0.1, 0.2, 0.3])
    trajectory.chunk(constant(0.9, steps=8, dim=3))
    trajectory.tick()
    trajectory.controller.note_command(False)
    first, second = trajectory.tick(), trajectory.tick()
    assert first.stop and first.arm.tolist() == [[0.1, 0.2, 0.3]]  # one point at the measured position
    assert second.arm is None  # once per hold


def test_enable_output_false_sends_one_stop_then_a_silent_dry_run_that_still_reports_chunks():
    rig = Rig(velocity=0.0)
    rig.inputs()
    rig.chunk(constant(0.6, steps=8))
    assert rig.tick().arm[0] == pytest.approx(0.6)
    rig.controller.set_settings(make_settings(velocity=0.0, enable_output=False))
    rig.inputs()
    token = rig.chunk(constant(0.6, steps=8))
    stop = rig.tick()
    assert stop.stop and stop.arm.tolist() == [0, 0, 0] and stop.started == [token]
    for _ in range(3):
        rig.inputs()
        token = rig.chunk(constant(0.6))
        silent = rig.tick()
        assert silent.arm is None and silent.gripper is None and silent.started == [token]


@pytest.mark.parametrize("leave", ["deactivate", "shutdown"])
def test_output_switched_off_then_left_before_the_next_tick_still_sends_its_stop(leave):
    rig = Rig(velocity=0.0)
    rig.inputs()
    rig.chunk(constant(0.6, steps=8))
    assert rig.tick().arm[0] == pytest.approx(0.6)
    rig.controller.set_settings(make_settings(velocity=0.0, enable_output=False))
    stop = rig.controller.set_active(False) if leave == "deactivate" else rig.controller.stop_now()
    assert stop.stop and stop.arm.tolist() == [0, 0, 0]  # not left moving at 0.6
    assert rig.controller.stop_now().arm is None  # sent once: the dry run stays silent


def test_a_measured_pose_without_a_rotation_is_refused():
    rig = Rig("ee_pose", dim=7, gripper=None)
    with pytest.raises(ValueError, match="zero quaternion"):
        rig.controller.note_measured(np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0]))
    rig.controller.note_measured(np.array([0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 2.0]))  # not unit: normalized on output


# ---------------------------------------------------------------- 5. chunks only from young inputs
def test_a_chunk_from_a_frame_older_than_the_watchdog_age_is_never_executed():
    rig = Rig(velocity=0.0, cameras=("front", "wrist"))
    rig.inputs()
    before_gap = rig.clock.t
    rig.clock.advance(AGE + 0.3)  # a camera gap; the chunk computed before it arrives late
    rig.inputs()  # frames are back: the newest frames are fresh
    old = rig.chunk(constant(0.8), frames_s=(rig.clock.t, before_gap))  # the wrist frame was from before
    result = rig.tick()
    assert result.arm.tolist() == [0, 0, 0] and result.dropped == [old] and not result.started
    fresh = rig.chunk(constant(0.8))
    assert rig.tick().started == [fresh]


def test_a_running_chunk_stops_when_its_frame_ages_past_the_limit():
    rig = Rig(velocity=0.0)
    rig.inputs()
    rig.chunk(constant(0.5, steps=20))
    executed = 0
    for _ in range(10):
        rig.controller.note_frame(0)  # newer frames keep coming, but no newer chunk
        result = rig.tick()
        executed += not result.stop
    assert executed == round(AGE / PERIOD)  # the chunk's frame is too old after AGE


def test_a_chunk_whose_robot_state_is_too_old_is_not_executed():
    rig = Rig(velocity=0.0, needs_state=True)
    rig.inputs()
    old = rig.chunk(constant(0.4), state_s=rig.clock.t - AGE - 0.05)
    result = rig.tick()
    assert result.dropped == [old] and result.stop


def test_a_chunk_for_a_replaced_instruction_is_not_executed():
    rig = Rig(velocity=0.0)
    first = rig.controller.note_command(True)
    rig.inputs()
    rig.chunk(constant(0.5, steps=8))
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


def test_the_watchdog_holds_when_any_camera_is_stale():
    rig = Rig(velocity=0.0, cameras=("front", "wrist"))
    rig.inputs()
    rig.clock.advance(AGE + 0.1)
    rig.controller.note_frame(0)
    rig.chunk(constant(0.4), frames_s=(rig.clock.t, rig.clock.t))
    result = rig.tick()
    assert result.stop and "on wrist" in result.reason and result.reason_changed
    assert not rig.tick().reason_changed  # logged once per episode


# ---------------------------------------------------------------- 6. emergency stop
def test_emergency_stop_stops_within_a_period_latches_and_resumes_only_on_fresh_inputs():
    rig = Rig("joint_state", dim=3, gripper=None, velocity=0.1)
    rig.inputs(measured=[0.0, 0.0, 0.0])
    rig.chunk(constant(1.0, steps=20, dim=3))
    for _ in range(3):
        rig.inputs(measured=[0.0, 0.0, 0.0])  # the arm lags: motion continues from the last command
        moving = rig.tick()
    assert not moving.stop and moving.arm[0] == pytest.approx(0.3)
    assert rig.controller.emergency_stop(True)
    rig.controller.note_measured(np.array([0.28, 0.28, 0.28]))
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
    rig = Rig(velocity=0.0, enable_output=False)
    rig.inputs()
    rig.chunk(constant(0.5))
    assert rig.tick().arm is None
    rig.controller.emergency_stop(True)
    assert all(rig.tick().arm.tolist() == [0, 0, 0] for _ in range(3))


# ---------------------------------------------------------------- 7. chunk accounting, ensembling, lifecycle
def test_every_chunk_is_reported_once_with_temporal_ensembling():
    rig = Rig(velocity=0.0, temporal_ensemble=True, ensemble_decay=0.0)
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
    rig = Rig(velocity=0.0)
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
