"""sim_arm_node as a real process over Fast DDS (loopback): Meta-World as a ROS 2 arm.

Real time: camera, joint state and instruction at the configured rate; twists move the hand in
the commanded direction, and without fresh twists it stops. Lockstep: ~/reset with a seed
replays the same first frame; the episode status and parameters behave as documented.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import time

import numpy as np
import pytest

if importlib.util.find_spec("metaworld") is None:
    pytest.skip("simulator extra not installed (requirements-sim.txt)", allow_module_level=True)
from ros_harness import require_rclpy  # noqa: E402

rclpy = require_rclpy()

from geometry_msgs.msg import TwistStamped  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Float64, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from param_yaml import yaml_parameter_names  # noqa: E402
from ros_harness import (REPO_ROOT, NodeProcess, RosSide, _param_arg, node_environment, reserve_domain,  # noqa: E402
                         wait_until)

from actdistill_ros.ros.env import config_file  # noqa: E402
from actdistill_ros.sim.metaworld_env import STATE_NAMES, instruction_for  # noqa: E402

NODE = "sim_arm_node"
SIM_YAML = config_file("sim_arm.yaml")
SENSOR = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
TWIST_SCALE = 0.1  # config/sim_arm.yaml, equal to config/policy.yaml
SIZE = 48


def start_sim_node(domain: int, work_dir, params: dict) -> NodeProcess:
    argv = [sys.executable, "-m", "actdistill_ros.ros.sim_arm_node", "--ros-args", "--params-file", str(SIM_YAML)]
    for name, value in params.items():
        argv += ["-p", f"{name}:={_param_arg(value) if value != '' else repr('')}"]  # '' parses as YAML
    env = node_environment(domain, work_dir / "ros_log")
    env["MUJOCO_GL"] = "egl"
    return NodeProcess(argv, env, work_dir)


def _launch_parameter_names(node_name: str) -> set[str]:
    """Keys of the parameter dicts given to ``node_name`` in launch/sim_arm.launch.py (read with ast)."""
    tree = ast.parse((REPO_ROOT / "launch" / "sim_arm.launch.py").read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Node":
            keywords = {k.arg: k.value for k in call.keywords}
            if ast.literal_eval(keywords["name"]) == node_name:
                dicts = [e for e in keywords["parameters"].elts if isinstance(e, ast.Dict)]
                return {ast.literal_eval(key) for d in dicts for key in d.keys}
    raise AssertionError(f"no Node named {node_name} in the launch file")


def twist(dx: float, dy: float, dz: float) -> TwistStamped:
    msg = TwistStamped()
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = dx * TWIST_SCALE, dy * TWIST_SCALE, dz * TWIST_SCALE
    return msg


def hand(msg: JointState) -> np.ndarray:
    return np.asarray(msg.position[:3])


def test_realtime_publishes_at_rate_and_twists_move_the_hand(tmp_path):
    rate_hz = 20.0
    domain = reserve_domain()
    ros = RosSide(domain)
    images = ros.record(Image, "/camera/image_raw", SENSOR)
    states = ros.record(JointState, "/joint_states", SENSOR)
    commands = ros.record(String, "/instruction", LATCHED)
    statuses = ros.record(String, f"/{NODE}/episode", LATCHED)
    twist_pub = ros.node.create_publisher(TwistStamped, "/action", RELIABLE)
    gripper_pub = ros.node.create_publisher(Float64, "/gripper/command", RELIABLE)
    process = start_sim_node(domain, tmp_path / "node", {
        "task": "reach", "seed": 10002, "image_size": SIZE, "horizon": 100_000, "control_rate_hz": rate_hz,
        "sync_mode": False, "action_timeout_s": 0.3})
    try:
        assert images.wait_for(count=5, timeout=60.0), process.output()[-3000:]
        # Rate: camera and state once per step.
        since = time.monotonic()
        time.sleep(3.0)
        image_rate = len(images.messages(since)) / 3.0
        state_rate = len(states.messages(since)) / 3.0
        assert 0.7 * rate_hz <= image_rate <= 1.15 * rate_hz, image_rate
        assert 0.7 * rate_hz <= state_rate <= 1.15 * rate_hz, state_rate
        image = images.messages()[-1]
        assert (image.height, image.width, image.encoding, image.step) == (SIZE, SIZE, "rgb8", SIZE * 3)
        assert image.header.frame_id == "camera" and len(image.data) == SIZE * SIZE * 3
        assert np.frombuffer(image.data, np.uint8).std() > 10  # a real render
        now_ns = ros.node.get_clock().now().nanoseconds
        stamp_ns = image.header.stamp.sec * 10**9 + image.header.stamp.nanosec
        assert abs(now_ns - stamp_ns) < 2e9  # stamped with ROS time now
        assert list(states.messages()[-1].name) == list(STATE_NAMES)
        # The instruction is latched: this late subscriber still got it.
        assert commands.wait_for(timeout=5.0)[-1].data == instruction_for("reach")
        status = json.loads(statuses.wait_for(timeout=5.0)[-1].data)
        assert (status["task"], status["seed"], status["state"], status["done"]) == ("reach", 10002, "running", False)

        # No action yet: zero motion.
        still = hand(states.messages()[-1])
        time.sleep(0.5)
        assert np.allclose(hand(states.messages()[-1]), still, atol=2e-3)

        def drive(direction, seconds=1.0):
            start = hand(states.messages()[-1])
            end_time = time.monotonic() + seconds
            while time.monotonic() < end_time:
                twist_pub.publish(twist(*direction))
                gripper_pub.publish(Float64(data=-1.0))
                time.sleep(1.0 / rate_hz)
            time.sleep(0.2)
            return hand(states.messages()[-1]) - start

        moved = drive((1.0, 0.0, 0.0))
        assert moved[0] > 0.03 and abs(moved[0]) > 3 * max(abs(moved[1]), abs(moved[2])), moved
        moved = drive((0.0, 0.0, -1.0))
        assert moved[2] < -0.03 and abs(moved[2]) > 3 * max(abs(moved[0]), abs(moved[1])), moved
        # A bad message is dropped and the node keeps going.
        twist_pub.publish(twist(float("nan"), 0.0, 0.0))
        assert wait_until(lambda: "dropped bad twist message" in process.output(), 5.0), process.output()[-2000:]
        moved = drive((0.0, 1.0, 0.0))
        assert moved[1] > 0.03, moved
        # Twists stop: after action_timeout_s the hand's target stays put; the hand itself only
        # creeps the last millimetres after it (it trails its mocap target, and at 20 Hz real
        # time a sim second takes 4 s), far from the ~1 cm per step it moved while driven.
        time.sleep(2.5)
        held = hand(states.messages()[-1])
        time.sleep(0.5)
        drift = np.abs(hand(states.messages()[-1]) - held)
        assert drift.max() < 5e-3 and drift.max() < 0.1 * np.abs(moved).max(), (drift, moved)
        assert process.alive()
    finally:
        code = process.stop()
        ros.close()
    assert code == 0, process.output()[-3000:]


def test_lockstep_reset_with_a_seed_replays_the_first_frame(tmp_path):
    domain = reserve_domain()
    ros = RosSide(domain)
    images = ros.record(Image, "/camera/image_raw", SENSOR)
    commands = ros.record(String, "/instruction", LATCHED)
    statuses = ros.record(String, f"/{NODE}/episode", LATCHED)
    twist_pub = ros.node.create_publisher(TwistStamped, "/action", RELIABLE)
    gripper_pub = ros.node.create_publisher(Float64, "/gripper/command", RELIABLE)
    # No policy here: lockstep steps on each twist (topics.router_stats empty) and re-sends the
    # current frame after sync.timeout_s.
    process = start_sim_node(domain, tmp_path / "node", {
        "task": "reach", "image_size": SIZE, "horizon": 6, "sync_mode": True, "sync.timeout_s": 0.3,
        "episode.start_on_launch": False, "topics.router_stats": ""})

    def reset(seed: int, task: str = "reach") -> tuple[np.ndarray, dict]:
        results = ros.set_parameters(NODE, {"seed": seed, "task": task})
        assert all(r.successful for r in results), [r.reason for r in results]
        since = time.monotonic()
        response = ros.call(Trigger, f"/{NODE}/reset", Trigger.Request(), timeout=60.0)
        assert response.success, response.message
        info = json.loads(response.message)
        assert (info["seed"], info["task"]) == (seed, task)
        frame = images.wait_for(since=since, timeout=10.0)[0]
        return np.frombuffer(frame.data, np.uint8).reshape(SIZE, SIZE, 3).copy(), info

    def run_to_end(info: dict, max_steps: int = 40) -> dict:
        """Step the arm to the end of the episode: each twist answers the current frame, one step."""
        def ended(m) -> bool:
            return json.loads(m.data)["episode"] == info["episode"] and json.loads(m.data)["done"]

        for _ in range(max_steps):
            if statuses.wait_for(ended, timeout=0.01):
                break
            count = len(images.messages())
            twist_pub.publish(twist(0.0, 1.0, 1.0))
            gripper_pub.publish(Float64(data=1.0))
            images.wait_for(count=count + 1, timeout=2.0)
        done = statuses.wait_for(ended, timeout=5.0)
        assert done, process.output()[-3000:]
        return json.loads(done[-1].data)

    try:
        client = ros.node.create_client(Trigger, f"/{NODE}/reset")
        assert wait_until(lambda: client.wait_for_service(timeout_sec=0.2) or not process.alive(), 60.0)
        assert process.alive(), process.output()[-3000:]
        first, info = reset(10005)
        final = run_to_end(info)
        assert (final["seed"], final["steps"], final["success"], final["state"]) == (10005, 6, False, "failure")
        assert len(final["action_wait_ms"]) == 6 and len(final["hand_state"]) == 4

        other, _ = reset(10006)
        again, _ = reset(10005)
        assert np.array_equal(first, again)
        assert not np.array_equal(first, other)
        # Unanswered in lockstep: the frame is sent again, the sim does not step.
        count = len(images.messages())
        time.sleep(1.0)
        assert len(images.messages()) >= count + 2

        # Task changes apply at reset and update the latched instruction; bad names are refused.
        bad = ros.set_parameters(NODE, {"task": "fly-to-the-moon"})[0]
        assert not bad.successful and "unknown Meta-World task" in bad.reason
        reset(10005, task="push")
        assert commands.wait_for(lambda m: m.data == instruction_for("push"), timeout=10.0)
        # A horizon above the one the node started with (6) applies at the next reset: the episode
        # runs past the old limit (Meta-World's own max_path_length follows it).
        assert ros.set_parameters(NODE, {"horizon": 9})[0].successful
        _, info = reset(10007, task="push")
        assert info["horizon"] == 9
        final = run_to_end(info)
        assert (final["steps"], final["horizon"], final["state"]) == (9, 9, "failure"), final
        assert process.alive(), process.output()[-3000:]
        # Every parameter is documented.
        from rcl_interfaces.srv import DescribeParameters
        names = ros.list_parameters(NODE)
        names = [n for n in names if n not in ("use_sim_time", "start_type_description_service")]  # rclpy's own
        described = ros.call(DescribeParameters, f"/{NODE}/describe_parameters",
                             DescribeParameters.Request(names=names)).descriptors
        assert len(names) >= 18 and all(d.description for d in described)
        ranged = {d.name for d in described if d.integer_range or d.floating_point_range}
        assert {"seed", "horizon", "image_size", "control_rate_hz", "action.linear_scale"} <= ranged
        # config/sim_arm.yaml sets exactly the declared parameters; the launch file only declared ones.
        assert sorted(yaml_parameter_names(SIM_YAML)) == sorted(names)
        assert _launch_parameter_names("sim_arm_node") <= set(names)
        assert process.alive()
    finally:
        code = process.stop()
        ros.close()
    assert code == 0, process.output()[-3000:]


def test_start_up_error_is_one_line(tmp_path):
    process = start_sim_node(reserve_domain(), tmp_path / "node", {"task": "juggle"})
    code = process.wait(timeout=60)
    lines = [line for line in process.output().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and "unknown Meta-World task 'juggle'" in lines[0] and "FATAL" in lines[0], lines
