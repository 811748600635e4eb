"""The safety contract (actdistill_ros/control/limits.py), stamp-based freshness and chunk execution.

Every limit test commands past the limit it checks: targets far beyond the reach of one period,
bounds, speeds and accelerations above the configured ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from actdistill_ros.control.chunks import ChunkScheduler, is_finite_chunk
from actdistill_ros.control.commands import pose_from_command, twist_from_command
from actdistill_ros.control.freshness import StampedInput
from actdistill_ros.control.limits import (ActionLimits, LimitSettings, check_mode_fits, rotation_angle,
                                           slerp_towards)
from actdistill_ros.weights import ActionSpace


def joint_space(dims: int = 3, gripper: bool = False, units=None) -> ActionSpace:
    names = [f"j{i}" for i in range(dims)] + (["gripper"] if gripper else [])
    return ActionSpace(kind="joint", names=names, units=(units or ["rad"] * dims) + (["1"] if gripper else []),
                       low=[-3.0] * dims + ([0.0] if gripper else []), high=[3.0] * dims + ([1.0] if gripper else []),
                       gripper_index=dims if gripper else None)


def twist_space(dims: int = 3, units=None) -> ActionSpace:
    units = units or ["m/s"] * 3 + ["rad/s"] * (dims - 3)
    return ActionSpace(kind="end_effector", names=[f"v{i}" for i in range(dims)] + ["gripper"], units=units + ["1"],
                       low=[-1.0] * dims + [-1.0], high=[1.0] * dims + [1.0], gripper_index=dims)


def pose_space() -> ActionSpace:
    return ActionSpace(kind="end_effector", names=["x", "y", "z", "qx", "qy", "qz", "qw"], units=["m"] * 3 + ["1"] * 4,
                       low=[-2.0] * 3 + [-1.0] * 4, high=[2.0] * 3 + [1.0] * 4)


def quaternion_z(angle: float) -> np.ndarray:
    return np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])


# ---------------------------------------------------------------- speed does not depend on the control rate
def run_towards(limits: ActionLimits, target: np.ndarray, start: np.ndarray, seconds: float) -> np.ndarray:
    """Commands issued for ``seconds`` of control periods towards ``target``."""
    commands, previous = [], start
    for _ in range(int(round(seconds / limits.period_s))):
        previous = limits.step(target, previous)
        commands.append(previous)
    return np.stack(commands)


@pytest.mark.parametrize("rate", [5.0, 20.0, 50.0])
def test_joint_speed_per_second_is_the_same_at_every_control_rate(rate):
    limits = ActionLimits.build("joint_state", joint_space(2), LimitSettings(max_joint_velocity=(0.4, 0.1)), rate)
    commands = run_towards(limits, np.array([3.0, -3.0]), np.zeros(2), seconds=2.0)
    per_second = np.abs(np.diff(np.vstack([np.zeros(2), commands]), axis=0)) * rate
    np.testing.assert_allclose(per_second.max(axis=0), [0.4, 0.1])  # each joint at its own limit
    np.testing.assert_allclose(commands[-1], [0.8, -0.2], atol=0.4 / rate)  # where 2 s at the limit gets


@pytest.mark.parametrize("rate", [5.0, 20.0, 50.0])
def test_pose_speed_is_a_norm_and_rotation_an_angle_per_second(rate):
    limits = ActionLimits.build("ee_pose", pose_space(), LimitSettings(max_linear_velocity=0.1,
                                                                      max_angular_velocity=0.5), rate)
    start = np.concatenate([[0.0, 0.0, 0.0], quaternion_z(0.0)])
    target = np.concatenate([[1.0, 1.0, 0.0], quaternion_z(3.0)])
    commands = run_towards(limits, target, start, seconds=1.0)
    positions = np.vstack([start[:3], commands[:, :3]])
    np.testing.assert_allclose(np.linalg.norm(np.diff(positions, axis=0), axis=1) * rate, 0.1)  # the norm, not per axis
    angles = [rotation_angle(a, b) for a, b in zip(np.vstack([start[3:], commands[:, 3:]])[:-1], commands[:, 3:])]
    np.testing.assert_allclose(np.array(angles) * rate, 0.5, rtol=1e-6)
    assert rotation_angle(commands[-1, 3:], quaternion_z(0.5)) < 1e-6


@pytest.mark.parametrize("rate", [5.0, 20.0, 50.0])
def test_twist_ramps_at_the_acceleration_limit_to_the_speed_limit(rate):
    limits = ActionLimits.build("ee_twist", twist_space(6), LimitSettings(
        max_linear_velocity=0.2, max_angular_velocity=0.3, max_linear_acceleration=0.4,
        max_angular_acceleration=1.2), rate)
    target = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # every axis far above the speed limits
    commands = run_towards(limits, target, np.zeros(7), seconds=1.0)
    linear_speed = np.linalg.norm(commands[:, :3], axis=1)
    assert linear_speed.max() == pytest.approx(0.2)  # the norm, not 0.2 per axis
    # Top speed after 0.5 s at 0.4 m/s^2, whatever the rate (within one period).
    reached = np.argmax(linear_speed >= 0.2 - 1e-9) * limits.period_s
    assert abs(reached - 0.5) <= limits.period_s + 1e-9
    ramp = np.diff(np.concatenate([[0.0], linear_speed]))[: int(0.5 * rate - 1e-9)]
    np.testing.assert_allclose(ramp * rate, 0.4)  # every step of the ramp at the acceleration limit
    assert np.linalg.norm(commands[:, 3:6], axis=1).max() == pytest.approx(0.3)


def test_gripper_moves_at_its_own_rate_within_its_bounds():
    limits = ActionLimits.build("joint_state", joint_space(2, gripper=True), LimitSettings(max_gripper_velocity=1.0),
                                10.0)
    out = limits.step(np.array([0.0, 0.0, 5.0]), np.array([0.0, 0.0, 0.0]))
    assert out[2] == pytest.approx(0.1)  # 1 unit/s at 10 Hz, not the requested 5 (beyond its bound 1)
    assert limits.step(np.array([0.0, 0.0, 5.0]), None)[2] == 1.0  # bounded even without a previous command


# ---------------------------------------------------------------- bounds and scale
def test_bounds_are_the_card_times_scale_narrowed_by_the_parameters():
    space = twist_space(3, units=["normalized"] * 3)
    limits = ActionLimits.build("ee_twist", space, LimitSettings(scale=(0.1, 0.1, 0.1, 1.0),
                                                                 position_high=(0.05, 1.0, 1.0, 1.0),
                                                                 max_linear_velocity=10.0), 10.0)
    np.testing.assert_allclose(limits.high, [0.05, 0.1, 0.1, 1.0])
    np.testing.assert_allclose(limits.low, [-0.1, -0.1, -0.1, -1.0])
    assert limits.units == ("m/s", "m/s", "m/s", "1")
    np.testing.assert_allclose(limits.to_physical(np.array([[5.0, -5.0, 0.5, 3.0]])), [[0.05, -0.1, 0.05, 1.0]])


def test_chunks_keep_their_shape_within_the_box_and_speed_limits_bite_per_command():
    """to_physical (what ActionChunk reports) clips to the bounds only; each command is speed-limited."""
    limits = ActionLimits.build("ee_twist", twist_space(3), LimitSettings(max_linear_velocity=0.25), 10.0)
    chunk = limits.to_physical(np.array([[0.9, 0.9, 0.9, 0.5], [3.0, 0.0, 0.0, 0.5]]))
    np.testing.assert_allclose(chunk, [[0.9, 0.9, 0.9, 0.5], [1.0, 0.0, 0.0, 0.5]])
    assert np.linalg.norm(limits.step(chunk[0], None)[:3]) == pytest.approx(0.25)


def test_a_unit_the_mode_cannot_command_needs_a_scale():
    space = twist_space(3, units=["normalized"] * 3)
    with pytest.raises(ValueError, match=r"'v0' has unit 'normalized'.*set action.scale"):
        ActionLimits.build("ee_twist", space, LimitSettings(), 10.0)
    with pytest.raises(ValueError, match="'j1' has unit 'deg'"):
        ActionLimits.build("joint_state", joint_space(2, units=["rad", "deg"]), LimitSettings(), 10.0)
    with pytest.raises(ValueError, match="'v0' has unit 'm'"):  # a position delta is no velocity
        ActionLimits.build("ee_twist", twist_space(3, units=["m"] * 3), LimitSettings(), 10.0)
    ActionLimits.build("joint_state", joint_space(2, units=["rad", "m"]), LimitSettings(), 10.0)  # prismatic: m


@pytest.mark.parametrize("settings, message", [
    (LimitSettings(scale=(1.0,)), "action.scale has 1 values, expected 0 or 4"),
    (LimitSettings(scale=(1.0, 0.0, 1.0, 1.0)), "action.scale must be > 0"),
    (LimitSettings(position_low=(0.0,) * 4, position_high=(-0.5,) * 4), "empty for 'j0'"),
    (LimitSettings(position_low=(math.nan,) * 4), "NaN"),
    (LimitSettings(max_joint_velocity=(0.1, 0.2)), "max_joint_velocity has 2 values, expected 1 or 3"),
    (LimitSettings(max_joint_velocity=(0.0,)), "max_joint_velocity must be a finite number > 0"),
    (LimitSettings(max_linear_acceleration=-1.0), "max_linear_acceleration must be"),
    (LimitSettings(max_gripper_velocity=math.inf), "max_gripper_velocity must be"),
])
def test_bad_limit_parameters_are_refused_naming_the_parameter(settings, message):
    with pytest.raises(ValueError, match=message):
        ActionLimits.build("joint_state", joint_space(3, gripper=True), settings, 10.0)


def test_commands_outside_narrowed_bounds_move_back_at_the_limit_not_in_a_jump():
    limits = ActionLimits.build("joint_state", joint_space(1), LimitSettings(position_high=(0.5,),
                                                                            max_joint_velocity=(1.0,)), 10.0)
    assert limits.step(np.array([0.5]), np.array([0.9]))[0] == pytest.approx(0.8)
    twist = ActionLimits.build("ee_twist", twist_space(3), LimitSettings(max_linear_velocity=0.1), 10.0)
    # A narrowed speed bound bites at once: the previous (faster) twist is bounded before the ramp.
    assert np.linalg.norm(twist.step(np.array([1.0, 0, 0, 0]), np.array([0.5, 0, 0, 0]))[:3]) == pytest.approx(0.1)


def test_quaternion_helpers_take_the_shorter_way():
    start, goal = quaternion_z(0.0), -quaternion_z(0.2)  # -q: the same rotation as q
    assert rotation_angle(start, goal) == pytest.approx(0.2)
    halfway = slerp_towards(start, goal, 0.1)
    assert rotation_angle(halfway, quaternion_z(0.1)) < 1e-9


@pytest.mark.parametrize("mode, kind, dims, ok", [
    ("ee_twist", "end_effector", 3, True), ("ee_twist", "end_effector", 6, True),
    ("ee_twist", "joint", 3, False), ("ee_pose", "end_effector", 7, True), ("ee_pose", "end_effector", 3, False),
    ("joint_state", "joint", 6, True), ("joint_trajectory", "end_effector", 3, False), ("teleport", "joint", 6, False),
])
def test_mode_must_fit_the_action_space(mode, kind, dims, ok):
    if ok:
        check_mode_fits(mode, kind, dims)
    else:
        with pytest.raises(ValueError, match="action.mode"):
            check_mode_fits(mode, kind, dims)


def test_command_vectors_map_to_message_fields():
    linear, angular = twist_from_command(np.array([0.1, 0.2, 0.3]))
    assert linear.tolist() == [0.1, 0.2, 0.3] and angular.tolist() == [0, 0, 0]
    assert twist_from_command(np.arange(6.0))[1].tolist() == [3, 4, 5]
    position, quaternion = pose_from_command(np.array([1, 2, 3, 0, 0, 0, 2.0]))
    assert position.tolist() == [1, 2, 3] and quaternion.tolist() == [0, 0, 0, 1]
    assert pose_from_command(np.array([1, 2, 3, 0, 0, 0, 0.0])) is None
    with pytest.raises(ValueError):
        twist_from_command(np.zeros(4))


# ---------------------------------------------------------------- freshness by stamp
def test_an_input_is_stale_by_its_stamp_even_when_it_keeps_arriving():
    camera = StampedInput("camera /front", "frame", "watchdog.max_image_age_s")
    for now in np.arange(10.0, 12.0, 0.1):  # arriving every 0.1 s, each stamped 2 s earlier
        camera.note(now - 2.0, received_s=now)
    stale = camera.staleness(12.0, max_age_s=0.5, max_skew_s=0.05)
    assert stale.kind == "stale_frame" and "camera /front is 2.10 s old by its stamp" in stale.reason


def test_a_frozen_stamp_is_stale_although_it_is_young_by_the_skew():
    camera = StampedInput("camera /front", "frame", "watchdog.max_image_age_s")
    camera.note(10.3, received_s=10.0)  # a driver whose clock leads by 0.3 s, within the skew tolerance
    for now in (10.1, 10.2, 10.3, 10.4, 10.5, 10.6):
        camera.note(10.3, received_s=now)  # re-published with the same stamp: hung
    assert camera.staleness(10.45, 0.5, max_skew_s=0.5) is None
    frozen = camera.staleness(10.6, 0.5, max_skew_s=0.5)
    assert frozen.kind == "stale_frame" and "has not advanced for 0.60 s" in frozen.reason


def test_a_stamp_beyond_the_clock_skew_is_stale_and_a_zero_stamp_warns_once():
    state = StampedInput("robot state", "state", "watchdog.max_state_age_s")
    state.note(10.3, received_s=10.0)
    future = state.staleness(10.0, 0.5, max_skew_s=0.1)
    assert future.kind == "future_state" and "0.30 s in the future" in future.reason
    assert state.staleness(10.0, 0.5, max_skew_s=0.5) is None
    unstamped = StampedInput("robot state", "state", "watchdog.max_state_age_s")
    effective, warning = unstamped.note(0.0, received_s=20.0)
    assert effective == 20.0 and "zero header.stamp" in warning
    assert unstamped.note(0.0, received_s=20.1) == (20.1, None)  # once
    assert unstamped.staleness(20.5, 0.5, 0.05) is None and unstamped.staleness(20.7, 0.5, 0.05) is not None


# ---------------------------------------------------------------- chunk execution
def test_non_finite_chunks_are_detected():
    assert is_finite_chunk(np.zeros((4, 3)))
    for bad in (np.nan, np.inf, -np.inf):
        chunk = np.zeros((4, 3))
        chunk[2, 1] = bad
        assert not is_finite_chunk(chunk)


def test_scheduler_follows_newest_chunk_and_runs_dry():
    scheduler = ChunkScheduler()
    scheduler.add(np.arange(3.0)[:, None], start_tick=1)
    assert [scheduler.action_at(t)[0] for t in (1, 2)] == [0.0, 1.0]
    scheduler.add(np.array([[10.0], [11.0]]), start_tick=3)  # replaces the old chunk
    assert [scheduler.action_at(t)[0] for t in (3, 4)] == [10.0, 11.0]
    assert scheduler.action_at(5) is None and len(scheduler) == 0


def test_temporal_ensemble_weights_older_chunks_exponentially():
    decay = 0.5
    scheduler = ChunkScheduler(temporal_ensemble=True, decay=decay)
    scheduler.add(np.full((4, 2), 1.0), start_tick=0)
    scheduler.add(np.full((4, 2), 3.0), start_tick=2)
    assert scheduler.action_at(1).tolist() == [1.0, 1.0]  # only the first covers tick 1
    w_old, w_new = 1.0, np.exp(-decay)
    np.testing.assert_allclose(scheduler.action_at(2), (w_old * 1 + w_new * 3) / (w_old + w_new))
    assert scheduler.action_at(4).tolist() == [3.0, 3.0]  # the first chunk is used up
    assert len(scheduler) == 1
    scheduler.clear()
    assert scheduler.action_at(5) is None


def test_scheduler_drops_chunks_by_source():
    scheduler = ChunkScheduler(temporal_ensemble=True, decay=0.0)
    scheduler.add(np.full((4, 1), 1.0), start_tick=0, source="old")
    scheduler.add(np.full((4, 1), 3.0), start_tick=0, source="new")
    assert scheduler.action_at(0).tolist() == [2.0]
    assert scheduler.drop_where(lambda source: source == "old") == 1
    assert scheduler.action_at(1).tolist() == [3.0] and len(scheduler) == 1


def test_scheduler_rejects_malformed_chunks():
    with pytest.raises(ValueError):
        ChunkScheduler().add(np.zeros((0, 3)), 0)
