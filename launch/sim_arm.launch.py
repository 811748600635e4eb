"""Launch a simulated Meta-World arm together with the ActDistill policy node driving it.

    ros2 launch actdistill_ros sim_arm.launch.py weights:=<weights dir> task:=push seed:=10000 \
        sync_mode:=false device:=auto [threshold:=0.5] [camera:=corner4,topview] [image_size:=128]

The arm (sim_arm_node) publishes camera, joint state and the task instruction and applies the
policy node's ee_twist output (TwistStamped + Float64 gripper). The policy node takes
config/policy.yaml, then config/sim_arm_policy.yaml (its action.scale turns Meta-World's normalized
units into m/s, as the arm's action.linear_scale in config/sim_arm.yaml turns them back). Its output
is enabled here (a simulated arm; policy.launch.py, for a real arm, starts with it off). Start the
next episode with the arm's ~/reset service (std_srvs/Trigger), or set episode.auto_reset.
Without threshold the policy node uses the card's default_threshold; without image_size the arm
renders at the card's image size (the shipped weights take 128 px). With several cameras the arm
publishes one topic per camera (sensor_msgs/Image) and the policy node subscribes to them in that
order. The Fast DDS profile for large camera images is set for both processes.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from actdistill_ros.ros.launch_arguments import image_size_argument, threshold_override
from actdistill_ros.sim.metaworld_env import camera_topics


def _nodes(context):
    """The simulated arm and the policy node (the arm's camera size comes from the weights' card)."""
    value = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    weights = value("weights")
    sim_arm_node = Node(
        package="actdistill_ros",
        executable="sim_arm_node",
        name="sim_arm_node",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("sim_params_file"),
            {
                "task": LaunchConfiguration("task"),
                "seed": ParameterValue(LaunchConfiguration("seed"), value_type=int),
                "image_size": image_size_argument(value("image_size"), weights),
                "camera": LaunchConfiguration("camera"),
                "sync_mode": ParameterValue(LaunchConfiguration("sync_mode"), value_type=bool),
                "episode.auto_reset": ParameterValue(LaunchConfiguration("auto_reset"), value_type=bool),
                "topics.router_stats": "/policy_node/router_stats",
            },
        ],
    )
    overrides = {
        "weights_path": weights,
        "device": value("device"),
        "action.mode": "ee_twist",
        "topics.cameras": camera_topics(value("camera")),
        "camera.transports": ["raw"],  # the simulated arm publishes sensor_msgs/Image
        # A simulated arm: commanding it from the start is what this launch is for.
        "enable_output": True,
    }
    # Only when given: it overrides the card's default_threshold.
    overrides.update(threshold_override(value("threshold")))
    policy_node = Node(
        package="actdistill_ros",
        executable="policy_node",
        name="policy_node",
        output="screen",
        emulate_tty=True,
        # policy.yaml, then what the simulated arm needs on top (its action.scale: m/s per Meta-World unit).
        parameters=[LaunchConfiguration("policy_params_file"), LaunchConfiguration("sim_policy_params_file"),
                    overrides],
    )
    return [sim_arm_node, policy_node]


def generate_launch_description():
    share = get_package_share_directory("actdistill_ros")
    fastdds_profile = os.path.join(share, "config", "fastdds_large_images.xml")
    arguments = [
        DeclareLaunchArgument("weights", description="policy weights directory (model.safetensors + card.json)"),
        DeclareLaunchArgument("task", default_value="reach", description="Meta-World task, e.g. reach, push"),
        DeclareLaunchArgument("seed", default_value="10000", description="placement seed of the first episode"),
        DeclareLaunchArgument("image_size", default_value="",
                              description="camera size in px; empty: the policy's input size (its card's "
                                          "image_size, 128 for the shipped weights)"),
        DeclareLaunchArgument("camera", default_value="corner4",
                              description="Meta-World camera, or several separated by commas (one per camera "
                                          "image the policy takes, in its order), e.g. corner4,topview"),
        DeclareLaunchArgument("sync_mode", default_value="false",
                              description="true: lockstep (step once per answered frame); false: real time"),
        DeclareLaunchArgument("auto_reset", default_value="true",
                              description="start the next episode (seed + 1) when one ends"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("threshold", default_value="",
                              description="router threshold in [0, 1]; empty: the card's default_threshold"),
        DeclareLaunchArgument("sim_params_file", default_value=os.path.join(share, "config", "sim_arm.yaml"),
                              description="YAML with the remaining sim_arm_node parameters"),
        DeclareLaunchArgument("policy_params_file", default_value=os.path.join(share, "config", "policy.yaml"),
                              description="YAML with the remaining policy_node parameters"),
        DeclareLaunchArgument("sim_policy_params_file",
                              default_value=os.path.join(share, "config", "sim_arm_policy.yaml"),
                              description="YAML with the policy_node parameters the simulated arm needs, over "
                                          "policy_params_file (action.scale must match the arm's linear_scale)"),
    ]
    return LaunchDescription([
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", fastdds_profile),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", fastdds_profile),
        SetEnvironmentVariable("MUJOCO_GL", "egl"),
        *arguments,
        OpaqueFunction(function=_nodes),
    ])
