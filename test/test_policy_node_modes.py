"""The policy node's position modes (joint_state, joint_trajectory, ee_pose) and several cameras,
each as a real node process over Fast DDS (loopback), with limits narrower than the untrained
model's outputs so the ramp and velocity rules are visible."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from ros_harness import (RosSide, Streamer, compressed_msg, diagnostic_values, image_msg, load_router_stats_type,
                         require_rclpy, reserve_domain, start_policy_node)

rclpy = require_rclpy()
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Float64, String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from actdistill_ros.policy import create_untrained_policy  # noqa: E402
from actdistill_ros.weights import ActionSpace  # noqa: E402

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
SENSOR = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
JOINTS = [f"arm_joint_{i}" for i in range(1, 7)]
MEASURED = {name: 0.1 * (i + 1) for i, name in enumerate(JOINTS)}  # a distinct value per joint
AGE = 0.4  # watchdog ages
VELOCITY = 0.01  # rad (m) per control period: below the untrained model's step-to-step changes
TWIST_SCALE = [0.1, 0.1, 0.1, 1.0]  # action.scale of the Meta-World-like (normalized) card


def joint_space(gripper: bool = True) -> ActionSpace:
    names = [f"j{i}" for i in range(6)] + (["gripper"] if gripper else [])
    return ActionSpace(kind="joint", names=names, units=["rad"] * 6 + ["1"] * gripper, low=[-3.0] * 6 + [0.0] * gripper,
                       high=[3.0] * 6 + [1.0] * gripper, gripper_index=6 if gripper else None)


def joint_state_msg(values: dict[str, float]) -> JointState:
    return JointState(name=list(values), position=[float(v) for v in values.values()])


def random_frame(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


class Harness:
    """This process's ROS side, publishers and streamers for one node process."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.domain = reserve_domain()
        self.ros = RosSide(self.domain)
        self.node = self.ros.node
        self.streamers: list[Streamer] = []
        self.process = None

    def stream(self, msg_type, topic: str, make_msg, rate_hz: float = 12.0) -> Streamer:
        streamer = Streamer(self.node.create_publisher(msg_type, topic, SENSOR), make_msg, rate_hz)
        self.streamers.append(streamer)
        return streamer

    def command(self, topic: str, text: str) -> None:
        self.node.create_publisher(String, topic, LATCHED).publish(String(data=text))

    def start(self, weights, **params):
        self.process = start_policy_node(weights, self.domain, self.tmp_path / "node", params=params)
        return self.process

    def close(self) -> int:
        for streamer in self.streamers:
            streamer.close()
        code = self.process.stop() if self.process else 0
        self.ros.close()
        return code


@pytest.fixture
def harness(tmp_path):
    load_router_stats_type()
    h = Harness(tmp_path)
    yield h
    code = h.close()
    assert code == 0, h.process.output()[-3000:]


def _positions(msg: JointState) -> np.ndarray:
    return np.asarray(msg.position)


def test_joint_state_reorders_names_ramps_from_the_measured_state_and_refuses_missing_joints(harness, tmp_path):
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, action_space=joint_space(),
                                      state_dim=6)
    card = json.loads((weights / "card.json").read_text())
    card["state_names"] = JOINTS
    (weights / "card.json").write_text(json.dumps(card))
    commands = harness.ros.record(JointState, "/arm/joint_command", RELIABLE)
    diagnostics = harness.ros.record(DiagnosticArray, "/diagnostics", RELIABLE)
    harness.command("/instruction", "stack the blocks")
    harness.stream(Image, "/camera/image_raw", lambda: image_msg(random_frame())).resume()
    # Every name the card needs, in another order, plus a joint it does not know.
    shuffled = {"tool_joint": 9.0, **{name: MEASURED[name] for name in reversed(JOINTS)}}
    state = {"values": shuffled}
    harness.stream(JointState, "/joint_states", lambda: joint_state_msg(state["values"])).resume()
    process = harness.start(weights, **{"action.mode": "joint_state", "topics.action": "/arm/joint_command",
                                        "action.joint_names": JOINTS, "action.max_joint_velocity": [VELOCITY * 20.0],
                                        "control_rate_hz": 20.0, "watchdog.max_image_age_s": AGE,
                                        "watchdog.max_state_age_s": AGE, "enable_output": True})
    measured = np.array([MEASURED[name] for name in JOINTS])

    def first_moves(since: float, count: int = 5) -> list[np.ndarray]:
        found = commands.wait_for(lambda m: not np.allclose(_positions(m), measured), since=since, count=count,
                                  timeout=40.0)
        assert found, process.output()[-3000:]
        return [_positions(m) for m in found]

    moves = first_moves(0.0)
    assert list(commands.messages()[0].name) == JOINTS
    # Start-up: the first command is one velocity step from the measured state (reordered by name),
    # not the model's output (which is far from it) and not a step from zero.
    assert np.abs(moves[0] - measured).max() == pytest.approx(VELOCITY)
    assert np.abs(np.diff(np.stack(moves), axis=0)).max() <= VELOCITY + 1e-9

    # A joint missing: refused with one line naming it; the measured position goes stale: hold.
    log_start = len(process.output())
    state["values"] = {name: MEASURED[name] for name in JOINTS if name != "arm_joint_4"}
    missing_at = time.monotonic()
    held = commands.wait_for(since=missing_at + AGE + 0.5, count=5, timeout=10.0)
    assert held, process.output()[-3000:]
    # The measurement is stale, so the hold keeps the last commanded target, every tick: no jump back.
    last_moving = [_positions(m) for m in commands.messages(until=missing_at + AGE - 0.1)][-1]
    assert all(np.allclose(_positions(m), _positions(held[0])) for m in held), [_positions(m) for m in held]
    assert np.abs(_positions(held[0]) - last_moving).max() <= 3 * VELOCITY + 1e-9
    time.sleep(1.0)
    log = process.output()[log_start:]
    assert "lacks joints ['arm_joint_4']" in log
    assert log.count("dropped bad state input") == 1 and log.count("dropped bad measured_position input") == 1
    assert diagnostics.wait_for(lambda m: "robot state is" in m.status[0].message, since=missing_at, timeout=8.0)
    values = diagnostic_values(diagnostics.messages()[-1])
    assert int(values["bad_messages.state"]) >= 5  # every message counted, one line logged

    # Names back: motion resumes, ramping from the (fresh) measured state again, not from the hold.
    state["values"] = shuffled
    resumed_at = time.monotonic()
    hold = _positions(held[-1])
    moves = commands.wait_for(lambda m: not np.allclose(_positions(m), hold), since=resumed_at, count=2,
                              timeout=40.0)
    assert moves, process.output()[-3000:]
    assert np.abs(_positions(moves[0]) - measured).max() <= VELOCITY + 1e-9


def test_joint_trajectory_from_a_compressed_and_a_raw_camera_ramps_from_the_measured_state(harness, tmp_path):
    """A compressed wrist camera and a raw scene camera (camera.transports per topic) feed one policy."""
    RouterStats = load_router_stats_type()
    cameras = ["/arm/wrist/compressed", "/arm/scene/image_raw"]
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, keep=0.5, action_space=joint_space(),
                                      state_dim=0, camera_names=cameras)
    ok, jpeg = cv2.imencode(".jpg", random_frame())
    harness.command("/arm/instruction", "stack the blocks")
    trajectories = harness.ros.record(JointTrajectory, "/arm/trajectory", RELIABLE)
    grippers = harness.ros.record(Float64, "/arm/gripper", RELIABLE)
    stats = harness.ros.record(RouterStats, "/arm/stats", RELIABLE)
    diagnostics = harness.ros.record(DiagnosticArray, "/diagnostics", RELIABLE)
    low, high = [-0.05] * 6 + [0.0], [0.05] * 6 + [1.0]
    clock = harness.node.get_clock()
    wrist = harness.stream(CompressedImage, cameras[0], lambda: compressed_msg(jpeg.tobytes(),
                                                                              stamp=clock.now().to_msg()), 10.0)
    scene = harness.stream(Image, cameras[1], lambda: image_msg(random_frame(2), stamp=clock.now().to_msg()), 10.0)
    harness.stream(JointState, "/joint_states", lambda: joint_state_msg({name: 0.0 for name in JOINTS})).resume()
    harness.process = start_policy_node(weights, harness.domain, tmp_path / "node", node_name="arm_policy", params={
        "action.mode": "joint_trajectory", "camera.transports": ["compressed", "raw"], "state.enabled": False,
        "topics.cameras": cameras, "topics.command": "/arm/instruction",
        "topics.action": "/arm/trajectory", "topics.gripper": "/arm/gripper", "topics.router_stats": "/arm/stats",
        "action.joint_names": JOINTS, "action.position_limits_low": low, "action.position_limits_high": high,
        "action.max_joint_velocity": [VELOCITY * 25.0], "control_rate_hz": 25.0, "watchdog.max_image_age_s": AGE,
        "enable_output": True})
    process = harness.process
    wrist.resume()
    scene.resume()
    found = trajectories.wait_for(lambda m: len(m.points) == 4, count=2, timeout=40.0)
    assert found, f"no JointTrajectory:\n{process.output()[-3000:]}"
    assert "/arm/wrist/compressed (compressed), /arm/scene/image_raw (raw)" in process.output()
    first = found[0]
    assert list(first.joint_names) == JOINTS
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in first.points]
    assert times == pytest.approx([0.04, 0.08, 0.12, 0.16])
    points = np.array([p.positions for p in first.points])
    # From the measured state (0), one velocity step per point, and within the position limits.
    for k, point in enumerate(points):
        assert np.abs(point).max() <= min(0.05, VELOCITY * (k + 1)) + 1e-9
    assert np.abs(points[0]).max() == pytest.approx(VELOCITY)
    for trajectory in found:
        assert np.abs(np.array([p.positions for p in trajectory.points])).max() <= 0.05 + 1e-9
    assert grippers.wait_for(timeout=5.0)
    assert stats.wait_for(timeout=5.0)[-1].num_layers == 4
    assert len(stats.messages()[-1].source_stamps) == 2  # one inference from both cameras
    since = time.monotonic()
    bad_pub = harness.node.create_publisher(CompressedImage, cameras[0], SENSOR)
    for _ in range(3):
        bad_pub.publish(compressed_msg(b"\xff\xd8 this is not a jpeg"))
        time.sleep(0.05)
    assert diagnostics.wait_for(lambda m: int(diagnostic_values(m).get("bad_messages.image_decode", "0")) >= 1,
                                since=since, timeout=10.0), process.output()[-3000:]
    assert trajectories.wait_for(since=time.monotonic(), timeout=10.0) and process.alive()
    # A camera gap: one stop trajectory to the (fresh) measured position 0, within the limits, once.
    scene.pause()
    paused_at = time.monotonic()
    time.sleep(AGE + 1.5)
    after = trajectories.messages(paused_at)  # maybe one more trajectory from the last frame, then the hold
    assert after, process.output()[-3000:]
    stop = np.array([p.positions for p in after[-1].points])
    assert stop[-1].tolist() == [0.0] * 6 and len(stop) <= 6
    assert np.abs(np.diff(stop, axis=0)).max(initial=0.0) <= VELOCITY + 1e-9
    assert not trajectories.messages(time.monotonic() - 1.0), "the hold trajectory must not be re-sent every tick"


def test_ee_pose_needs_a_measured_pose_and_ramps_from_it(harness, tmp_path):
    space = ActionSpace(kind="end_effector", names=["x", "y", "z", "qx", "qy", "qz", "qw", "gripper"],
                        units=["m"] * 3 + ["1"] * 5, low=[-1.0] * 7 + [0.0], high=[1.0] * 8, gripper_index=7)
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, action_space=space, state_dim=0)
    poses = harness.ros.record(PoseStamped, "/action", RELIABLE)
    diagnostics = harness.ros.record(DiagnosticArray, "/diagnostics", RELIABLE)
    harness.command("/instruction", "wipe the table")
    harness.stream(Image, "/camera/image_raw", lambda: image_msg(random_frame())).resume()
    frame_id = {"value": "base_link"}

    def measured_pose() -> PoseStamped:
        msg = PoseStamped()
        msg.header.frame_id = frame_id["value"]
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = 0.3, -0.2, 0.5
        msg.pose.orientation.w = 1.0
        return msg

    measured = harness.stream(PoseStamped, "/measured_pose", measured_pose)
    process = harness.start(weights, **{"action.mode": "ee_pose", "state.enabled": False,
                                        "action.max_linear_velocity": VELOCITY * 20.0, "control_rate_hz": 20.0,
                                        "watchdog.max_image_age_s": AGE, "watchdog.max_state_age_s": AGE,
                                        "enable_output": True})
    assert diagnostics.wait_for(lambda m: "no measured robot position" in m.status[0].message, timeout=40.0), \
        process.output()[-3000:]
    time.sleep(1.0)
    assert not poses.messages(), "ee_pose must not command anything without a measured pose"
    measured.resume()
    position = np.array([0.3, -0.2, 0.5])

    def xyz(msg: PoseStamped) -> np.ndarray:
        return np.array([msg.pose.position.x, msg.pose.position.y, msg.pose.position.z])

    moves = poses.wait_for(lambda m: not np.allclose(xyz(m), position), count=5, timeout=30.0)
    assert moves, process.output()[-3000:]
    first = poses.messages()[0]  # a hold at the measured pose, or the first step from it
    assert np.linalg.norm(xyz(first) - position) <= VELOCITY + 1e-9 and first.header.frame_id == "base_link"
    # One step (m/s x period, along the norm) from the measured pose, and no faster after it.
    assert np.linalg.norm(xyz(moves[0]) - position) == pytest.approx(VELOCITY)
    steps = np.linalg.norm(np.diff(np.stack([xyz(m) for m in moves]), axis=0), axis=1)
    assert steps.max() <= VELOCITY + 1e-9
    for msg in moves:
        q = msg.pose.orientation
        assert np.linalg.norm([q.x, q.y, q.z, q.w]) == pytest.approx(1.0)
    # A measured pose in another frame is refused: the position goes stale, the node holds.
    frame_id["value"] = "camera"
    since = time.monotonic()
    assert diagnostics.wait_for(lambda m: "measured robot position is" in m.status[0].message, since=since,
                                timeout=10.0), process.output()[-3000:]
    assert "measured pose is in frame 'camera'" in process.output()


def test_two_cameras_feed_one_inference_and_either_one_going_stale_holds(harness, tmp_path):
    RouterStats = load_router_stats_type()
    cameras = ["/cam/front", "/cam/wrist"]
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, state_dim=0, camera_names=cameras)
    stats = harness.ros.record(RouterStats, "/policy_node/router_stats", RELIABLE)
    twists = harness.ros.record(TwistStamped, "/action", RELIABLE)
    diagnostics = harness.ros.record(DiagnosticArray, "/diagnostics", RELIABLE)
    sent = {camera: [] for camera in cameras}

    def frame(camera: str, seed: int):
        def make():
            msg = image_msg(random_frame(seed), stamp=harness.node.get_clock().now().to_msg())
            sent[camera].append(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
            return msg
        return make

    front = harness.stream(Image, cameras[0], frame(cameras[0], 1), 12.0)
    wrist = harness.stream(Image, cameras[1], frame(cameras[1], 2), 9.0)
    harness.command("/instruction", "push the puck to the goal")
    process = harness.start(weights, **{"topics.cameras": cameras, "state.enabled": False,
                                        "watchdog.max_image_age_s": AGE, "action.scale": TWIST_SCALE,
                                        "enable_output": True})
    front.resume()
    wrist.resume()
    found = stats.wait_for(count=5, timeout=40.0)
    assert found, process.output()[-3000:]
    for msg in found:
        stamps = [s.sec * 1_000_000_000 + s.nanosec for s in msg.source_stamps]
        assert len(stamps) == 2 and stamps[0] == msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert stamps[0] in sent[cameras[0]] and stamps[1] in sent[cameras[1]]
    assert twists.wait_for(lambda m: m.twist.linear.x != 0 or m.twist.linear.z != 0, timeout=20.0)
    wrist.pause()  # the front camera keeps streaming
    paused_at = time.monotonic()
    held = twists.wait_for(since=paused_at + AGE + 0.3, count=5, timeout=10.0)
    assert held and all((m.twist.linear.x, m.twist.linear.y, m.twist.linear.z) == (0, 0, 0) for m in held)
    assert diagnostics.wait_for(lambda m: "camera /cam/wrist is" in m.status[0].message, since=paused_at,
                                timeout=8.0)
    wrist.resume()
    assert twists.wait_for(lambda m: m.twist.linear.x != 0 or m.twist.linear.z != 0, since=time.monotonic(),
                           timeout=20.0), process.output()[-3000:]
