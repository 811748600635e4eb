"""Bag inspection: check a rosbag2 bag against the policies' cards and plan its replay (no ROS needed).

A ``BagPlan`` is what the player and the report take: the topics in the policy's order, the frame
stamps, the recorded actions aligned to them and ``messages()``, the serialized messages to publish
in order. A LeRobotDataset episode is planned into the same shape (``dataset_episode``).
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml
from rosbags.rosbag2 import Reader

from actdistill_ros.data import BagDataError, TopicConfig, read_episode
from actdistill_ros.data.config import ACTION_TYPES, CAMERA_TYPES, COMPRESSED_IMAGE_TYPE, JOINT_STATE_TYPE, STRING_TYPE
from actdistill_ros.replay_report import RecordedActions
from actdistill_ros.ros.launch_arguments import transport_of_type
from actdistill_ros.ros.replay import log
from actdistill_ros.weights import ModelCard


@dataclass
class BagPlan:
    """What one bag holds and how it is replayed; built and checked before anything starts."""

    path: Path
    camera_topics: list[str]  # in the order the model takes their images; the first keys the frames
    camera_types: dict[str, str]  # per camera: sensor_msgs/msg/Image or CompressedImage (cameras may differ)
    command_topic: str
    state_topic: str | None
    action_topic: str
    action_type: str
    camera_stamps: dict[str, list[int]]  # per camera: header stamps in bag order (0 -> receive time)
    message_count: int  # messages to publish (cameras + command + state)
    source_hw: dict[str, tuple[int, int]]  # per camera: (height, width) of its frames in the bag
    encoding: dict[str, str]  # per camera: Image encoding or CompressedImage format
    storage: str
    recorded: RecordedActions
    alignment_drops: dict[str, int]  # first-camera frames read_episode left out, by reason

    @property
    def name(self) -> str:
        """Keys this input's frames and recorded actions in the report."""
        return str(self.path)

    @property
    def label(self) -> str:
        """Short name for progress bars."""
        return self.path.name

    @property
    def frame_topic(self) -> str:
        """The first camera: its header stamps identify the frame sets (and the node's chunks)."""
        return self.camera_topics[0]

    def topics(self) -> list[str]:
        return [*self.camera_topics, *(t for t in (self.command_topic, self.state_topic) if t)]

    def camera_transports(self) -> list[str]:
        """The node's camera.transports for this bag: each camera's from its message type."""
        return [transport_of_type(self.camera_types[camera]) for camera in self.camera_topics]

    def messages(self):
        """(topic, receive_ns, raw CDR) in recorded order, each frame set's first camera last (frame_set_order)."""
        with Reader(self.path) as reader:
            connections = [c for c in reader.connections if c.topic in self.topics()]
            yield from frame_set_order(((c.topic, t, bytes(raw)) for c, t, raw in reader.messages(connections=connections)),
                                       self.frame_topic)

    def describe(self) -> dict:
        """This input's entry in the report's ``bags`` list."""
        return {"path": self.name, "storage": self.storage,
                "cameras": [{"topic": c, "type": self.camera_types[c], "encoding": self.encoding[c],
                             "resolution": f"{self.source_hw[c][1]}x{self.source_hw[c][0]}",
                             "frames": len(self.camera_stamps[c])} for c in self.camera_topics],
                "frames_with_recorded_action": int(len(self.recorded.stamps_ns)),
                "frames_dropped_in_alignment": self.alignment_drops,
                "action_topic": self.action_topic, "action_type": self.action_type}


def _bag_error(path: Path, topic: str | None, what: str) -> BagDataError:
    return BagDataError(f"bag {str(path)!r}" + (f" topic {topic!r}" if topic else "") + f": {what}")


def header_stamp_ns(raw: bytes) -> int:
    """Header stamp of a serialized Image/CompressedImage (the header comes first in the CDR body)."""
    fmt = "<iI" if raw[1] == 1 else ">iI"
    sec, nanosec = struct.unpack_from(fmt, raw, 4)
    return sec * 1_000_000_000 + nanosec


def with_header_stamp(raw: bytes, stamp_ns: int) -> bytes:
    fmt = "<iI" if raw[1] == 1 else ">iI"
    patched = bytearray(raw)
    struct.pack_into(fmt, patched, 4, stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000)
    return bytes(patched)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def inspect_bag(path: Path, topics: TopicConfig, cards: list[ModelCard]) -> BagPlan:
    """Check that ``path`` can be replayed for every card with ``topics`` (its cameras in the model's
    order); raise BagDataError (one line) if not."""
    card = cards[0]
    needs_state = card.state_dim > 0
    if not (path / "metadata.yaml").is_file():
        raise _bag_error(path, None, "metadata.yaml is missing, expected a rosbag2 directory (metadata.yaml + .mcap/.db3)")
    try:
        with Reader(path) as reader:
            present = {topic: info.msgtype for topic, info in reader.topics.items()}
        info = yaml.safe_load((path / "metadata.yaml").read_text()).get("rosbag2_bagfile_information", {})
        storage = info.get("storage_identifier", "unknown")
    except Exception as err:  # rosbags/sqlite/mcap errors on damaged storage
        raise _bag_error(path, None, f"cannot open ({_first_line(err)}); expected an intact rosbag2 mcap/sqlite3 bag") from None
    present_text = ", ".join(f"{t} ({present[t]})" for t in sorted(present)) or "none"
    wanted = {**dict.fromkeys(topics.cameras, CAMERA_TYPES), topics.command_topic: (STRING_TYPE,),
              topics.action_topic: ACTION_TYPES}
    if needs_state:
        if not topics.state_topic:
            raise _bag_error(path, None, f"the policy needs the robot state ({card.state_dim} values) but no --state-topic is given")
        wanted[topics.state_topic] = (JOINT_STATE_TYPE,)
    for topic, types in wanted.items():
        if topic not in present:
            raise _bag_error(path, topic, f"not in bag, expected {' or '.join(types)}; topics present: {present_text}")
        if present[topic] not in types:
            raise _bag_error(path, topic, f"has type {present[topic]}, expected {' or '.join(types)}")
    topics = dataclasses.replace(topics, state_topic=topics.state_topic if needs_state else None,
                                 action_type=present[topics.action_topic])
    # Recorded actions aligned to the frame sets; also proves every message decodes (corrupt storage,
    # truncated bags, unsupported encodings all fail here, before any node starts).
    episode = read_episode(path, topics, image_size=card.image_size)
    actions = recorded_in_policy_order(episode.actions, episode.action_names, card, lambda what: _bag_error(
        path, topics.action_topic, what))
    check_comparable(cards)

    from actdistill_ros.data.bag_writer import jazzy_typestore

    stamps: dict[str, list[int]] = {camera: [] for camera in topics.cameras}
    encoding: dict[str, str] = {}
    count = 0
    with Reader(path) as reader:
        connections = [c for c in reader.connections
                       if c.topic in (*topics.cameras, topics.command_topic, topics.state_topic)]
        for conn, receive_ns, raw in reader.messages(connections=connections):
            count += 1
            if conn.topic in stamps:
                stamps[conn.topic].append(header_stamp_ns(raw) or receive_ns)
                if conn.topic not in encoding:
                    msg = jazzy_typestore().deserialize_cdr(raw, conn.msgtype)
                    encoding[conn.topic] = msg.format if conn.msgtype == COMPRESSED_IMAGE_TYPE else msg.encoding
    source_hw = dict(zip(topics.cameras, episode.source_image_sizes))
    for camera, (h, w) in source_hw.items():
        if (h, w) != (card.image_size, card.image_size):
            log.warning("bag %s topic %s: frames are %dx%d, the policy was trained on %dx%d: the node resizes every "
                        "frame", path.name, camera, w, h, card.image_size, card.image_size)
    return BagPlan(path=path, camera_topics=list(topics.cameras), camera_types={c: present[c] for c in topics.cameras},
                   command_topic=topics.command_topic, state_topic=topics.state_topic, action_topic=topics.action_topic,
                   action_type=topics.action_type, camera_stamps=stamps, message_count=count, source_hw=source_hw,
                   encoding=encoding, storage=str(storage), recorded=RecordedActions(str(path), episode.stamps_ns, actions),
                   alignment_drops={k: v for k, v in episode.dropped_frames.items() if v})


def frame_set_order(stream, frame_topic: str):
    """(topic, receive_ns, raw) in time order, and among messages with one timestamp the first camera
    last, so the node already has the other cameras' frames, the command and the state that belong
    to a frame set when its first camera's frame arrives."""
    for _, group in itertools.groupby(stream, key=lambda m: m[1]):
        yield from sorted(group, key=lambda m: m[0] == frame_topic)


def recorded_in_policy_order(actions, recorded_names: list[str], card: ModelCard, error):
    """The recorded actions with their columns in the policy's order; ``error(what)`` makes the one-line
    error for recordings of another size."""
    names = list(card.action_space.names)
    if actions.shape[1] != len(names):
        raise error(f"recorded actions have {actions.shape[1]} dims {recorded_names}, expected {len(names)} "
                    f"like the policy {names}")
    if set(recorded_names) == set(names) and list(recorded_names) != names:
        actions = actions[:, [list(recorded_names).index(n) for n in names]]  # recorded order -> policy order
    return actions


def check_comparable(cards: list[ModelCard]) -> None:
    """Teacher and student replay the same inputs and are compared: same actions, same state size."""
    card, names = cards[0], list(cards[0].action_space.names)
    for other in cards[1:]:
        if list(other.action_space.names) != names or other.state_dim != card.state_dim:
            raise ValueError(f"teacher and student differ in action names ({list(other.action_space.names)} vs {names}) "
                             f"or state size ({other.state_dim} vs {card.state_dim}): they cannot be compared")
