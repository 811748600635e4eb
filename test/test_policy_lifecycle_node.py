"""policy_lifecycle_node as a real process, driven through the lifecycle_msgs services exactly as
`ros2 lifecycle set /policy_node <transition>` does (GetAvailableTransitions, then ChangeState with
the transition's id and label), including a weights reload without restarting the process."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ros_harness import (RosSide, Streamer, image_msg, load_router_stats_type, require_rclpy, reserve_domain,
                         start_policy_node)

rclpy = require_rclpy()
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetAvailableTransitions, GetState  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from actdistill_ros.policy import create_untrained_policy  # noqa: E402

NODE = "policy_node"
MODULE = "actdistill_ros.ros.policy_lifecycle_node"
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
SENSOR = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


def lifecycle_state(ros: RosSide) -> str:
    return ros.call(GetState, f"/{NODE}/get_state", GetState.Request(), timeout=30.0).current_state.label


def lifecycle_set(ros: RosSide, label: str) -> bool:
    """What `ros2 lifecycle set /policy_node <label>` does."""
    available = ros.call(GetAvailableTransitions, f"/{NODE}/get_available_transitions",
                         GetAvailableTransitions.Request(), timeout=30.0).available_transitions
    matches = [t.transition for t in available if t.transition.label == label]
    assert matches, f"transition {label} not available now ({[t.transition.label for t in available]})"
    request = ChangeState.Request(transition=Transition(id=matches[0].id, label=matches[0].label))
    return ros.call(ChangeState, f"/{NODE}/change_state", request, timeout=120.0).success


def moving(msg: TwistStamped) -> bool:
    return any(v != 0.0 for v in (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z))


def student_weights(path, default_threshold: float, seed: int):
    weights = create_untrained_policy(path, size="tiny", student=True, keep=0.5, seed=seed)
    card = json.loads((weights / "card.json").read_text())
    card["default_threshold"] = default_threshold
    (weights / "card.json").write_text(json.dumps(card))
    return weights


def test_lifecycle_transitions_reload_weights_and_keep_the_emergency_stop(tmp_path):
    RouterStats = load_router_stats_type()
    first = student_weights(tmp_path / "first", 0.6, seed=0)
    second = student_weights(tmp_path / "second", 0.3, seed=1)
    domain = reserve_domain()
    ros = RosSide(domain)
    node = ros.node
    twists = ros.record(TwistStamped, "/action", RELIABLE)
    stats = ros.record(RouterStats, f"/{NODE}/router_stats", RELIABLE)
    node.create_publisher(String, "/instruction", LATCHED).publish(String(data="push the puck to the goal"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    camera = Streamer(node.create_publisher(Image, "/camera/image_raw", SENSOR), lambda: image_msg(
        frames[int(time.monotonic() * 10) % 4], stamp=node.get_clock().now().to_msg()), 12.0)
    state = Streamer(node.create_publisher(JointState, "/joint_states", SENSOR), lambda: JointState(
        name=["hand_x", "hand_y", "hand_z", "gripper_opening"], position=[0.0, 0.6, 0.2, 1.0]), 12.0)
    process = start_policy_node(first, domain, tmp_path / "node", module=MODULE,
                                params={"control_rate_hz": 20.0, "watchdog.max_image_age_s": 0.4,
                                        "action.scale": [0.1, 0.1, 0.1, 1.0], "enable_output": True})
    try:
        camera.resume()
        state.resume()
        assert lifecycle_state(ros) == "unconfigured", process.output()[-3000:]
        assert "router.threshold" not in ros.list_parameters(NODE)  # comes with the card at configure

        # configure: weights loaded and warmed up, nothing published while inactive.
        assert lifecycle_set(ros, "configure"), process.output()[-3000:]
        assert lifecycle_state(ros) == "inactive"
        assert "warm-up inference" in process.output()
        assert ros.get_parameters(NODE, ["router.threshold"]) == {"router.threshold": 0.6}
        time.sleep(1.5)
        assert not twists.messages() and not stats.messages(), "an inactive node must not infer or command"

        # activate: motion.
        assert lifecycle_set(ros, "activate")
        assert lifecycle_state(ros) == "active"
        assert twists.wait_for(moving, timeout=20.0), process.output()[-3000:]
        assert stats.wait_for(lambda m: m.threshold == pytest.approx(0.6), timeout=10.0)

        # deactivate while moving: one explicit stop, then silence.
        deactivating = time.monotonic()
        assert lifecycle_set(ros, "deactivate")
        deactivated = time.monotonic()  # the stop went out inside the transition, before the reply
        time.sleep(1.5)
        after = twists.messages(deactivating)
        assert after and not moving(after[-1]), "deactivate must publish a stop"
        assert not twists.messages(deactivated + 0.2), "nothing may be commanded while inactive"
        assert lifecycle_state(ros) == "inactive"
        refused, = ros.set_parameters(NODE, {"weights_path": str(second)})
        assert not refused.successful and "cleanup" in refused.reason

        # cleanup, a bad path refused at configure (still unconfigured), then the second weights.
        assert lifecycle_set(ros, "cleanup")
        assert lifecycle_state(ros) == "unconfigured"
        assert "router.threshold" not in ros.list_parameters(NODE)
        assert ros.set_parameters(NODE, {"weights_path": str(tmp_path / "nowhere")})[0].successful
        assert not lifecycle_set(ros, "configure")
        assert lifecycle_state(ros) == "unconfigured"
        assert "configure failed: cannot load weights" in process.output()
        assert ros.set_parameters(NODE, {"weights_path": str(second)})[0].successful
        assert lifecycle_set(ros, "configure"), process.output()[-3000:]
        assert ros.get_parameters(NODE, ["router.threshold"]) == {"router.threshold": 0.3}  # the new card's

        # The emergency stop engaged while inactive holds through activation, until released.
        response = ros.call(SetBool, f"/{NODE}/emergency_stop", SetBool.Request(data=True))
        assert response.success
        activating = time.monotonic()
        assert lifecycle_set(ros, "activate")
        time.sleep(1.5)
        latched = twists.messages(activating)
        assert len(latched) >= 5 and not any(moving(m) for m in latched), "motion while the e-stop is engaged"
        released = time.monotonic()
        assert ros.call(SetBool, f"/{NODE}/emergency_stop", SetBool.Request(data=False)).success
        assert twists.wait_for(moving, since=released, timeout=20.0), process.output()[-3000:]
        assert stats.wait_for(lambda m: m.threshold == pytest.approx(0.3), since=released, timeout=10.0)
        assert process.alive()
    finally:
        camera.close()
        state.close()
        code = process.stop()
        ros.close()
    assert code == 0, process.output()[-3000:]
