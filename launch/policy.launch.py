"""Launch the ActDistill policy node.

    ros2 launch actdistill_ros policy.launch.py weights:=<weights dir> \
        [camera_topics:=/cam/scene,/cam/wrist] command_topic:=/instruction device:=auto [threshold:=0.5] \
        [lifecycle:=true]

camera_topics lists the cameras in the order the policy takes them (default: the card's
camera_names, else /camera/image_raw). lifecycle:=true starts the managed node
(policy_lifecycle_node, same name and parameters): it waits unconfigured until
`ros2 lifecycle set /policy_node configure`, then `... activate`.
Every other parameter comes from params_file (default: the package's config/policy.yaml).
Without threshold (and without router.threshold in params_file) the node uses the card's
default_threshold, the value the student was distilled for.
Camera drivers that publish 640x480 or larger raw images must run with the Fast DDS profile
config/fastdds_large_images.xml in THEIR environment (FASTRTPS_DEFAULT_PROFILES_FILE, and
FASTDDS_DEFAULT_PROFILES_FILE on newer distros); Fast DDS's default 512 KiB shared-memory
segment is smaller than one frame, so most frames are lost without it. It is set here for the
policy node too, which does no harm.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from actdistill_ros.ros.launch_arguments import camera_topics, policy_executable, threshold_override


def _policy_node(context):
    weights = LaunchConfiguration("weights").perform(context)
    overrides = {
        "weights_path": weights,
        "topics.cameras": camera_topics(LaunchConfiguration("camera_topics").perform(context), weights),
        "topics.command": LaunchConfiguration("command_topic").perform(context),
        "device": LaunchConfiguration("device").perform(context),
    }
    # Only when given: it overrides the card's default_threshold.
    overrides.update(threshold_override(LaunchConfiguration("threshold").perform(context)))
    return [Node(
        package="actdistill_ros",
        executable=policy_executable(LaunchConfiguration("lifecycle").perform(context)),
        name="policy_node",
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), overrides],
        # Topics can also be remapped here, e.g. [("/action", "/servo_node/delta_twist_cmds")].
        remappings=[],
    )]


def generate_launch_description():
    share = get_package_share_directory("actdistill_ros")
    fastdds_profile = os.path.join(share, "config", "fastdds_large_images.xml")
    arguments = [
        DeclareLaunchArgument("weights", description="weights directory (model.safetensors + card.json)"),
        DeclareLaunchArgument("camera_topics", default_value="",
                              description="camera topics separated by commas, in the policy's camera order "
                                          "(sensor_msgs/Image, or CompressedImage with camera.transport: "
                                          "compressed in params_file); empty: the card's camera_names, else "
                                          "/camera/image_raw"),
        DeclareLaunchArgument("command_topic", default_value="/instruction",
                              description="instruction topic (std_msgs/String)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("threshold", default_value="",
                              description="router threshold in [0, 1]; empty: the card's default_threshold"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "policy.yaml"),
                              description="YAML with the remaining policy_node parameters"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: the managed node policy_lifecycle_node (configure and activate "
                                          "it with ros2 lifecycle set); false: policy_node, active at start-up"),
    ]
    return LaunchDescription([
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", fastdds_profile),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", fastdds_profile),
        *arguments,
        OpaqueFunction(function=_policy_node),
    ])
