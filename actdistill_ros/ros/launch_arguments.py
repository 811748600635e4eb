"""Launch-argument parsing and the command lines and node parameters the launch files build (plain
Python, so it is tested without the `launch` package).

Nothing here imports torch: the launch process only needs a few fields of a weights directory's
card.json (camera names, image size, state size, action units), read with ``json``. Importing
``actdistill_ros.weights`` for them would load torch into ``ros2 launch`` (seconds and a quarter of
a gigabyte) for nothing. The node validates the whole card when it loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from actdistill_ros.lerobot_card import LeRobotCardError, camera_topics_of, lerobot_card_json

CARD_FILE = "card.json"  # actdistill_ros.weights.CARD_FILE (that module imports torch)
TRANSPORTS = ("raw", "compressed")  # the policy node's camera.transports values
# Units whose values a node can command as they are (a dry run commands nothing, but the node still
# checks that every dimension has a physical unit or an action.scale).
PHYSICAL_UNITS = {"m", "rad", "m/s", "rad/s", "1"}


def boolean_argument(name: str, text: str) -> bool:
    """A true/false launch argument (case and surrounding spaces ignored); anything else is refused."""
    value = str(text).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"launch argument {name} must be true or false, got {text!r}")
    return value == "true"


def threshold_override(text: str) -> dict[str, float]:
    """The node parameters of a ``threshold`` launch argument: ``{}`` when it is empty (the card's
    routing applies); else that threshold with ``router.keep_fraction`` 0, since a threshold asked
    for by name means threshold routing (a keep fraction above 0 would override it)."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"launch argument threshold must be a number in [0, 1], got {text!r}")
    return {"router.threshold": value, "router.keep_fraction": 0.0}


# ---------------------------------------------------------------- the card, without torch
def read_card_json(weights: str | Path) -> dict:
    """The card.json of a weights directory (or of the .safetensors file in one), as a dict."""
    path = Path(weights).expanduser()
    try:  # a LeRobot SmolVLA directory: its card is made from its own files (json + numpy only)
        synthesized = lerobot_card_json(path)
    except LeRobotCardError as err:
        raise ValueError(f"launch argument weights {str(weights)!r}: {err}") from None
    if synthesized is not None:
        return synthesized
    card = path / CARD_FILE if path.is_dir() else path.parent / CARD_FILE
    try:
        data = json.loads(card.read_text())
    except FileNotFoundError:
        raise ValueError(f"launch argument weights {str(weights)!r}: no {CARD_FILE} at {card}, expected a weights "
                         f"directory (model.safetensors + {CARD_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"launch argument weights {str(weights)!r}: {card} is not a readable JSON model card "
                         f"({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("vla_config"), dict) \
            or not isinstance(data.get("action_space"), dict):
        raise ValueError(f"launch argument weights {str(weights)!r}: {card} has no vla_config and action_space, "
                         "expected an actdistill model card")
    return data


def _card_int(card: dict, key: str, default: int | None = None) -> int:
    value = card["vla_config"].get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"model card vla_config.{key}: expected an integer, got {value!r}")
    return value


def card_image_size(weights: str | Path) -> int:
    """The camera image size (px, square) the policy of ``weights`` takes."""
    return _card_int(read_card_json(weights), "image_size")


def image_size_argument(text: str, weights: str | Path) -> int:
    """The camera size (px) of an ``image_size`` launch argument; empty: the size the policy of
    ``weights`` takes (its card's vla_config.image_size), so that no frame needs resizing."""
    text = str(text).strip()
    if not text:
        return card_image_size(weights)
    if not text.isdigit() or not 16 <= int(text) <= 1024:
        raise ValueError(f"launch argument image_size must be a whole number of pixels in [16, 1024] (or empty: "
                         f"the card's image size), got {text!r}")
    return int(text)


def card_state_dim(weights: str | Path) -> int:
    """How many robot-state values the policy of ``weights`` takes (0: none)."""
    return _card_int(read_card_json(weights), "state_dim", 0)


def dry_run_action_scale(units: list[str], gripper_index: int | None) -> dict[str, list[float]]:
    """``action.scale`` for a node that commands nothing (replay): ``{}`` when every non-gripper unit
    of the card is physical (the node then takes the card's units as they are), else a scale of 1.0
    per action dimension, so that a card in normalized units starts. The scale only matters for the
    node's unit check: with enable_output false no value reaches a robot."""
    arm_units = [unit for i, unit in enumerate(units) if i != gripper_index]
    if all(unit in PHYSICAL_UNITS for unit in arm_units):
        return {}
    return {"action.scale": [1.0] * len(units)}


def card_dry_run_action_scale(weights: str | Path) -> dict[str, list[float]]:
    """dry_run_action_scale for the card of ``weights``."""
    space = read_card_json(weights)["action_space"]
    return dry_run_action_scale(list(space.get("units", [])), space.get("gripper_index"))


# ---------------------------------------------------------------- cameras
def camera_topics(text: str, weights: str | None = None) -> list[str]:
    """The camera topics of a ``camera_topics`` launch argument, in the policy's order: topics separated
    by commas or spaces ("/scene,/wrist" or "[/scene, /wrist]"). Empty: the camera_names of the card
    of ``weights`` (a LeRobot key observation.images.<name> as /<name>/image_raw: lerobot_card.camera_topic),
    else the one default camera."""
    topics = text.strip().strip("[]").replace(",", " ").split()
    bad = [t for t in topics if not t.startswith("/")]
    if bad:
        raise ValueError(f"launch argument camera_topics: expected absolute topic names like /camera/image_raw, "
                         f"separated by commas, got {text!r}")
    if topics:
        return topics
    from actdistill_ros.data.config import DEFAULT_CAMERA_TOPIC

    names = list(read_card_json(weights).get("camera_names") or []) if weights else []
    return camera_topics_of(names) or [DEFAULT_CAMERA_TOPIC]


def camera_transports(text: str, cameras: list[str]) -> list[str]:
    """``camera.transports`` of a ``camera_transports`` launch argument: raw or compressed, separated by
    commas, one per camera in ``cameras`` or one for all; empty: raw for every camera."""
    transports = text.strip().strip("[]").replace(",", " ").split() or ["raw"]
    if any(t not in TRANSPORTS for t in transports) or len(transports) not in (1, len(cameras)):
        raise ValueError(f"launch argument camera_transports: expected raw or compressed, one for every camera or "
                         f"one per camera of {cameras} separated by commas, got {text!r}")
    return transports


def transport_of_type(msgtype: str) -> str | None:
    """The camera.transports value of a camera message type (None: not a camera type)."""
    from actdistill_ros.data.config import COMPRESSED_IMAGE_TYPE, IMAGE_TYPE

    return {IMAGE_TYPE: "raw", COMPRESSED_IMAGE_TYPE: "compressed"}.get(msgtype)


def bag_topic_types(bag: str | Path) -> dict[str, str]:
    """{topic: message type} of a rosbag2 directory, from its metadata.yaml (nothing else is opened)."""
    import yaml

    metadata = Path(bag).expanduser() / "metadata.yaml"
    try:
        info = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]
        return {entry["topic_metadata"]["name"]: entry["topic_metadata"]["type"]
                for entry in info["topics_with_message_count"]}
    except FileNotFoundError:
        raise ValueError(f"launch argument bag {str(bag)!r}: no metadata.yaml, expected a rosbag2 directory") from None
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(f"launch argument bag {str(bag)!r}: unreadable metadata.yaml ({type(err).__name__}: {err}), "
                         "expected rosbag2_bagfile_information.topics_with_message_count") from None


def bag_camera_transports(bag: str | Path, cameras: list[str]) -> list[str]:
    """camera.transports for replaying ``bag``: each camera's from its message type in the bag
    (sensor_msgs/Image: raw, CompressedImage: compressed), so bags that mix them replay."""
    types = bag_topic_types(bag)
    transports = []
    for camera in cameras:
        transport = transport_of_type(types.get(camera, ""))
        if transport is None:
            found = f"has type {types[camera]}" if camera in types else "is not in the bag"
            raise ValueError(f"bag {str(bag)!r} camera topic {camera!r} {found}, expected sensor_msgs/msg/Image or "
                             f"sensor_msgs/msg/CompressedImage; topics present: {', '.join(sorted(types)) or 'none'}")
        transports.append(transport)
    return transports


def camera_topic_flags(cameras: list[str]) -> list[str]:
    """``--camera-topic`` once per camera, for a command line such as replay_eval's."""
    return [arg for camera in cameras for arg in ("--camera-topic", camera)]


# ---------------------------------------------------------------- the policy node
def policy_executable(lifecycle: str) -> str:
    """The policy node's executable for a ``lifecycle`` launch argument: the managed node
    (policy_lifecycle_node) for true, the self-starting policy_node for false."""
    return "policy_lifecycle_node" if boolean_argument("lifecycle", lifecycle) else "policy_node"


def lifecycle_autostart(lifecycle: str, autostart: str) -> bool:
    """Whether the launch configures and activates the managed node itself (``autostart:=true``).
    Off by default: on a real arm a person decides when the policy becomes active."""
    start = boolean_argument("autostart", autostart)
    if start and not boolean_argument("lifecycle", lifecycle):
        raise ValueError("launch argument autostart:=true needs lifecycle:=true (policy_node is active from the "
                         "start; enable_output:=true is what lets it command)")
    return start


# ---------------------------------------------------------------- replay
def policy_input_topics(cameras: list[str], command_topic: str, state_topic: str, state_dim: int) -> list[str]:
    """The bag topics a replay plays: what the policy takes, nothing else. The cameras and the command;
    the robot state only when the policy takes one (state_dim > 0), since on a live system a replayed
    /joint_states is read by every consumer of the measured state. Never the recorded actions."""
    topics = [*cameras, command_topic]
    if state_dim > 0:
        if not state_topic:
            raise ValueError(f"launch argument state_topic: the policy takes a robot state ({state_dim} values), "
                             "expected the bag's sensor_msgs/JointState topic")
        topics.append(state_topic)
    bad = [t for t in topics if not str(t).startswith("/")]
    if bad:
        raise ValueError(f"replay topics {bad}: expected absolute topic names like /instruction")
    return topics


def bag_play_command(bag: str, rate: str, topics: list[str]) -> list[str]:
    """``ros2 bag play`` of only ``topics`` (``--topics`` takes the rest of the line, so it comes last)."""
    return ["ros2", "bag", "play", bag, "--rate", rate, "--topics", *topics]


def replay_eval_arguments(bag: str, weights: str, out: str, cameras: list[str], command_topic: str,
                          state_topic: str, action_topic: str, node_name: str) -> list[str]:
    """replay_eval's arguments beside ``ros2 bag play``: listen only, attached to ``node_name``."""
    return [bag, "--weights", weights, "--out", out, *camera_topic_flags(cameras), "--command-topic", command_topic,
            "--state-topic", state_topic, "--action-topic", action_topic, "--listen-only", "--attach", node_name]


def replay_node_parameters(weights: str, device: str, cameras: list[str], transports: list[str], command_topic: str,
                           state_topic: str) -> dict:
    """The policy node's parameters for a replay: a dry run (enable_output false: a replay never
    commands a robot), the bag's cameras with their transports, the card's state use."""
    return {
        "weights_path": weights,
        "device": device,
        "enable_output": False,
        # Recorded stamps lie in the past: a dry run judges input ages by receipt (refused with output on).
        "watchdog.age_from": "receipt",
        "topics.cameras": list(cameras),
        "camera.transports": list(transports),
        "topics.command": command_topic,
        "topics.state": state_topic,
        "state.enabled": card_state_dim(weights) > 0,
        **card_dry_run_action_scale(weights),
    }
