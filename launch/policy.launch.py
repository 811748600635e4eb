"""Launch the ActDistill policy node.

    ros2 launch actdistill_ros policy.launch.py weights:=<weights dir> \
        [camera_topics:=/cam/scene,/cam/wrist] [camera_transports:=raw,compressed] command_topic:=/instruction \
        device:=auto [threshold:=0.5] [enable_output:=true] [lifecycle:=true [autostart:=true]]

Safe start: the node starts with output disabled (enable_output false): it infers and publishes
RouterStats, ActionChunk and diagnostics, and commands nothing, until `ros2 param set /policy_node
enable_output true` or a launch with enable_output:=true (the launch argument wins over an
enable_output in params_file). camera_topics lists the cameras in the order the policy takes them
(default: the card's camera_names, else /camera/image_raw); camera_transports gives each its
transport (raw: sensor_msgs/Image, compressed: CompressedImage), one per camera or one for all
(default raw). lifecycle:=true starts the managed node
(policy_lifecycle_node, same name and parameters): it waits unconfigured until `ros2 lifecycle set
/policy_node configure`, then `... activate`; autostart:=true has the launch do both (it does not
enable output). Every other parameter comes from params_file (default: the package's
config/policy.yaml). Without threshold (and without router.threshold in params_file) the node uses
the card's default_threshold, the value the student was distilled for.
Camera drivers that publish 640x480 or larger raw images must run with the Fast DDS profile
config/fastdds_large_images.xml in THEIR environment (FASTRTPS_DEFAULT_PROFILES_FILE, and
FASTDDS_DEFAULT_PROFILES_FILE on newer distros); Fast DDS's default 512 KiB shared-memory
segment is smaller than one frame, so most frames are lost without it. It is set here for the
policy node too, which does no harm.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable)
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from actdistill_ros.ros.launch_arguments import (boolean_argument, camera_topics, camera_transports,
                                                 lifecycle_autostart, policy_executable, threshold_override)


def _policy_node(context):
    value = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    weights = value("weights")
    cameras = camera_topics(value("camera_topics"), weights)
    overrides = {
        "weights_path": weights,
        "topics.cameras": cameras,
        "camera.transports": camera_transports(value("camera_transports"), cameras),
        "topics.command": value("command_topic"),
        "device": value("device"),
        # Safe start: false unless asked for (the node logs how to switch it on).
        "enable_output": boolean_argument("enable_output", value("enable_output")),
    }
    # Only when given: it overrides the card's default_threshold.
    overrides.update(threshold_override(value("threshold")))
    executable = policy_executable(value("lifecycle"))
    autostart = lifecycle_autostart(value("lifecycle"), value("autostart"))
    node = (LifecycleNode if executable == "policy_lifecycle_node" else Node)(
        package="actdistill_ros",
        executable=executable,
        name="policy_node",
        namespace="",
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), overrides],
        # Topics can also be remapped here, e.g. [("/action", "/servo_node/delta_twist_cmds")].
        remappings=[],
    )
    if not autostart:
        return [node]
    # configure now, activate once configured; once only, so a later deactivate (or cleanup and
    # configure) by hand is not undone.
    activate = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, start_state="configuring", goal_state="inactive", handle_once=True,
        entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                              transition_id=Transition.TRANSITION_ACTIVATE))]))
    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                            transition_id=Transition.TRANSITION_CONFIGURE))
    return [activate, node, configure]


def generate_launch_description():
    share = get_package_share_directory("actdistill_ros")
    fastdds_profile = os.path.join(share, "config", "fastdds_large_images.xml")
    arguments = [
        DeclareLaunchArgument("weights", description="weights directory (model.safetensors + card.json)"),
        DeclareLaunchArgument("camera_topics", default_value="",
                              description="camera topics separated by commas, in the policy's camera order "
                                          "(sensor_msgs/Image or CompressedImage, see camera_transports); empty: "
                                          "the card's camera_names, else /camera/image_raw"),
        DeclareLaunchArgument("camera_transports", default_value="",
                              description="raw (sensor_msgs/Image) or compressed (CompressedImage), one per camera "
                                          "separated by commas, or one for all; empty: raw for every camera"),
        DeclareLaunchArgument("command_topic", default_value="/instruction",
                              description="instruction topic (std_msgs/String)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("threshold", default_value="",
                              description="router threshold in [0, 1]; empty: the card's default_threshold"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "policy.yaml"),
                              description="YAML with the remaining policy_node parameters"),
        DeclareLaunchArgument("enable_output", default_value="false",
                              description="true: the node commands the robot from the start; false (safe start): "
                                          "it infers and publishes ActionChunk and RouterStats, no commands, until "
                                          "ros2 param set /policy_node enable_output true"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: the managed node policy_lifecycle_node (configure and activate "
                                          "it with ros2 lifecycle set); false: policy_node, active at start-up"),
        DeclareLaunchArgument("autostart", default_value="false",
                              description="with lifecycle:=true: true has the launch configure and activate the "
                                          "node (output still as enable_output says); false: it waits unconfigured"),
    ]
    return LaunchDescription([
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", fastdds_profile),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", fastdds_profile),
        *arguments,
        OpaqueFunction(function=_policy_node),
    ])
