"""Stand-ins for a camera driver and a command publisher, as processes the fault tests kill and restart.

    python test/fault_publishers.py camera --seed S --rate HZ [--width W --height H]
    python test/fault_publishers.py command --text TEXT --durability latched|volatile

Run with the ROS environment of the node under test (ros_harness.node_environment). Each prints
``published <system time>`` (flushed) once its first message is out, then publishes on (camera: a
fresh seeded random rgb8 frame per message, stamped with the system clock) or stays alive holding
its latched sample (command) until it is killed. A volatile command is published once the node's
subscription has matched, three times 0.1 s apart (the node ignores a repeated instruction).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

MATCH_TIMEOUT_S = 30.0


def _stamp():
    from builtin_interfaces.msg import Time
    ns = time.time_ns()
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _announce(t: float) -> None:
    print(f"published {t!r}", flush=True)


def run_camera(node, args) -> None:
    from sensor_msgs.msg import Image

    from actdistill_ros.ros.node_common import SENSOR_QOS

    publisher = node.create_publisher(Image, args.topic or "/camera/image_raw", SENSOR_QOS)
    rng = np.random.default_rng(args.seed)
    period = 1.0 / args.rate
    next_time = time.monotonic()
    first = True
    while True:
        msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
        msg.header.frame_id = "camera"
        msg.data = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes()
        sent = time.time()
        msg.header.stamp = _stamp()
        publisher.publish(msg)
        if first:
            _announce(sent)
            first = False
        next_time += period
        time.sleep(max(0.0, next_time - time.monotonic()))


def run_command(node, args) -> None:
    from std_msgs.msg import String

    from actdistill_ros.ros.node_common import ACTION_QOS, LATCHED_QOS

    # ACTION_QOS: reliable, volatile, depth 1 - what a plain `ros2 topic pub` of a String gives.
    qos = LATCHED_QOS if args.durability == "latched" else ACTION_QOS
    publisher = node.create_publisher(String, args.topic or "/instruction", qos)
    if args.durability == "volatile":
        deadline = time.monotonic() + MATCH_TIMEOUT_S
        while publisher.get_subscription_count() < 1:  # a volatile sample reaches matched readers only
            if time.monotonic() > deadline:
                sys.exit(f"no subscriber matched {publisher.topic_name} within {MATCH_TIMEOUT_S:g} s")
            time.sleep(0.02)
        time.sleep(0.2)  # the reader's side of the match completes a little after the writer's
    sent = time.time()
    for _ in range(1 if args.durability == "latched" else 3):
        publisher.publish(String(data=args.text))
        time.sleep(0.1)
    _announce(sent)
    while True:
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    camera = sub.add_parser("camera")
    camera.add_argument("--seed", type=int, required=True)
    camera.add_argument("--rate", type=float, default=15.0)
    camera.add_argument("--width", type=int, default=128)
    camera.add_argument("--height", type=int, default=96)
    camera.add_argument("--topic")
    command = sub.add_parser("command")
    command.add_argument("--text", required=True)
    command.add_argument("--durability", choices=["latched", "volatile"], required=True)
    command.add_argument("--topic")
    args = parser.parse_args()

    import rclpy

    rclpy.init()
    node = rclpy.create_node(f"fault_{args.kind}")
    try:
        (run_camera if args.kind == "camera" else run_command)(node, args)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
