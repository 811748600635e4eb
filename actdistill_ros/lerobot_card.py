"""The model card of a LeRobot SmolVLA, pi0 or pi0.5 policy directory, and the camera topic of a
LeRobot camera key.

A LeRobot policy directory (config.json with "type": "smolvla", "pi0" or "pi05") has no card.json, yet the policy
node, ``ros2 launch`` and the replay tools read a card: which cameras in which order, how many
state values, what the actions mean. This module makes one from the directory's own files, with
``json`` and ``safetensors.numpy`` only, so that the launch process can read it without torch:

- camera_names: the ``observation.images.<name>`` keys of config.json, in config order (the order
  their tokens take in the prefix), without LeRobot's ``empty_camera_`` placeholders.
  ``camera_topic`` maps each to its default ROS topic, ``/<name>/image_raw``.
- action names ``action_0..``, state names none (the node then takes the JointState positions by
  count), unless the dataset the policy was trained on names them (train_config.json's
  dataset.root, meta/info.json) or a ``card.json`` sidecar does.
- units "unknown", so that the node refuses to command anything until ``action.scale`` says what
  one action unit is physically (the node's safety contract); kind "joint".
- low/high: the action's min/max from the postprocessor's statistics (actions beyond what the
  training data held are clipped); without them, -inf/+inf (the node's ``action.position_limits_*``
  then give the only bounds).

A ``card.json`` beside config.json is either a whole card (it has "format": a routed student
written by ``actdistill distill``, family smolvla or pi0) or a sidecar that overrides only ``action_space`` fields and
``state_names``, e.g. ``{"action_space": {"names": [...], "units": ["rad", ...]}, "state_names": [...]}``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from actdistill_ros.policies.flow_family import family_of_dir  # neither torch nor a family imported

CONFIG_FILE = "config.json"
CARD_FILE = "card.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
TRAIN_CONFIG_FILE = "train_config.json"
IMAGE_PREFIX = "observation.images."
EMPTY_CAMERA_PREFIX = IMAGE_PREFIX + "empty_camera_"
SIDECAR_KEYS = ("action_space", "state_names")
ACTION_SPACE_KEYS = ("kind", "names", "units", "low", "high", "gripper_index")
UNKNOWN_UNIT = "unknown"
PI0_VLM_LAYERS = "model.paligemma_with_expert.paligemma.model.language_model.layers."


class LeRobotCardError(ValueError):
    """One line naming the file and what was expected."""


def camera_topic(name: str) -> str:
    """The default ROS topic of a card's camera name: a topic name (it starts with "/") is itself;
    a LeRobot key ``observation.images.<name>`` (not a valid topic) is ``/<name>/image_raw``, the
    characters a topic cannot hold replaced by "_"."""
    if name.startswith("/"):
        return name
    short = name[len(IMAGE_PREFIX):] if name.startswith(IMAGE_PREFIX) else name
    short = re.sub(r"[^A-Za-z0-9_/]", "_", short).strip("/") or "camera"
    if short[0].isdigit():
        short = f"camera_{short}"
    return f"/{short}/image_raw"


def camera_topics_of(names: list[str]) -> list[str]:
    return [camera_topic(name) for name in names]


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise LeRobotCardError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except ValueError as err:
        raise LeRobotCardError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise LeRobotCardError(f"{path}: {what} must be a JSON object")
    return data




def _card_json(directory: Path) -> dict | None:
    path = directory / CARD_FILE
    return _read_json(path, "card.json") if path.is_file() else None


def is_student_card(data: dict | None, family: str) -> bool:
    """A student's router settings without an action space (family ``family``, kind student)."""
    return isinstance(data, dict) and "format" in data and data.get("family") == family \
        and data.get("kind") == "student" and "vla_config" not in data


def lerobot_card_json(path: str | Path) -> dict | None:
    """The card (card.json's layout, as a dict) of a LeRobot SmolVLA / pi0 / pi0.5 directory: a
    teacher as LeRobot saved it (with or without a sidecar card.json), or a routed student of its
    family (its own whole card). None for anything else, including such a directory holding a whole
    card of another family."""
    directory = Path(path).expanduser()
    family = family_of_dir(directory) if directory.is_dir() else None
    if family is None:
        return None
    data = _card_json(directory)
    if data is not None and "format" in data:
        if data.get("family") != family.name:
            return None
        if "vla_config" in data:
            return data  # a whole card written for this directory (distill's student)
    card = synthesize_card(directory, family)
    if data is None:
        return card
    if is_student_card(data, family.name):
        _apply_student_card(card, data, directory / CARD_FILE)
    else:
        _apply_sidecar(card, data, directory / CARD_FILE)
    return card


def _routed_layers(config: dict) -> int | None:
    """VLM layers a router gates: all kept text layers but the last, which only gives keys/values
    (None when num_vlm_layers keeps all of the VLM's: the count is then in the VLM's config)."""
    value = config.get("num_vlm_layers", 16)
    return value - 1 if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def synthesize_card(directory: Path, family=None) -> dict:
    """The card of a LeRobot directory of ``family`` (a flow_family.FlowFamily; None: by its config.json)."""
    family = family or family_of_dir(directory)
    config_path = directory / CONFIG_FILE
    if family is None:
        raise LeRobotCardError(f"{config_path}: \"type\" is not a LeRobot smolvla, pi0 or pi05 policy")
    config = _read_json(config_path, f"the {family.label} config")
    features = config.get("input_features") or {}
    outputs = config.get("output_features") or {}
    try:
        cameras = [key for key, f in features.items() if f["type"] == "VISUAL" and not key.startswith(EMPTY_CAMERA_PREFIX)]
        state_dim = int(features["observation.state"]["shape"][0]) if "observation.state" in features else 0
        action_dim = int(outputs["action"]["shape"][0])
        camera_shapes = {key: [int(s) for s in features[key]["shape"]] for key in cameras}
    except (KeyError, TypeError, ValueError, IndexError):
        raise LeRobotCardError(f"{config_path}: input_features / output_features need \"type\" and \"shape\" "
                               f"(observation.images.<camera>, observation.state, action)") from None
    if not cameras:
        raise LeRobotCardError(f"{config_path}: input_features has no VISUAL feature (observation.images.<camera>)")
    # The square size the model's images are resized (with padding) to; a camera of any size works.
    resize = config.get("resize_imgs_with_padding" if family.name == "smolvla" else "image_resolution",
                        None if family.name == "smolvla" else [224, 224])
    image_size = max(resize) if isinstance(resize, list) and len(resize) == 2 else max(
        max(shape[1:]) for shape in camera_shapes.values())
    low, high = _action_bounds(directory, action_dim)
    action_names, state_names = _dataset_names(directory, action_dim, state_dim)
    space = {"kind": "joint", "names": action_names or [f"action_{i}" for i in range(action_dim)],
             "units": [UNKNOWN_UNIT] * action_dim, "low": low, "high": high, "gripper_index": None}
    chunk = config.get("chunk_size", 50)
    card = {
        "format": 1, "kind": "teacher", "family": family.name,
        "vla_config": {"image_size": int(image_size), "num_cameras": len(cameras),
                       # what one chunk executes: LeRobot runs the first n_action_steps of chunk_size
                       "chunk_size": int(config.get("n_action_steps", chunk)), "predicted_chunk_size": int(chunk),
                       "action_dim": action_dim, "state_dim": state_dim,
                       "num_layers": _routed_layers(config) if family.name == "smolvla" else _pi0_routed_layers(
                           directory),
                       "image_features": camera_shapes},
        "action_space": space, "norm_stats": {}, "router_config": None, "default_threshold": 0.5,
        "default_keep_fraction": 0.0, "state_names": state_names, "camera_names": cameras,
        "provenance": {"source": f"LeRobot {config.get('type')} policy directory {directory.name} "
                                 f"(card made from its files)"},
        "metrics": {},
    }
    return card


def _pi0_routed_layers(directory: Path) -> int | None:
    """pi0's VLM layers a router gates (all but the last): its depth is in the tensor names only
    (config.json names a Gemma variant), read from model.safetensors' header without loading it."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open  # the header only: no torch, no tensor read

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            names = list(handle.keys())
    except Exception as err:  # noqa: BLE001 - any unreadable file reads the same to the user
        raise LeRobotCardError(f"{weights}: not a readable safetensors file ({err})") from None
    pattern = re.compile(re.escape(PI0_VLM_LAYERS) + r"(\d+)\.")
    layers = {int(m.group(1)) for name in names if (m := pattern.match(name))}
    return max(layers) if layers else None  # depth - 1


def _action_bounds(directory: Path, action_dim: int) -> tuple[list[float], list[float]]:
    """min/max of the action from the postprocessor's statistics, else -inf/+inf."""
    unbounded = ([-math.inf] * action_dim, [math.inf] * action_dim)
    path = directory / POSTPROCESSOR_FILE
    if not path.is_file():
        return unbounded
    pipeline = _read_json(path, "the postprocessor")
    from safetensors.numpy import load_file  # numpy only: the launch process stays free of torch

    for step in pipeline.get("steps") or []:
        state_file = step.get("state_file") if isinstance(step, dict) else None
        if not state_file or not (directory / state_file).is_file():
            continue
        try:
            stats = load_file(str(directory / state_file))
        except Exception as err:  # noqa: BLE001 - any unreadable file reads the same to the user
            raise LeRobotCardError(f"{directory / state_file}: not a readable safetensors file ({err})") from None
        if "action.min" in stats and "action.max" in stats:
            low = [float(v) for v in stats["action.min"].reshape(-1)]
            high = [float(v) for v in stats["action.max"].reshape(-1)]
            if len(low) == len(high) == action_dim:
                return low, high
    return unbounded


def _names(feature: dict | None, count: int) -> list[str]:
    names = (feature or {}).get("names")
    if isinstance(names, dict):  # LeRobot v2 style: {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == count and all(isinstance(n, str) for n in names):
        return list(names)
    return []


def _dataset_names(directory: Path, action_dim: int, state_dim: int) -> tuple[list[str], list[str]]:
    """Action and state names from the training dataset's meta/info.json, when train_config.json
    names a dataset root that exists here."""
    train = directory / TRAIN_CONFIG_FILE
    if not train.is_file():
        return [], []
    try:
        root = (json.loads(train.read_text()).get("dataset") or {}).get("root")
        info = json.loads((Path(root).expanduser() / "meta" / "info.json").read_text()) if root else None
    except (OSError, ValueError, AttributeError, TypeError):
        return [], []
    features = (info or {}).get("features") or {}
    return _names(features.get("action"), action_dim), _names(features.get("observation.state"), state_dim)


def _apply_sidecar(card: dict, sidecar: dict, path: Path) -> None:
    unknown = sorted(set(sidecar) - set(SIDECAR_KEYS))
    if unknown:
        raise LeRobotCardError(f"{path}: unknown sidecar field(s) {unknown}; a card sidecar of a LeRobot policy "
                               f"may set {list(SIDECAR_KEYS)} (a whole card has \"format\")")
    space = sidecar.get("action_space", {})
    if not isinstance(space, dict) or sorted(set(space) - set(ACTION_SPACE_KEYS)):
        raise LeRobotCardError(f"{path}: action_space must be an object with fields among {list(ACTION_SPACE_KEYS)}")
    dim = len(card["action_space"]["names"])
    for key, value in space.items():
        if key in ("names", "units", "low", "high") and (not isinstance(value, list) or len(value) != dim):
            raise LeRobotCardError(f"{path}: action_space.{key} must list {dim} values (one per action dimension)")
        card["action_space"][key] = value
    if "state_names" in sidecar:
        names = sidecar["state_names"]
        state_dim = card["vla_config"]["state_dim"]
        if not isinstance(names, list) or len(names) != state_dim or not all(isinstance(n, str) for n in names):
            raise LeRobotCardError(f"{path}: state_names must list {state_dim} joint names (observation.state's size)")
        card["state_names"] = names


def _apply_student_card(card: dict, student: dict, path: Path) -> None:
    """The routing settings of a student's own card."""
    names = student.get("camera_names") or card["camera_names"]
    if sorted(names) != sorted(card["camera_names"]):
        raise LeRobotCardError(f"{path}: camera_names {names} are not the cameras of config.json "
                               f"{card['camera_names']}")
    card.update(kind="student", router_config=student.get("router_config"), camera_names=list(names),
                default_threshold=float(student.get("default_threshold", 0.5)),
                default_keep_fraction=float(student.get("default_keep_fraction", 0.0)),
                metrics=dict(student.get("metrics") or {}),
                provenance={**card["provenance"], **dict(student.get("provenance") or {}),
                            "kv_mode": student.get("kv_mode")})
    if student.get("num_routed_layers"):
        card["vla_config"]["num_layers"] = int(student["num_routed_layers"])
