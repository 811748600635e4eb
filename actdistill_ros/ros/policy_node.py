"""ROS 2 node running an ActDistill policy: cameras + command (+ robot state) in, actions out.

A plain node that configures and activates itself at start-up; its twin policy_lifecycle_node
is a managed node. Both are ``PolicyCore`` (actdistill_ros/ros/policy/core.py) on an rclpy node,
and what they may command is decided by actdistill_ros.control. Output starts disabled
(``enable_output: false``): ``ros2 param set /policy_node enable_output true`` moves the arm.

Run:  python -m actdistill_ros.ros.policy_node --ros-args --params-file config/policy.yaml \
          -p weights_path:=<weights dir>
"""

from __future__ import annotations

import sys

from rclpy.node import Node

from actdistill_ros.ros.node_common import run_node
from actdistill_ros.ros.policy.core import NODE_NAME, PolicyCore


class PolicyNode(Node):
    """The policy node that configures and activates itself at start-up (``policy_node``)."""

    def __init__(self, node_name: str = NODE_NAME):
        super().__init__(node_name)
        self.core = PolicyCore(self)
        self.core.configure()

    def start(self) -> None:
        self.core.activate()

    def stop(self) -> None:
        self.core.stop()

    def failure(self) -> str | None:
        return self.core.failure()


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
