"""The policy node as a ROS 2 managed (lifecycle) node: same name, parameters and topics as
policy_node, driven through the lifecycle_msgs services that `ros2 lifecycle set` calls.

    unconfigured --configure--> inactive --activate--> active
    configure:  load weights_path, warm up, create topics and timers
    activate:   start inferring and commanding (motion ramps from the measured state, on fresh inputs)
    deactivate: publish an explicit stop now, then stop inferring (command publishers go silent)
    cleanup:    free the model and the topics; weights_path may be changed now, then configure again

The emergency stop (std_msgs/Bool on topics.emergency_stop, std_srvs/SetBool ~/emergency_stop)
is served in every state, and its latch survives reconfiguration.

Run:  python -m actdistill_ros.ros.policy_lifecycle_node --ros-args --params-file config/policy.yaml \
          -p weights_path:=<weights dir>
      ros2 lifecycle set /policy_node configure && ros2 lifecycle set /policy_node activate
"""

from __future__ import annotations

import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from actdistill_ros.ros.node_common import StartupError, run_node
from actdistill_ros.ros.policy.core import NODE_NAME, PolicyCore


class PolicyLifecycleNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME):
        super().__init__(node_name)
        self.core = PolicyCore(self, lifecycle=True)

    # Transition callbacks: rclpy turns an exception into ERROR without a word, so each one logs
    # its reason in one line and returns FAILURE (the state does not change).
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.core.configure()
        except StartupError as err:
            self.get_logger().error(f"configure failed: {err}")
            return TransitionCallbackReturn.FAILURE
        except Exception as err:  # noqa: BLE001 - reported, the node stays unconfigured
            self.get_logger().error(f"configure failed: {type(err).__name__}: {err}")
            return TransitionCallbackReturn.FAILURE
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the command publishers first
        if result == TransitionCallbackReturn.SUCCESS:
            self.core.activate()
            self.get_logger().info("active: commanding motion")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.deactivate()  # the stop goes out while the publishers are still enabled
        self.get_logger().info("inactive: stop commanded, no further commands")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.cleanup()
        self.get_logger().info("unconfigured: model freed")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.stop()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.core.stop()
        return super().on_error(state)

    # RunnableNode (node_common.run_node): a managed node starts unconfigured and waits.
    def start(self) -> None:
        self.get_logger().info("unconfigured: waiting for the configure transition (ros2 lifecycle set "
                               f"{self.get_fully_qualified_name()} configure)")

    def stop(self) -> None:
        self.core.stop()

    def failure(self) -> str | None:
        return self.core.failure()


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyLifecycleNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
