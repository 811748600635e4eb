"""The policy node as a real process over Fast DDS (loopback), driven by this test process.

One ee_twist node (Meta-World-like tiny untrained student, started from config/policy.yaml)
serves every test here; the other action modes and several cameras are in
test_policy_node_modes.py, the managed node in test_policy_lifecycle_node.py. Tests that change
a parameter restore it.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from ros_harness import (RosSide, require_rclpy, Streamer, diagnostic_values, image_msg,
                         load_router_stats_type, reserve_domain, serialized_string, start_policy_node)

rclpy = require_rclpy()
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from rclpy.duration import Duration  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Bool, Float64, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from actdistill_ros.policy import create_untrained_policy  # noqa: E402

NODE = "policy_node"
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
SENSOR = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
MAX_IMAGE_AGE_S = 0.4
MAX_STATE_AGE_S = 0.4
SCALE = [0.1, 0.1, 0.1, 1.0]  # action.scale: m/s per unit of the Meta-World-like (normalized) card
MAX_LINEAR_ACCELERATION = 0.5  # config/policy.yaml, m/s^2
CARD_THRESHOLD = 0.7  # the rig's card default_threshold: config/policy.yaml must not override it
CONTROL_RATE_HZ = 20.0
CARD_LOW, CARD_HIGH = [-0.1] * 3 + [-1.0], [0.1] * 3 + [1.0]  # the card's [-1, 1] x action.scale


def _frame(rng, height=48, width=64) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def linear(msg: TwistStamped) -> np.ndarray:
    return np.array([msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z])


def moving(msg: TwistStamped) -> bool:
    return bool(np.any(linear(msg) != 0.0))


def stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class TwistRig:
    """The ee_twist node plus this process's publishers and recorders."""

    def __init__(self, tmp_path_factory):
        self.RouterStats = load_router_stats_type()
        from actdistill_ros.msg import ActionChunk
        self.domain = reserve_domain()
        self.ros = RosSide(self.domain)
        node = self.ros.node
        rng = np.random.default_rng(0)
        weights = create_untrained_policy(tmp_path_factory.mktemp("twist") / "w", size="tiny", student=True, keep=0.5)
        card_path = weights / "card.json"
        card = json.loads(card_path.read_text())
        assert card["default_threshold"] == 0.5  # what the yaml used to force: the edit below is visible
        card["default_threshold"] = CARD_THRESHOLD
        card_path.write_text(json.dumps(card))
        # Latched command published before the node exists: it must still reach the node.
        self.command_pub = node.create_publisher(String, "/instruction", LATCHED)
        self.command_pub.publish(String(data="push the puck to the goal"))
        self.live_command_pub = node.create_publisher(String, "/instruction", RELIABLE)
        self.camera_pub = node.create_publisher(Image, "/camera/image_raw", SENSOR)
        self.state_pub = node.create_publisher(JointState, "/joint_states", SENSOR)
        self.twists = self.ros.record(TwistStamped, "/action", RELIABLE)
        self.grippers = self.ros.record(Float64, "/gripper/command", RELIABLE)
        self.stats = self.ros.record(self.RouterStats, f"/{NODE}/router_stats", RELIABLE)
        self.chunks = self.ros.record(ActionChunk, f"/{NODE}/action_chunk", RELIABLE)
        self.diagnostics = self.ros.record(DiagnosticArray, "/diagnostics", RELIABLE)
        self.estop_pub = node.create_publisher(Bool, f"/{NODE}/emergency_stop", RELIABLE)
        frames = [_frame(rng) for _ in range(8)]
        self.frame_msg = lambda: image_msg(frames[int(time.monotonic() * 10) % 8],
                                           stamp=node.get_clock().now().to_msg())
        self.camera = Streamer(self.camera_pub, self.frame_msg, 12.0)
        self.state = Streamer(self.state_pub, lambda: JointState(
            name=["hand_x", "hand_y", "hand_z", "gripper_opening"], position=[0.0, 0.6, 0.2, 1.0]), 12.0)
        self.process = start_policy_node(weights, self.domain, tmp_path_factory.mktemp("twist_node"), params={
            "control_rate_hz": CONTROL_RATE_HZ, "watchdog.max_image_age_s": MAX_IMAGE_AGE_S,
            "watchdog.max_state_age_s": MAX_STATE_AGE_S, "action.scale": SCALE, "enable_output": True})
        self.startup_threshold: float | None = None  # router.threshold before any test set it
        self.startup_stats = None  # the first RouterStats, before any test set the threshold

    def record_startup(self) -> None:
        self.resume()
        first = self.stats.wait_for(timeout=60.0)
        self.pause()
        assert first, f"no RouterStats after start-up:\n{self.process.output()[-3000:]}"
        self.startup_stats = first[0]
        self.startup_threshold = self.ros.get_parameters(NODE, ["router.threshold"])["router.threshold"]

    def resume(self) -> None:
        self.camera.resume()
        self.state.resume()

    def pause(self) -> None:
        self.camera.pause()
        self.state.pause()

    def diagnostics_after(self, since: float, predicate=lambda values: True, timeout: float = 8.0) -> dict:
        found = self.diagnostics.wait_for(lambda m: predicate(diagnostic_values(m)), timeout, since=since)
        assert found, f"no matching /diagnostics after {timeout} s; node output:\n{self.process.output()[-3000:]}"
        return diagnostic_values(found[-1])

    def set(self, values: dict) -> None:
        results = self.ros.set_parameters(NODE, values)
        assert all(r.successful for r in results), [r.reason for r in results]

    def assert_alive_and_acting(self) -> None:
        """The node still infers and commands motion after whatever happened before."""
        since = time.monotonic()
        assert self.process.alive(), self.process.output()[-3000:]
        assert self.stats.wait_for(since=since, timeout=10.0), "no RouterStats after the event"
        moving = self.twists.wait_for(lambda m: abs(m.twist.linear.x) + abs(m.twist.linear.y)
                                      + abs(m.twist.linear.z) > 0, since=since, timeout=10.0)
        assert moving, f"no motion commanded after the event:\n{self.process.output()[-3000:]}"

    def close(self) -> int:
        self.camera.close()
        self.state.close()
        code = self.process.stop()
        self.ros.close()
        return code


@pytest.fixture(scope="module")
def twist_rig(tmp_path_factory):
    rig = TwistRig(tmp_path_factory)
    try:
        rig.record_startup()
    except BaseException:
        rig.close()
        raise
    yield rig
    code = rig.close()
    assert code == 0, f"node did not shut down cleanly on SIGINT (exit {code}):\n{rig.process.output()[-3000:]}"


@pytest.fixture
def twist(twist_rig):
    """The twist rig with camera and state streaming for the duration of one test."""
    twist_rig.resume()
    yield twist_rig
    twist_rig.pause()


def test_ee_twist_and_gripper_commands_from_yaml_config(twist):
    moving = twist.twists.wait_for(lambda m: abs(m.twist.linear.x) + abs(m.twist.linear.z) > 0, timeout=40.0,
                                   count=3)
    assert moving, f"no twist commanded:\n{twist.process.output()[-3000:]}"
    # (The bounds and limits need outputs beyond them: test_bounds_and_acceleration_limit_hold_...)
    for msg in moving:
        assert (msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z) == (0.0, 0.0, 0.0)
        assert msg.header.frame_id == "base_link"
    grippers = twist.grippers.wait_for(timeout=5.0)
    assert grippers and all(-1.0 <= m.data <= 1.0 for m in grippers)
    stats = twist.stats.wait_for(lambda m: math.isfinite(m.camera_to_action_ms), timeout=5.0)
    assert stats
    last = stats[-1]
    assert last.num_layers == 4 and len(last.layer_mask) == 4
    assert last.inference_ms > 0 and last.camera_to_action_ms >= last.inference_ms
    assert last.backbone_gflops <= last.full_backbone_gflops


def test_card_default_threshold_applies_when_the_yaml_does_not_set_it(twist_rig):
    """config/policy.yaml leaves router.threshold unset: the node starts at the card's value."""
    assert twist_rig.startup_threshold == pytest.approx(CARD_THRESHOLD)
    assert twist_rig.startup_stats.threshold == pytest.approx(CARD_THRESHOLD)


def _stats_with_threshold(rig, threshold: float):
    since = time.monotonic()
    results = rig.ros.set_parameters(NODE, {"router.threshold": threshold})
    assert results[0].successful, results[0].reason
    found = rig.stats.wait_for(lambda m: abs(m.threshold - threshold) < 1e-6, since=since, timeout=15.0)
    assert found, f"no RouterStats at threshold {threshold}"
    return found[-1]


def test_router_threshold_set_changes_executed_fraction(twist):
    everything = _stats_with_threshold(twist, 0.0)
    assert everything.executed_fraction == 1.0 and list(everything.executed_layers) == [0, 1, 2, 3]
    nothing = _stats_with_threshold(twist, 1.0)
    assert nothing.executed_fraction == 0.0 and list(nothing.executed_layers) == []
    assert nothing.backbone_gflops == 0.0
    half = _stats_with_threshold(twist, 0.5)  # keep=0.5: about half of the untrained gates are >= 0.5
    assert 0.0 < half.executed_fraction < 1.0
    assert half.layer_mask == [i in set(half.executed_layers) for i in range(4)]


def test_invalid_parameter_sets_are_refused_with_a_reason(twist_rig):
    ros = twist_rig.ros
    out_of_range, = ros.set_parameters(NODE, {"router.threshold": 1.5})
    assert not out_of_range.successful and out_of_range.reason
    wrong_type, = ros.set_parameters(NODE, {"router.threshold": "high"})
    assert not wrong_type.successful and "type" in wrong_type.reason.lower()
    read_only, = ros.set_parameters(NODE, {"weights_path": "/elsewhere"})
    assert not read_only.successful and "read-only" in read_only.reason
    startup_only, = ros.set_parameters(NODE, {"action.scale": [1.0, 1.0, 1.0, 1.0]})
    assert not startup_only.successful and "action.scale is read-only" in startup_only.reason
    bad_limits, = ros.set_parameters(NODE, {"action.position_limits_low": [0.0, 0.0]})
    assert not bad_limits.successful and "action.position_limits_low" in bad_limits.reason
    removed, = ros.set_parameters(NODE, {"action.velocity_limit": 0.5})
    assert not removed.successful  # replaced by the per-second limits: not a parameter any more
    # A batch with one bad value changes nothing, not even the valid part.
    before = ros.get_parameters(NODE, ["action.max_linear_acceleration", "action.ensemble_decay"])
    batch = ros.set_parameters(NODE, {"action.max_linear_acceleration": 0.2, "action.ensemble_decay": 0.5,
                                      "action.position_limits_high": [0.5, 0.5, 0.5, -2.0]}, atomically=True)
    assert not batch.successful and "empty" in batch.reason
    assert ros.get_parameters(NODE, ["action.max_linear_acceleration", "action.ensemble_decay"]) == before
    assert before["action.max_linear_acceleration"] == MAX_LINEAR_ACCELERATION


def _bad_image(kind: str) -> Image:
    frame = np.zeros((48, 64, 3), np.uint8)
    if kind == "encoding":
        return image_msg(np.zeros((48, 64, 2), np.uint8), encoding="16UC1", step=128)
    if kind == "size":
        msg = image_msg(frame)
        msg.data = msg.data[:-64]  # data shorter than step * height
        return msg
    if kind == "step":
        return image_msg(frame, step=100)  # step < width * 3
    msg = image_msg(frame)
    msg.data = b""
    return msg


@pytest.mark.parametrize("case, counter", [
    ("image:encoding", "bad_messages.image_encoding"),
    ("image:size", "bad_messages.image_size"),
    ("image:step", "bad_messages.image_size"),
    ("image:empty", "bad_messages.image_empty"),
    ("command:2MB", "bad_messages.command_size"),
    ("command:non-utf8", "bad_messages.command_text"),
    ("command:control-chars", "bad_messages.command_text"),
    ("state:wrong-size", "bad_messages.state"),
])
def test_malformed_input_is_counted_and_node_keeps_working(twist, case, counter):
    first = twist.diagnostics_after(time.monotonic())
    before = int(first.get(counter, "0"))
    topic, kind = case.split(":")
    for _ in range(3):  # best-effort camera/state QoS: send a few so at least one lands
        if topic == "image":
            twist.camera_pub.publish(_bad_image(kind))
        elif kind == "2MB":
            twist.live_command_pub.publish(String(data="a" * 2_000_000))
        elif kind == "non-utf8":
            twist.live_command_pub.publish(serialized_string(b"open the \xff\xfe drawer"))
        elif kind == "control-chars":
            twist.live_command_pub.publish(String(data="open\x07the drawer"))
        else:
            twist.state_pub.publish(JointState(position=[0.0, 1.0]))
        time.sleep(0.05)
    after = twist.diagnostics_after(time.monotonic(), lambda v: int(v.get(counter, "0")) > before, timeout=20.0)
    assert int(after["bad_messages_total"]) >= int(after[counter])
    twist.assert_alive_and_acting()  # the last good command and frames still drive it


def test_stale_camera_commands_zero_twist(twist_rig):
    rig = twist_rig
    log_start = len(rig.process.output())
    rig.resume()
    assert rig.twists.wait_for(lambda m: abs(m.twist.linear.x) + abs(m.twist.linear.z) > 0, timeout=20.0)
    rig.camera.pause()  # state keeps coming; only the camera goes quiet
    paused_at = time.monotonic()
    time.sleep(MAX_IMAGE_AGE_S + 0.3)
    held = rig.twists.wait_for(since=paused_at + MAX_IMAGE_AGE_S + 0.2, count=5, timeout=5.0)
    assert held, "no twist published while the camera was stale (expected zero twists)"
    for msg in held:
        assert (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z) == (0.0, 0.0, 0.0)
    values = rig.diagnostics_after(time.monotonic())
    assert "camera /camera/image_raw is" in rig.diagnostics.messages()[-1].status[0].message
    assert values["latency_ms_p50"] != "nan" and float(values["age_s.camera /camera/image_raw"]) > MAX_IMAGE_AGE_S
    rig.camera.resume()
    rig.assert_alive_and_acting()
    rig.pause()
    output = rig.process.output()[log_start:]
    assert output.count("holding position: camera /camera/image_raw is") == 1  # logged once per episode


@pytest.mark.parametrize("stamps", ["2 s old", "frozen"])
def test_frames_that_keep_arriving_with_old_or_frozen_stamps_stop_the_arm(twist_rig, stamps):
    """A transport delivering frames 2 s late, or a hung driver re-publishing one frame: frames keep
    arriving on time, so only their header stamps can tell; the arm must stop all the same."""
    rig = twist_rig
    clock = rig.ros.node.get_clock()
    frozen = clock.now().to_msg()
    rng = np.random.default_rng(5)

    def late_frame():
        if stamps == "frozen":
            stamp = frozen
        else:
            stamp = (clock.now() - Duration(seconds=2.0)).to_msg()
        return image_msg(_frame(rng), stamp=stamp)

    bad_camera = Streamer(rig.camera_pub, late_frame, 12.0)
    rig.resume()
    try:
        assert rig.twists.wait_for(moving, since=time.monotonic(), timeout=20.0), rig.process.output()[-3000:]
        rig.camera.pause()
        frozen = clock.now().to_msg()
        bad_camera.resume()
        switched = time.monotonic()
        time.sleep(2.5)
        # Moving commands only before the stamps can tell (frozen: within the max age), then stops.
        settled = switched + (MAX_IMAGE_AGE_S if stamps == "frozen" else 0.0) + 0.3
        late = rig.twists.messages(settled)
        received = bad_camera.published
    finally:
        bad_camera.close()
        rig.pause()
    assert received >= 20 and len(late) >= 20, (received, len(late))  # frames kept coming, stops kept going out
    assert not any(moving(m) for m in late), [linear(m) for m in late if moving(m)][:5]
    reason = rig.diagnostics.messages()[-1].status[0].message
    assert ("has not advanced" in reason) if stamps == "frozen" else ("old by its stamp" in reason), reason
    rig.resume()
    try:
        rig.assert_alive_and_acting()  # good stamps again: motion again
    finally:
        rig.pause()


def test_every_parameter_has_a_value_so_param_dump_lists_them_all(twist_rig):
    """What `ros2 param dump` does: list every parameter, then get them all in one request."""
    names = twist_rig.ros.list_parameters(NODE)
    assert {"action.joint_names", "action.position_limits_low", "action.scale", "camera.transports",
            "action.max_joint_velocity", "router.threshold"} <= set(names)
    values = twist_rig.ros.get_parameters(NODE, names)
    assert set(values) == set(names) and all(value is not None for value in values.values()), values
    assert values["action.joint_names"] == [] and values["camera.transports"] == ["raw"]


def test_stale_robot_state_commands_zero_twist(twist_rig):
    rig = twist_rig
    log_start = len(rig.process.output())
    rig.resume()
    assert rig.twists.wait_for(lambda m: abs(m.twist.linear.x) + abs(m.twist.linear.z) > 0, timeout=20.0)
    rig.state.pause()  # the camera keeps coming; only the robot state goes quiet
    paused_at = time.monotonic()
    time.sleep(MAX_STATE_AGE_S + 0.3)
    held = rig.twists.wait_for(since=paused_at + MAX_STATE_AGE_S + 0.2, count=5, timeout=5.0)
    assert held, "no twist published while the state was stale (expected zero twists)"
    for msg in held:
        assert (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z) == (0.0, 0.0, 0.0)
    rig.diagnostics_after(time.monotonic())
    assert "robot state is" in rig.diagnostics.messages()[-1].status[0].message
    rig.state.resume()
    rig.assert_alive_and_acting()
    rig.pause()
    output = rig.process.output()[log_start:]
    assert output.count("holding position: robot state is") == 1, output[-3000:]  # once per episode


def _window(recorder, seconds: float) -> list:
    """The messages ``recorder`` receives during the next ``seconds``."""
    start = time.monotonic()
    time.sleep(seconds)
    return recorder.messages(start, until=start + seconds)


def test_commands_leave_at_the_control_rate_whatever_the_camera_rate(twist_rig):
    """A 60 Hz camera and a fast model, control at 5 Hz: 5 commands per second, not one per inference."""
    rig = twist_rig
    rate_hz, seconds = 5.0, 3.0
    fast_camera = Streamer(rig.camera_pub, rig.frame_msg, 60.0)
    rig.set({"control_rate_hz": rate_hz})
    try:
        rig.state.resume()
        fast_camera.resume()
        assert rig.twists.wait_for(moving, since=time.monotonic(), timeout=20.0), rig.process.output()[-3000:]
        start = time.monotonic()
        twists = _window(rig.twists, seconds)
        chunks = rig.chunks.messages(start)
        grippers = rig.grippers.messages(start)
    finally:
        fast_camera.close()
        rig.pause()
        rig.set({"control_rate_hz": CONTROL_RATE_HZ})
    assert len(chunks) >= 2 * len(twists), "precondition: inference must outpace the control rate"
    # At most one command per control period (the old node sent one per inference as well);
    # the lower bound only shows the timer ran (a loaded machine may delay some ticks).
    assert rate_hz * seconds / 2 <= len(twists) <= rate_hz * seconds + 2, (len(twists), len(chunks))
    assert len(grippers) <= rate_hz * (seconds + 1)


def test_bounds_and_acceleration_limit_hold_with_outputs_beyond_them(twist):
    """Limits narrower than the model's outputs: every twist within the bounds, and the change per
    control period at most max_linear_acceleration x period (both limits must actually bite)."""
    bound, acceleration = 0.001, 0.004  # m/s and m/s^2; the untrained model's outputs reach about 0.003 m/s
    step = acceleration / CONTROL_RATE_HZ
    twist.set({"action.position_limits_low": [-bound] * 3 + [-1.0],
               "action.position_limits_high": [bound] * 3 + [1.0], "action.max_linear_acceleration": acceleration})
    try:
        since = time.monotonic() + 0.3  # messages from before the set may still be in flight
        found = twist.twists.wait_for(since=since, count=40, timeout=20.0)
        chunks = twist.chunks.messages(since)
    finally:
        twist.set({"action.position_limits_low": CARD_LOW, "action.position_limits_high": CARD_HIGH,
                   "action.max_linear_acceleration": MAX_LINEAR_ACCELERATION})
    assert found, twist.process.output()[-3000:]
    commanded = np.array([linear(m) for m in found])
    assert np.abs(commanded).max() <= bound + 1e-9
    # Every change is bounded, stops included: a hold (a chunk ran out on a loaded machine) decelerates.
    steps = np.linalg.norm(np.diff(commanded, axis=0), axis=1)
    assert steps.max() <= step + 1e-9
    predicted = np.concatenate([np.asarray(m.actions).reshape(m.chunk_size, m.action_dim)[:, :3] for m in chunks])
    assert np.isclose(np.abs(predicted).max() * 0.1, bound), "the model's outputs must exceed the bounds"
    assert np.isclose(steps.max(), step), "the model's outputs must change faster than the acceleration limit"


def test_temporal_ensembling_publishes_one_router_stats_per_inference(twist_rig):
    rig = twist_rig
    fast_camera = Streamer(rig.camera_pub, rig.frame_msg, 60.0)
    rig.set({"action.temporal_ensemble": True, "control_rate_hz": 10.0})
    try:
        rig.state.resume()
        fast_camera.resume()
        time.sleep(1.0)
        start = time.monotonic()
        chunks = _window(rig.chunks, 3.0)
        fast_camera.pause()
        time.sleep(0.5)  # the last chunks' stats leave at the next tick
        stats = rig.stats.messages(start)
        twists = rig.twists.messages(start)
    finally:
        fast_camera.close()
        rig.pause()
        rig.set({"action.temporal_ensemble": False, "control_rate_hz": CONTROL_RATE_HZ})
    chunk_stamps = [stamp_ns(m.header.stamp) for m in chunks]
    stats_per_stamp = {}
    for m in stats:
        stats_per_stamp.setdefault(stamp_ns(m.header.stamp), []).append(m)
    assert len(chunk_stamps) > 2 * 10.0 * 3.0 / 2, "precondition: several inferences per control period"
    assert all(len(stats_per_stamp.get(stamp, [])) == 1 for stamp in chunk_stamps), "one RouterStats per inference"
    executed = [stats_per_stamp[stamp][0] for stamp in chunk_stamps]
    finite = [m for m in executed if math.isfinite(m.camera_to_action_ms)]
    assert len(finite) >= 0.75 * len(executed)  # ensembling starts every chunk at the next tick
    assert any(moving(m) for m in twists)


def test_enable_output_toggled_while_moving_decelerates_then_ramps_from_zero(twist):
    acceleration = 0.01  # m/s^2: 0.0005 m/s per period, below the untrained model's 0.003 m/s
    step = acceleration / CONTROL_RATE_HZ
    twist.set({"action.max_linear_acceleration": acceleration})
    try:
        assert twist.twists.wait_for(moving, since=time.monotonic(), timeout=20.0)
        before_off = time.monotonic()
        twist.set({"enable_output": False})
        time.sleep(1.5)
        silent_from = time.monotonic() - 0.8
        after_off = twist.twists.messages(before_off)
        assert after_off and not moving(after_off[-1]), "no stop after enable_output false"
        speeds = [np.linalg.norm(linear(m)) for m in after_off]
        assert np.all(np.abs(np.diff(speeds)) <= step + 1e-9), speeds  # a ramp down, not a jump to zero
        assert not twist.twists.messages(silent_from), "then the dry run commands nothing"
        assert twist.chunks.messages(silent_from), "the dry run still infers"
        before_on = time.monotonic()
        twist.set({"enable_output": True})
        moved = twist.twists.wait_for(moving, since=before_on, timeout=20.0, count=3)
    finally:
        twist.set({"enable_output": True, "action.max_linear_acceleration": MAX_LINEAR_ACCELERATION})
    assert moved, twist.process.output()[-3000:]
    after_on = twist.twists.messages(before_on)
    start = next(i for i, m in enumerate(after_on) if moving(m))
    ramp = [np.linalg.norm(linear(m)) for m in after_on[start:start + 3]]
    assert all(value <= (k + 1) * step + 1e-9 for k, value in enumerate(ramp)), ramp  # from zero, not a jump
    assert ramp[0] == pytest.approx(step), "the model's output must exceed the first ramp step"


def test_emergency_stop_latches_until_released_by_topic_or_service(twist):
    period = 1.0 / CONTROL_RATE_HZ
    for engage, release in (("topic", "service"), ("service", "topic")):
        assert twist.twists.wait_for(moving, since=time.monotonic(), timeout=20.0)
        engaged_at = time.monotonic()
        if engage == "topic":
            twist.estop_pub.publish(Bool(data=True))
        else:
            response = twist.ros.call(SetBool, f"/{NODE}/emergency_stop", SetBool.Request(data=True))
            assert response.success and "engaged" in response.message
        first_stop = twist.twists.wait_for(lambda m: not moving(m), since=engaged_at, timeout=5.0)
        assert first_stop, "no stop after the emergency stop"
        time.sleep(1.5)  # inputs stay fresh: the stop must hold (latched)
        latched = twist.twists.messages(engaged_at + period + 0.3)
        assert len(latched) >= 5 and not any(moving(m) for m in latched), "motion during the emergency stop"
        reported = twist.diagnostics.wait_for(lambda m: diagnostic_values(m).get("emergency_stop") == "true",
                                              since=engaged_at, timeout=8.0)
        assert reported and reported[-1].status[0].level == DiagnosticStatus.ERROR
        released_at = time.monotonic()
        if release == "topic":
            twist.estop_pub.publish(Bool(data=False))
        else:
            response = twist.ros.call(SetBool, f"/{NODE}/emergency_stop", SetBool.Request(data=False))
            assert response.success and "released" in response.message
        assert twist.twists.wait_for(moving, since=released_at, timeout=20.0), "no motion after the release"
    output = twist.process.output()
    assert output.count("EMERGENCY STOP engaged") == 2 and output.count("emergency stop released") == 2


def test_router_keep_fraction_is_live_settable_and_reported(twist):
    assert twist.ros.get_parameters(NODE, ["router.keep_fraction"]) == {"router.keep_fraction": 0.0}
    try:
        for keep, layers in ((0.25, 1), (0.75, 3)):
            since = time.monotonic()
            twist.set({"router.keep_fraction": keep})
            found = twist.stats.wait_for(lambda m: abs(m.keep_fraction - keep) < 1e-6, since=since, timeout=15.0)
            assert found, f"no RouterStats with keep_fraction {keep}"
            assert len(found[-1].executed_layers) == layers and found[-1].executed_fraction == pytest.approx(keep)
        values = twist.diagnostics_after(time.monotonic(), lambda v: v.get("keep_fraction") == "0.75")
        assert values["keep_fraction"] == "0.75"
        refused, = twist.ros.set_parameters(NODE, {"router.keep_fraction": 1.5})
        assert not refused.successful
    finally:
        twist.set({"router.keep_fraction": 0.0})
    since = time.monotonic()
    assert twist.stats.wait_for(lambda m: m.keep_fraction == 0.0, since=since, timeout=15.0)


@pytest.mark.parametrize("case", ["missing weights", "mode does not fit the card", "one topic per camera",
                                  "normalized units without a scale", "a replaced parameter", "transports"])
def test_start_up_errors_exit_non_zero_with_one_line(tmp_path, case):
    if case == "missing weights":
        weights, params, expect = tmp_path / "nowhere", {}, "cannot load weights"
    elif case == "mode does not fit the card":
        weights = create_untrained_policy(tmp_path / "w", size="tiny")
        params, expect = {"action.mode": "joint_state"}, "action.mode joint_state needs a joint action space"
    elif case == "normalized units without a scale":
        weights, params = create_untrained_policy(tmp_path / "w", size="tiny"), {}
        expect = "action dimension 'delta_x' has unit 'normalized', which ee_twist cannot command as m/s: set " \
                 "action.scale"
    elif case == "a replaced parameter":
        weights, params = create_untrained_policy(tmp_path / "w", size="tiny"), {"action.velocity_limit": 0.5}
        expect = "parameter action.velocity_limit was replaced: use action.max_joint_velocity"
    elif case == "transports":
        weights = create_untrained_policy(tmp_path / "w", size="tiny")
        params = {"camera.transports": ["raw", "compressed"], "action.scale": SCALE}
        expect = "camera.transports must be one of ['raw', 'compressed'] for all cameras, or one per topic"
    else:
        weights = create_untrained_policy(tmp_path / "w", size="tiny")
        params = {"topics.cameras": ["/cam/front", "/cam/wrist"]}
        expect = "topics.cameras lists 2 topic(s) ['/cam/front', '/cam/wrist'], the policy takes 1 camera image(s)"
    process = start_policy_node(weights, reserve_domain(), tmp_path / "node", params=params)
    code = process.wait(timeout=60)
    lines = [line for line in process.output().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and expect in lines[0] and "FATAL" in lines[0], lines


def test_the_node_starts_with_output_disabled_and_says_how_to_enable_it(tmp_path):
    """config/policy.yaml on a real arm: inference and stats run, no command leaves until enabled."""
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, state_dim=0)
    domain = reserve_domain()
    ros = RosSide(domain)
    ros.node.create_publisher(String, "/instruction", LATCHED).publish(String(data="push the puck"))
    camera = Streamer(ros.node.create_publisher(Image, "/camera/image_raw", SENSOR),
                      lambda: image_msg(_frame(np.random.default_rng(1)), stamp=ros.node.get_clock().now().to_msg()))
    twists = ros.record(TwistStamped, "/action", RELIABLE)
    chunks_type = load_router_stats_type()
    stats = ros.record(chunks_type, f"/{NODE}/router_stats", RELIABLE)
    process = start_policy_node(weights, domain, tmp_path / "node", params={"action.scale": SCALE})
    try:
        camera.resume()
        assert stats.wait_for(count=5, timeout=60.0), process.output()[-3000:]
        assert not twists.messages(), "a node that was not enabled commanded motion"
        assert f"ros2 param set /{NODE} enable_output true" in process.output()
        since = time.monotonic()
        results = ros.set_parameters(NODE, {"enable_output": True})
        assert results[0].successful, results[0].reason
        assert twists.wait_for(moving, since=since, timeout=20.0), process.output()[-3000:]
    finally:
        camera.close()
        code = process.stop()
        ros.close()
    assert code == 0
