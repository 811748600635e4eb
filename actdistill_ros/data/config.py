"""Topic configuration for demonstration bags, and the data-layer error type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
STRING_TYPE = "std_msgs/msg/String"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
TWIST_STAMPED_TYPE = "geometry_msgs/msg/TwistStamped"
POSE_STAMPED_TYPE = "geometry_msgs/msg/PoseStamped"

CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
ACTION_TYPES = (JOINT_STATE_TYPE, TWIST_STAMPED_TYPE, POSE_STAMPED_TYPE)

# Fixed dimension names for the geometry action types (JointState uses msg.name).
TWIST_ACTION_NAMES = ["linear_x", "linear_y", "linear_z", "angular_x", "angular_y", "angular_z"]
POSE_ACTION_NAMES = [
    "position_x", "position_y", "position_z",
    "orientation_x", "orientation_y", "orientation_z", "orientation_w",
]

SIZE_MISMATCH_POLICIES = ("resize", "error")
DEFAULT_CAMERA_TOPIC = "/camera/image_raw"


class BagDataError(ValueError):
    """A demonstration bag is unusable; the message names the bag, the topic and what was expected."""


def normalize_msgtype(msgtype: str) -> str:
    """Accept 'JointState', 'sensor_msgs/JointState' or 'sensor_msgs/msg/JointState'."""
    short = {t.rsplit("/", 1)[-1]: t for t in (*CAMERA_TYPES, *ACTION_TYPES, STRING_TYPE)}
    if msgtype in short:
        return short[msgtype]
    parts = msgtype.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return msgtype


@dataclass
class TopicConfig:
    """Which topics of a demonstration bag hold what, and how frames are aligned.

    Defaults match the project's data conventions. `state_topic=None` (or "") means the
    demos carry no robot state; when set, every bag must contain it.
    `cameras` lists every camera topic in the order the model takes their images; the first
    camera's frames are the samples and the others are aligned to them. `camera_topic` is the
    single-camera key of older configs: give it or `cameras`; after construction it is always
    the first camera. A camera topic may hold sensor_msgs/Image or sensor_msgs/CompressedImage
    (detected from the bag). `action_type` selects how the action vector is read.
    """

    camera_topic: str | None = None
    cameras: list[str] | None = None
    command_topic: str = "/instruction"
    state_topic: str | None = "/joint_states"
    action_topic: str = "/action"
    action_type: str = JOINT_STATE_TYPE
    # A frame is kept only if every other camera, a state and an action lie within this many ms of its stamp.
    sync_tolerance_ms: float = 50.0
    # Frames whose source size differs from the first frame's: "resize" them or raise "error".
    on_size_mismatch: str = "resize"

    def __post_init__(self) -> None:
        if self.state_topic == "":
            self.state_topic = None
        if self.cameras is None:
            self.cameras = [self.camera_topic or DEFAULT_CAMERA_TOPIC]
        else:
            if isinstance(self.cameras, str) or not isinstance(self.cameras, (list, tuple)) or not self.cameras:
                raise ValueError(f"TopicConfig.cameras: expected a non-empty list of camera topics, got {self.cameras!r}")
            self.cameras = list(self.cameras)
            if self.camera_topic is not None and self.camera_topic != self.cameras[0]:
                raise ValueError(f"TopicConfig: camera_topic {self.camera_topic!r} and cameras {self.cameras} disagree; "
                                 "expected one of them (camera_topic for one camera, cameras for a list)")
        for i, camera in enumerate(self.cameras):
            if not isinstance(camera, str) or not camera.startswith("/"):
                raise ValueError(f"TopicConfig.cameras[{i}]: expected an absolute topic name like '/x', got {camera!r}")
        self.camera_topic = self.cameras[0]
        for name in ("command_topic", "action_topic"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ValueError(f"TopicConfig.{name}: expected an absolute topic name like '/x', got {value!r}")
        if self.state_topic is not None and (
            not isinstance(self.state_topic, str) or not self.state_topic.startswith("/")
        ):
            raise ValueError(f"TopicConfig.state_topic: expected an absolute topic name or null, got {self.state_topic!r}")
        self.action_type = normalize_msgtype(str(self.action_type))
        if self.action_type not in ACTION_TYPES:
            raise ValueError(f"TopicConfig.action_type: expected one of {list(ACTION_TYPES)}, got {self.action_type!r}")
        try:
            self.sync_tolerance_ms = float(self.sync_tolerance_ms)
        except (TypeError, ValueError):
            raise ValueError(f"TopicConfig.sync_tolerance_ms: expected a number, got {self.sync_tolerance_ms!r}") from None
        if not self.sync_tolerance_ms >= 0.0 or self.sync_tolerance_ms == float("inf"):
            raise ValueError(f"TopicConfig.sync_tolerance_ms: expected a finite value >= 0, got {self.sync_tolerance_ms}")
        if self.on_size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(f"TopicConfig.on_size_mismatch: expected one of {list(SIZE_MISMATCH_POLICIES)}, got {self.on_size_mismatch!r}")
        topics = [*self.cameras, self.command_topic, self.action_topic] + ([self.state_topic] if self.state_topic else [])
        if len(set(topics)) != len(topics):
            raise ValueError(f"TopicConfig: topics must be distinct, got {topics}")

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def sync_tolerance_ns(self) -> int:
        return int(round(self.sync_tolerance_ms * 1e6))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "topic config") -> "TopicConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of TopicConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> "TopicConfig":
        """Load a YAML file of TopicConfig fields; non-None `overrides` (e.g. CLI flags) win.

        `path=None` starts from the defaults. Overriding the cameras (`cameras` or `camera_topic`)
        replaces the file's cameras, whichever key the file used.
        """
        data: dict[str, Any] = {}
        source = "TopicConfig overrides"
        if path is not None:
            path = Path(path)
            source = str(path)
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except OSError as err:
                raise ValueError(f"{path}: cannot read topic config ({err.strerror})") from None
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: expected YAML, {str(err).splitlines()[0]}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of TopicConfig fields, got {type(loaded).__name__}")
            data.update(loaded)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides.keys() & {"cameras", "camera_topic"}:
            data.pop("cameras", None)
            data.pop("camera_topic", None)
        data.update(overrides)
        return cls.from_dict(data, source=source)
