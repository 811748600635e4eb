"""Chunk execution, safety limits, watchdog, image conversion and command checks (no DDS needed)."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

from actdistill_ros.ros.action_output import (ChunkScheduler, MotionWatchdog, RollingPercentiles, SafetyLimits,
                                              check_mode_fits, is_finite_chunk, pose_from_action, twist_from_action)
from ros_harness import require_rclpy

from actdistill_ros.data.images import ImageDecodeError, compressed_msg_to_rgb, image_msg_to_rgb


# ---------------------------------------------------------------- safety
def test_limits_intersect_card_and_parameters():
    limits = SafetyLimits.combine([-1, -1, -1], [1, 1, 1], [-0.5, -2, -1], [0.5, 0.2, 3])
    np.testing.assert_array_equal(limits.low, [-0.5, -1, -1])
    np.testing.assert_array_equal(limits.high, [0.5, 0.2, 1])
    np.testing.assert_array_equal(limits.clamp(np.array([[2.0, -3.0, 0.3]])), [[0.5, -1.0, 0.3]])


@pytest.mark.parametrize("low, high, velocity, message", [
    ([0.0], [], 0.0, "position_limits_low has 1 values"),
    ([], [0, 0, 0, 0], 0.0, "position_limits_high has 4 values"),
    ([0.5, 0, 0], [0.4, 1, 1], 0.0, "empty in dimension 0"),
    ([float("nan"), 0, 0], [], 0.0, "NaN"),
    ([], [], -1.0, "velocity_limit"),
])
def test_limits_refuse_bad_parameters_with_a_reason(low, high, velocity, message):
    with pytest.raises(ValueError, match=message):
        SafetyLimits.combine([-1, -1, -1], [1, 1, 1], low, high, velocity)


def test_step_limit_moves_at_most_the_limit_and_spares_the_gripper():
    limits = SafetyLimits.combine([-5] * 3, [5] * 3, max_step_delta=0.1, gripper_index=2)
    out = limits.limit_step(np.array([1.0, -0.05, -1.0]), previous=np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(out, [0.1, -0.05, -1.0])  # gripper jumps, arm is limited
    # No previous command: only the bounds apply (the motion controller always passes one: zero or measured).
    assert limits.limit_step(np.array([3.0, 3, 3]), None).tolist() == [3.0, 3, 3]
    assert limits.limit_step(np.array([9.0, -9, 3]), None).tolist() == [5.0, -5, 3]  # but always within bounds
    sequence = limits.limit_sequence(np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]), np.zeros(3))
    np.testing.assert_allclose(sequence[:, 0], [0.1, 0.2, 0.3])


def test_non_finite_chunks_are_detected():
    assert is_finite_chunk(np.zeros((4, 3)))
    for bad in (np.nan, np.inf, -np.inf):
        chunk = np.zeros((4, 3))
        chunk[2, 1] = bad
        assert not is_finite_chunk(chunk)


# ---------------------------------------------------------------- chunk execution
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


# ---------------------------------------------------------------- watchdog
def test_watchdog_names_each_kind_of_staleness():
    watchdog = MotionWatchdog(max_image_age_s=0.5)
    first = watchdog.check(10.0, None, has_command=False)
    assert not first.allowed and first.kind == "no_command" and "command" in first.reason
    assert "no camera frame" in watchdog.check(10.2, None, has_command=True).reason
    ok = watchdog.check(10.3, 10.0, has_command=True)
    assert ok.allowed and ok.kind == "ok" and ok.reason == ""
    stale = [watchdog.check(now, 10.0, has_command=True) for now in (10.6, 10.7, 10.8)]
    assert [v.allowed for v in stale] == [False] * 3 and {v.kind for v in stale} == {"stale_frame"}
    assert "0.60 s old" in stale[0].reason
    assert watchdog.check(11.0, 10.9, has_command=True, needs_state=True).reason == "no robot state received yet"


def test_watchdog_holds_when_any_camera_is_missing_or_stale():
    watchdog = MotionWatchdog(max_image_age_s=0.5)
    cameras = ["/front", "/wrist"]
    missing = watchdog.check(10.0, [9.9, None], True, cameras=cameras)
    assert missing.kind == "no_frame" and missing.reason == "no camera frame received yet on /wrist"
    stale = watchdog.check(10.0, [9.9, 9.2], True, cameras=cameras)
    assert stale.kind == "stale_frame" and "0.80 s old on /wrist" in stale.reason
    assert watchdog.check(10.0, [9.9, 9.6], True, cameras=cameras).allowed


def test_watchdog_holds_without_a_fresh_measured_position():
    watchdog = MotionWatchdog(max_image_age_s=0.5, max_state_age_s=0.3)
    none = watchdog.check(10.0, 9.9, True, needs_measured=True, newest_measured_s=None)
    assert none.kind == "no_measured" and "measured robot position" in none.reason
    old = watchdog.check(10.0, 9.9, True, needs_measured=True, newest_measured_s=9.6)
    assert old.kind == "stale_measured" and "0.40 s old" in old.reason
    assert watchdog.check(10.0, 9.9, True, needs_measured=True, newest_measured_s=9.8).allowed


def test_watchdog_holds_on_missing_or_stale_robot_state():
    watchdog = MotionWatchdog(max_image_age_s=0.5, max_state_age_s=0.3)
    frame = 10.0
    missing = watchdog.check(10.1, frame, True, needs_state=True, newest_state_s=None)
    assert not missing.allowed and missing.reason == "no robot state received yet"
    assert watchdog.check(10.1, frame, True, needs_state=True, newest_state_s=10.0).allowed
    stale = [watchdog.check(now, now - 0.05, True, needs_state=True, newest_state_s=10.0) for now in (10.4, 10.5)]
    assert [v.allowed for v in stale] == [False, False] and [v.kind for v in stale] == ["stale_state"] * 2
    assert "robot state is 0.40 s old" in stale[0].reason and "max_state_age_s 0.3" in stale[0].reason
    fresh = watchdog.check(10.6, 10.55, True, needs_state=True, newest_state_s=10.5)
    assert fresh.allowed and fresh.kind == "ok"
    # A policy without robot state ignores its age.
    assert watchdog.check(20.0, 19.9, True, needs_state=False, newest_state_s=1.0).allowed


# ---------------------------------------------------------------- vector -> command fields
def test_action_vector_mapping():
    arm = np.array([0.1, 0.2, 0.3])
    linear, angular = twist_from_action(arm, 2.0)
    np.testing.assert_allclose(linear, [0.2, 0.4, 0.6])
    assert angular.tolist() == [0, 0, 0]
    linear, angular = twist_from_action(np.arange(6.0), 1.0)
    assert angular.tolist() == [3, 4, 5]
    position, quaternion = pose_from_action(np.array([1, 2, 3, 0, 0, 0, 2.0]))
    assert position.tolist() == [1, 2, 3] and quaternion.tolist() == [0, 0, 0, 1]
    assert pose_from_action(np.array([1, 2, 3, 0, 0, 0, 0.0])) is None
    with pytest.raises(ValueError):
        twist_from_action(np.zeros(4), 1.0)


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


def test_rolling_percentiles_keep_the_newest_samples():
    stats = RollingPercentiles(size=10)
    assert np.isnan(stats.percentile(50))
    for value in range(100):
        stats.add(float(value))
    stats.add(float("nan"))  # ignored
    assert len(stats) == 10 and stats.percentile(50) == pytest.approx(94.5)


# ---------------------------------------------------------------- images
def _image(frame: np.ndarray, encoding: str, step: int | None = None, data: bytes | None = None):
    channels = frame.shape[2] if frame.ndim == 3 else 1
    step = step if step is not None else frame.shape[1] * channels
    if data is None:
        rows = frame.reshape(frame.shape[0], -1)
        data = np.pad(rows, ((0, 0), (0, step - rows.shape[1]))).tobytes()
    import array
    return types.SimpleNamespace(height=frame.shape[0], width=frame.shape[1], encoding=encoding, step=step,
                                 data=array.array("B", data))


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 7])
def test_raw_encodings_convert_to_rgb(rgb, encoding, padding):
    source = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
    if encoding.endswith("a8"):
        source = np.concatenate([source, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=2)
    msg = _image(np.ascontiguousarray(source), encoding, step=source.shape[1] * source.shape[2] + padding)
    out = image_msg_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))  # a view: no copy


def test_mono8_becomes_three_equal_channels():
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = image_msg_to_rgb(_image(gray, "mono8"))
    assert out.shape == (4, 5, 3) and all((out[:, :, c] == gray).all() for c in range(3))


@pytest.mark.parametrize("change, kind", [
    (dict(encoding="16UC1"), "encoding"), (dict(encoding="yuv422"), "encoding"),
    (dict(step=14), "size"), (dict(data=b"\x00" * 89), "size"), (dict(data=b"\x00" * 91), "size"),
    (dict(data=b""), "empty"), (dict(height=0), "empty"),
])
def test_bad_raw_images_raise_with_a_kind(rgb, change, kind):
    msg = _image(rgb, "rgb8")
    for key, value in change.items():
        if key == "data":
            import array
            value = array.array("B", value)
        setattr(msg, key, value)
    with pytest.raises(ImageDecodeError) as err:
        image_msg_to_rgb(msg)
    assert err.value.kind == kind and str(err.value)


def test_compressed_images_decode_and_refuse_garbage(rgb):
    png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()
    out = compressed_msg_to_rgb(types.SimpleNamespace(format="png", data=png))
    np.testing.assert_array_equal(out, rgb)  # png is lossless
    jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()
    assert compressed_msg_to_rgb(types.SimpleNamespace(format="rgb8; jpeg compressed bgr8", data=jpeg)).shape == (6, 5, 3)
    for fmt, data, kind in [("jpeg", b"", "empty"), ("jpeg", b"\xff\xd8 not a jpeg", "decode"),
                            ("jpeg", jpeg[: len(jpeg) // 3], "decode"), ("16UC1; compressedDepth", png, "encoding")]:
        with pytest.raises(ImageDecodeError) as err:
            compressed_msg_to_rgb(types.SimpleNamespace(format=fmt, data=data))
        assert err.value.kind == kind


# ---------------------------------------------------------------- commands
def test_command_checks():
    require_rclpy()  # policy_node imports rclpy
    from actdistill_ros.ros.policy_node import MAX_COMMAND_BYTES, check_instruction

    assert check_instruction("pick up the red block\n") is None
    assert check_instruction("öffne die Schublade") is None
    assert check_instruction("x" * (MAX_COMMAND_BYTES + 1))[0] == "command_size"
    assert check_instruction("ü" * (MAX_COMMAND_BYTES // 2 + 1))[0] == "command_size"  # bytes, not chars
    kind, reason = check_instruction("open the \ufffd drawer")
    assert kind == "command_text" and "UTF-8" in reason
    assert check_instruction("open\x1b[2J")[0] == "command_text"
