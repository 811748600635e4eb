"""Every parameter of the policy node: declaration (with descriptors and a value each, so that
`ros2 param dump` lists them), refusal of replaced names, and the settings built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.parameter import Parameter

from actdistill_ros.control.limits import ACTION_MODES, REMOVED_PARAMETERS, ActionLimits, LimitSettings
from actdistill_ros.control.motion import ControlSettings
from actdistill_ros.ros.node_common import StartupError

TRANSPORTS = ("raw", "compressed")
AGE_FROM = ("stamp", "receipt")
# Declared when a policy is loaded (their defaults come from its card) and undeclared when it is
# freed, so another card's defaults apply after a reload.
CARD_PARAMETERS = ("router.threshold", "router.keep_fraction")


@dataclass(frozen=True)
class Settings:
    """Parameters that may change while running; rebuilt (and so validated) as a whole on every set."""

    control: ControlSettings
    threshold: float
    keep_fraction: float


def declare_policy_parameters(d: Callable[..., None], lifecycle: bool) -> None:
    """Declare the node's parameters through ``d`` (``PolicyCore._declare``: name, default, description,
    options)."""
    d("weights_path", "", "Policy weights: a directory with model.safetensors and card.json (or the "
      ".safetensors file in it)." + (" Settable while unconfigured: cleanup, set it, configure."
                                     if lifecycle else ""), read_only=not lifecycle)
    d("device", "auto", "Torch device; cuda without a GPU falls back to cpu with a warning.",
      read_only=True, constraints="auto, cpu, cuda or cuda:N")
    d("dtype", "float32", "Compute dtype (bfloat16/float16 on CUDA only; cpu uses float32).",
      read_only=True, constraints="float32, bfloat16 or float16")
    d("control_rate_hz", 10.0, "Commands leave only on this timer: one action (one chunk step) per period, "
      "whatever the inference rate. The limits are per second, so the arm's speed does not depend on it.",
      float_range=(0.1, 1000.0))
    d("camera.transports", ["raw"], "One per camera topic, in topics.cameras order, or one for all: raw "
      "(sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage, jpeg/png).", read_only=True,
      constraints="raw or compressed")
    d("topics.cameras", ["/camera/image_raw"], "Camera topics, one per camera the policy takes, in the "
      "card's camera order. A new frame on the first camera starts an inference with the newest frame of "
      "each.", read_only=True)
    d("topics.command", "/instruction", "Instruction topic (std_msgs/String; latched or not). An empty "
      "string stops motion until the next instruction.", read_only=True)
    d("topics.state", "/joint_states", "Robot state topic (sensor_msgs/JointState, position used): the "
      "policy's state input (by the card's state_names) and, in joint modes, the measured joint "
      "positions motion ramps from and stops at.", read_only=True)
    d("topics.measured_pose", "/measured_pose", "ee_pose mode: the measured end-effector pose "
      "(geometry_msgs/PoseStamped in action.frame_id); motion ramps from it, and holds without it.",
      read_only=True)
    d("topics.emergency_stop", "~/emergency_stop", "Software emergency stop (std_msgs/Bool, latched or not; "
      "NOT safety-rated: keep a hardware e-stop): true stops motion within one control period and latches; "
      "false releases. The std_srvs/SetBool service ~/emergency_stop does the same.", read_only=True)
    d("topics.action", "/action", "Action output topic; its type follows action.mode.", read_only=True)
    d("topics.gripper", "/gripper/command", "Gripper command topic (std_msgs/Float64, the card's gripper "
      "unit), published when the action space has a gripper dimension.", read_only=True)
    d("topics.router_stats", "~/router_stats", "RouterStats topic (exactly one message per inference).",
      read_only=True)
    d("topics.action_chunk", "~/action_chunk", "ActionChunk topic: the whole predicted chunk (card units, "
      "within the bounds), one message per inference, stamped with its first camera frame (published even "
      "when enable_output is false).", read_only=True)
    d("action.mode", "ee_twist", "Output: joint_state, joint_trajectory (whole chunk), ee_pose or ee_twist.",
      read_only=True, constraints=", ".join(ACTION_MODES))
    d("action.frame_id", "base_link", "header.frame_id of pose/twist/trajectory outputs.", read_only=True)
    d("action.joint_names", [], "Joint names for joint_state/joint_trajectory outputs, one per non-gripper "
      "action dimension; []: the card's action names.", read_only=True, array_type=Parameter.Type.STRING_ARRAY)
    d("action.scale", [], "Physical value per action unit, one per action dimension (card order); []: the "
      "card's units are physical. Needed when a dimension's unit is not the one action.mode commands "
      "(joints: rad or m; ee_pose: m; ee_twist: m/s, rad/s), e.g. 'normalized'.", read_only=True,
      array_type=Parameter.Type.DOUBLE_ARRAY)
    d("action.position_limits_low", [], "Lower bounds in physical units, one per action dimension (card "
      "order; ee_twist: per-axis velocities); intersected with the card's bounds x action.scale. []: the "
      "card's bounds.", array_type=Parameter.Type.DOUBLE_ARRAY)
    d("action.position_limits_high", [], "Upper bounds, same rules as action.position_limits_low.",
      array_type=Parameter.Type.DOUBLE_ARRAY)
    d("action.max_joint_velocity", [0.5], "joint modes: the fastest each joint may move, in its unit per "
      "second (rad/s or m/s); one value for all joints or one per joint.", array_type=Parameter.Type.DOUBLE_ARRAY)
    d("action.max_linear_velocity", 0.25, "ee_pose / ee_twist: the fastest the end effector may move "
      "(m/s, norm of xyz).", float_range=(1e-6, 100.0))
    d("action.max_angular_velocity", 0.5, "ee_pose / ee_twist: the fastest the end effector may turn "
      "(rad/s, rotation angle).", float_range=(1e-6, 100.0))
    d("action.max_linear_acceleration", 0.5, "ee_twist: how fast the commanded linear velocity may change "
      "(m/s^2, norm); ramps and decelerating stops follow it.", float_range=(1e-6, 1000.0))
    d("action.max_angular_acceleration", 1.0, "ee_twist: how fast the commanded angular velocity may change "
      "(rad/s^2, norm).", float_range=(1e-6, 1000.0))
    d("action.max_gripper_velocity", 2.0, "The fastest the gripper command may change, in the card's gripper "
      "unit per second.", float_range=(1e-6, 1000.0))
    d("action.temporal_ensemble", False, "Average overlapping chunks (ACT temporal ensembling) instead of "
      "following the newest chunk. Ignored by joint_trajectory.")
    d("action.ensemble_decay", 0.01, "Ensembling weights exp(-decay * i), i = 0 for the oldest chunk.",
      float_range=(0.0, 10.0))
    d("watchdog.max_image_age_s", 0.5, "No motion when any camera's newest frame is older than this by its "
      "header stamp, or its stamp has not advanced for this long; a chunk is never executed once its oldest "
      "source frame is older than this.", float_range=(0.001, 60.0))
    d("watchdog.max_state_age_s", 0.5, "The same for the robot state the policy takes and the measured "
      "position of joint and pose modes.", float_range=(0.001, 60.0))
    d("watchdog.max_clock_skew_s", 0.05, "A stamp up to this far in the future counts as now (drivers whose "
      "clocks lead); further ahead it is stale.", float_range=(0.0, 10.0))
    d("watchdog.age_from", "stamp", "stamp: judge input age by header.stamp (a real arm). receipt: by "
      "arrival time, for replaying recordings whose stamps lie in the past; only with enable_output false.",
      read_only=True, constraints="stamp or receipt")
    d("enable_output", False, "false (the default): dry run, inference, RouterStats, ActionChunk and "
      "diagnostics without commands; switched off while moving, the arm stops within the limits first. "
      "true: command the arm.")
    d("state.enabled", True, "Subscribe to the robot state and feed it to the policy (needed when the "
      "card's state_dim > 0).", read_only=True)


def declare_card_parameters(d: Callable[..., None], card) -> None:
    d("router.threshold", float(card.default_threshold), "Router gate threshold: layers with gate >= it run. "
      "Higher = fewer layers, less compute. Takes effect at the next inference. Default: the card's "
      "default_threshold.", float_range=(0.0, 1.0))
    d("router.keep_fraction", float(card.default_keep_fraction), "> 0: each inference runs the top "
      "max(1, round(keep_fraction * layers)) layers by gate score (the threshold is then ignored); 0: "
      "threshold routing. Takes effect at the next inference. Default: the card's default_keep_fraction.",
      float_range=(0.0, 1.0))


def refuse_removed_parameters(node) -> None:
    """A parameter file or command line that still sets a replaced parameter: one line naming the new one."""
    for name, replacement in REMOVED_PARAMETERS.items():
        value = node.declare_parameter(name, None, ParameterDescriptor(dynamic_typing=True)).value
        node.undeclare_parameter(name)
        if value is not None:
            raise StartupError(f"parameter {name} was replaced: use {replacement}")


def camera_transports(values: list[str], cameras: list[str]) -> list[str]:
    """One transport per camera topic from ``camera.transports`` (one for all, or one each)."""
    bad = [value for value in values if value not in TRANSPORTS]
    if bad or len(values) not in (1, len(cameras)):
        raise ValueError(f"camera.transports must be one of {list(TRANSPORTS)} for all cameras, or one per "
                         f"topic in topics.cameras ({len(cameras)}), got {values}")
    return list(values) * len(cameras) if len(values) == 1 else list(values)


def build_settings(values: dict[str, Any], mode: str, space) -> Settings:
    """The run-time settings from parameter ``values``; ValueError (one line) when they do not fit the card."""
    if values["watchdog.age_from"] not in AGE_FROM:
        raise ValueError(f"watchdog.age_from must be one of {list(AGE_FROM)}, got {values['watchdog.age_from']!r}")
    if values["watchdog.age_from"] == "receipt" and values["enable_output"]:
        raise ValueError("enable_output cannot be true with watchdog.age_from receipt: a node that trusts "
                         "receipt time must not command an arm (use stamp)")
    limits = ActionLimits.build(mode, space, LimitSettings(
        scale=tuple(values["action.scale"]), position_low=tuple(values["action.position_limits_low"]),
        position_high=tuple(values["action.position_limits_high"]),
        max_joint_velocity=tuple(values["action.max_joint_velocity"]),
        max_linear_velocity=float(values["action.max_linear_velocity"]),
        max_angular_velocity=float(values["action.max_angular_velocity"]),
        max_linear_acceleration=float(values["action.max_linear_acceleration"]),
        max_angular_acceleration=float(values["action.max_angular_acceleration"]),
        max_gripper_velocity=float(values["action.max_gripper_velocity"])), float(values["control_rate_hz"]))
    control = ControlSettings(limits=limits, temporal_ensemble=bool(values["action.temporal_ensemble"]),
                              ensemble_decay=float(values["action.ensemble_decay"]),
                              max_image_age_s=float(values["watchdog.max_image_age_s"]),
                              max_state_age_s=float(values["watchdog.max_state_age_s"]),
                              max_clock_skew_s=float(values["watchdog.max_clock_skew_s"]),
                              enable_output=bool(values["enable_output"]))
    return Settings(control=control, threshold=float(values["router.threshold"]),
                    keep_fraction=float(values["router.keep_fraction"]))
