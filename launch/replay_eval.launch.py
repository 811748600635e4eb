"""Replay evaluation with `ros2 bag play` as the player (machines that have the ros2 CLI).

    ros2 launch actdistill_ros replay_eval.launch.py bag:=<bag dir> weights:=<weights dir> \
        out:=<report dir> [camera_topics:=/cam/scene,/cam/wrist] rate:=1.0

Starts policy_node as a dry run (enable_output: false: a replay never commands a robot), then
replay_eval in --listen-only mode attached to it: it publishes nothing, records the node's
ActionChunk and RouterStats, compares each chunk with the bag's recorded action at that frame
and writes the report (JSON, Markdown, PNGs) when the bag is over. After `play_delay` seconds,
when the node has loaded its weights, `ros2 bag play` publishes the bag; the launch ends when
replay_eval has written its report. One Ctrl-C stops all three (replay_eval then exits cleanly
and writes no report).

`ros2 bag play` plays only what the policy takes (--topics): the cameras, the command and, when
the card has a state (state_dim > 0), the state topic. Never the recorded actions (action_topic,
read from the bag by replay_eval only) nor anything else recorded. The played topics still reach
every subscriber on this ROS_DOMAIN_ID: on a live system, replay on a domain of its own
(ROS_DOMAIN_ID=...) so that no other node takes the bag's frames or state for the robot's.

camera_topics lists the cameras in the order the policy takes them (default: the card's
camera_names, else /camera/image_raw); the bag's camera topics must be the node's, and their
header stamps non-zero (the first camera's stamp ties a chunk to its frame set). Each camera's
transport (raw sensor_msgs/Image or CompressedImage) comes from its message type in the bag, so a
bag with a compressed and a raw camera replays. Camera-to-action latency is measured from
replay_eval's own receipt of each first-camera message.

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

from actdistill_ros.ros.launch_arguments import (bag_camera_transports, bag_play_command, camera_topics,
                                                 card_state_dim, policy_input_topics, replay_eval_arguments,
                                                 replay_node_parameters)

NODE_NAME = "policy_node"


def _replay(context):
    """The node, replay_eval and the player, for the cameras the launch arguments name."""
    value = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    bag, weights = value("bag"), value("weights")
    cameras = camera_topics(value("camera_topics"), weights)
    command_topic, state_topic = value("command_topic"), value("state_topic")
    policy_node = Node(
        package="actdistill_ros",
        executable="policy_node",
        name=NODE_NAME,
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            replay_node_parameters(weights, value("device"), cameras, bag_camera_transports(bag, cameras),
                                   command_topic, state_topic),
        ],
    )
    # A Node, not `ros2 run`: launch's SIGINT on Ctrl-C reaches replay_eval itself (ros2 run does not
    # pass it on, so replay_eval outlived the launch).
    replay_eval = Node(
        package="actdistill_ros",
        executable="replay_eval",
        output="screen",
        arguments=replay_eval_arguments(bag, weights, value("out"), cameras, command_topic, state_topic,
                                        value("action_topic"), NODE_NAME),
    )
    bag_play = ExecuteProcess(
        cmd=bag_play_command(bag, value("rate"),
                             policy_input_topics(cameras, command_topic, state_topic, card_state_dim(weights))),
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
                                          "policy's order (each camera's transport comes from its type in the "
                                          "bag); empty: the card's camera_names, else /camera/image_raw"),
        DeclareLaunchArgument("command_topic", default_value="/instruction",
                              description="instruction topic in the bag and of the node (std_msgs/String)"),
        DeclareLaunchArgument("state_topic", default_value="/joint_states",
                              description="robot state topic in the bag and of the node (sensor_msgs/JointState); "
                                          "played only when the policy takes a state"),
        DeclareLaunchArgument("action_topic", default_value="/action",
                              description="recorded action topic in the bag (compared with, never played)"),
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
