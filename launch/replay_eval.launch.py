"""Replay evaluation with `ros2 bag play` as the player (machines that have the ros2 CLI).

    ros2 launch actdistill_ros replay_eval.launch.py bag:=<bag dir> weights:=<weights dir> \
        out:=<report dir> [camera_topics:=/cam/scene,/cam/wrist] transport:=raw rate:=1.0

Starts policy_node as a dry run (enable_output: false: a replay never commands a robot), then
replay_eval in --listen-only mode attached to it: it publishes nothing, records the node's
ActionChunk and RouterStats, compares each chunk with the bag's recorded action at that frame
and writes the report (JSON, Markdown, PNGs) when the bag is over. After `play_delay` seconds,
when the node has loaded its weights, `ros2 bag play` publishes the bag; the launch ends when
replay_eval has written its report.

camera_topics lists the cameras in the order the policy takes them (default: the card's
camera_names, else /camera/image_raw); the bag's camera topics must be the node's (remap in ros2
bag play otherwise), and their header stamps non-zero (the first camera's stamp ties a chunk to
its frame set). Camera-to-action latency is then measured from replay_eval's own receipt of each
first-camera message.

Without the ros2 CLI, `actdistill replay-eval BAG --weights W` (or `ros2 run actdistill_ros
replay_eval ...`) does the same with its own player, and adds --rate max and --teacher.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable, TimerAction)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from actdistill_ros.ros.launch_arguments import camera_topic_flags, camera_topics

NODE_NAME = "policy_node"


def _replay(context):
    """The node, replay_eval and the player, for the cameras the launch arguments name."""
    weights = LaunchConfiguration("weights").perform(context)
    cameras = camera_topics(LaunchConfiguration("camera_topics").perform(context), weights)
    policy_node = Node(
        package="actdistill_ros",
        executable="policy_node",
        name=NODE_NAME,
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "weights_path": weights,
                "device": LaunchConfiguration("device"),
                "topics.cameras": cameras,
                "camera.transport": LaunchConfiguration("transport"),
                "enable_output": False,
            },
        ],
    )
    replay_eval = ExecuteProcess(
        cmd=["ros2", "run", "actdistill_ros", "replay_eval", LaunchConfiguration("bag"),
             "--weights", weights, "--out", LaunchConfiguration("out"),
             *camera_topic_flags(cameras), "--listen-only", "--attach", NODE_NAME],
        output="screen",
    )
    bag_play = ExecuteProcess(
        cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate")],
        output="screen",
    )
    return [
        policy_node,
        replay_eval,
        TimerAction(period=LaunchConfiguration("play_delay"), actions=[bag_play]),
        RegisterEventHandler(OnProcessExit(target_action=replay_eval, on_exit=[EmitEvent(event=Shutdown())])),
    ]


def generate_launch_description():
    share = get_package_share_directory("actdistill_ros")
    fastdds_profile = os.path.join(share, "config", "fastdds_large_images.xml")
    arguments = [
        DeclareLaunchArgument("bag", description="rosbag2 directory to play and evaluate"),
        DeclareLaunchArgument("weights", description="weights directory (model.safetensors + card.json)"),
        DeclareLaunchArgument("out", default_value="replay_eval_report",
                              description="report directory (must not exist yet)"),
        DeclareLaunchArgument("camera_topics", default_value="",
                              description="camera topics in the bag and of the node, comma-separated, in the "
                                          "policy's order; empty: the card's camera_names, else /camera/image_raw"),
        DeclareLaunchArgument("transport", default_value="raw",
                              description="raw (sensor_msgs/Image) or compressed (CompressedImage)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="ros2 bag play --rate"),
        DeclareLaunchArgument("play_delay", default_value="10.0",
                              description="seconds before ros2 bag play starts (node start-up)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "policy.yaml"),
                              description="YAML with the remaining policy_node parameters"),
    ]
    return LaunchDescription([
        # Set for every process here; the player (ros2 bag play) is the one that needs it.
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", fastdds_profile),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", fastdds_profile),
        *arguments,
        OpaqueFunction(function=_replay),
    ])
