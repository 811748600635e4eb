"""A LeRobotDataset v3 episode as a replay plan: the same ``BagPlan`` a bag gives (topics, frame stamps,
recorded actions aligned to them), whose ``messages()`` are made from the episode's frames the way a
robot's drivers publish them. No ROS needed.

Per frame of the episode, in the order of its timestamps:

- each camera as ``sensor_msgs/Image`` rgb8 at the dataset's own resolution (the node resizes, as it
  does a live camera's frames), on ``/<name>/image_raw`` for ``observation.images.<name>``
  (``lerobot_card.camera_topic``, the mapping the node's launch uses) unless ``--camera-topic`` names
  the topics. Raw rather than CompressedImage: the policy was trained on the frames the dataset's
  video decodes to, and raw rgb8 hands the node exactly those; a JPEG on the way would add a loss
  that no training frame had.
- ``observation.state`` as ``sensor_msgs/JointState`` positions with the feature's names, only when
  the policy takes a state (on a live system a replayed /joint_states would reach every consumer).
- the task as the ``std_msgs/String`` command (latched) at the first frame and wherever it changes.

Header stamps are the episode's timestamps mapped onto the replay clock: the system time when the
run was planned, plus the episode's offset (the episodes one after another, a second apart), plus
the frame's timestamp. They identify the frames (the node copies them into its ActionChunks); a
replay's node judges input ages by receipt.

Everything is checked before anything starts, as a bag is: the plan decodes every frame once at the
policy's image size (``LeRobotDatasetReader.read_episode``), so a missing file, a video shorter than
its episode or an unknown codec is a one-line ``DatasetError`` here. While playing, frames are
decoded at the dataset's size a window at a time, the next window while this one plays, so no
episode is ever held decoded whole.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actdistill_ros.data import TopicConfig
from actdistill_ros.data.config import IMAGE_TYPE, JOINT_STATE_TYPE, STRING_TYPE
from actdistill_ros.data.images import rgb_to_raw
from actdistill_ros.data.lerobot_dataset import ACTION_KEY, DatasetError, EpisodeEntry, LeRobotDatasetReader
from actdistill_ros.lerobot_card import IMAGE_PREFIX, camera_topic
from actdistill_ros.replay_report import RecordedActions
from actdistill_ros.ros.replay import log
from actdistill_ros.ros.replay.bag_inspection import BagPlan, check_comparable, frame_set_order, recorded_in_policy_order
from actdistill_ros.weights import ModelCard

ENCODING = "rgb8"
WINDOW_FRAMES = 32  # frames per camera decoded at a time while playing
EPISODE_GAP_NS = 1_000_000_000  # between one episode's last stamp and the next one's first
ROBOT_FRAME_ID = "base"


def episode_name(root: Path, index: int) -> str:
    """Keys an episode's frames and recorded actions in the report, as a bag's path keys its own."""
    return f"{root} episode {index}"


@dataclass
class DatasetEpisodePlan(BagPlan):
    """One episode of a LeRobotDataset root, planned like a bag (``path`` is the root)."""

    reader: LeRobotDatasetReader
    entry: EpisodeEntry
    camera_keys: list[str]  # the dataset feature of each of camera_topics (same order)
    timestamps: np.ndarray  # (T,) s from the episode's start, as the data file holds them
    stamps_ns: np.ndarray  # (T,) header stamps on the replay clock
    instructions: list[str]  # (T,) the task at each frame
    states: np.ndarray | None  # (T, S), published only when the policy takes a state
    state_names: list[str]

    @property
    def name(self) -> str:
        return episode_name(self.reader.root, self.entry.index)

    @property
    def label(self) -> str:
        return f"{self.reader.root.name} episode {self.entry.index}"

    def messages(self):
        """(topic, receive_ns, raw CDR): per frame the command where the task changes, the state, the
        cameras (the first one last, frame_set_order), all at the frame's stamp."""
        from actdistill_ros.data.bag_writer import jazzy_typestore

        store = jazzy_typestore()
        Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
        Image, String, JointState = store.types[IMAGE_TYPE], store.types[STRING_TYPE], store.types[JOINT_STATE_TYPE]
        frame_ids = [key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key for key in self.camera_keys]
        empty = np.zeros(0, dtype=np.float64)

        def header(stamp: int, frame_id: str):
            return Header(stamp=Time(sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000), frame_id=frame_id)

        def stream():
            task = None
            for start, per_camera in self._decoded_windows():
                for t in range(start, start + len(per_camera[0])):
                    stamp = int(self.stamps_ns[t])
                    if self.instructions[t] != task:
                        task = self.instructions[t]
                        yield self.command_topic, stamp, bytes(store.serialize_cdr(String(data=task), STRING_TYPE))
                    if self.state_topic:
                        msg = JointState(header=header(stamp, ROBOT_FRAME_ID), name=list(self.state_names),
                                         position=self.states[t].astype(np.float64), velocity=empty, effort=empty)
                        yield self.state_topic, stamp, bytes(store.serialize_cdr(msg, JOINT_STATE_TYPE))
                    for topic, frame_id, frames in zip(self.camera_topics, frame_ids, per_camera):
                        image = frames[t - start]
                        data, step = rgb_to_raw(image, ENCODING)
                        msg = Image(header=header(stamp, frame_id), height=int(image.shape[0]),
                                    width=int(image.shape[1]), encoding=ENCODING, is_bigendian=0, step=step,
                                    data=data.reshape(-1))
                        yield topic, stamp, bytes(store.serialize_cdr(msg, IMAGE_TYPE))

        yield from frame_set_order(stream(), self.frame_topic)

    def _decoded_windows(self):
        """(first frame, [per camera uint8 (n, H, W, 3)]) for windows of WINDOW_FRAMES frames; the next
        window decodes in a worker thread while this one is published."""
        count = len(self.timestamps)
        image_rows = None  # the episode's rows, for cameras stored as images in the data file

        def decode(start: int) -> list[np.ndarray]:
            nonlocal image_rows
            stop = min(start + WINDOW_FRAMES, count)
            frames = []
            for key in self.camera_keys:
                if self.reader.features[key].dtype == "video":
                    frames.append(self.reader.decode_video(key, self.entry, self.timestamps[start:stop]))
                else:
                    if image_rows is None:
                        image_rows = self.reader.read_rows(self.entry)["table"]
                    frames.append(self.reader.decode_images(key, self.entry, image_rows.slice(start, stop - start)))
            return frames

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataset_decode") as worker:
            upcoming = worker.submit(decode, 0)
            for start in range(0, count, WINDOW_FRAMES):
                frames = upcoming.result()
                if start + WINDOW_FRAMES < count:
                    upcoming = worker.submit(decode, start + WINDOW_FRAMES)
                yield start, frames

    def describe(self) -> dict:
        features = self.reader.features
        return {"path": str(self.reader.root), "episode": self.entry.index, "storage": self.storage,
                "tasks": list(dict.fromkeys(self.instructions)),
                "cameras": [{"topic": topic, "feature": key, "type": IMAGE_TYPE, "encoding": ENCODING,
                             "stored_as": features[key].codec or features[key].dtype,
                             "resolution": f"{self.source_hw[topic][1]}x{self.source_hw[topic][0]}",
                             "frames": len(self.stamps_ns)} for topic, key in zip(self.camera_topics, self.camera_keys)],
                "frames_with_recorded_action": int(len(self.recorded.stamps_ns)),
                "frames_dropped_in_alignment": self.alignment_drops,
                "action_feature": ACTION_KEY, "state_topic": self.state_topic}


def policy_camera_keys(reader: LeRobotDatasetReader, card: ModelCard) -> list[str]:
    """The dataset's camera features in the order the policy takes them: its card's camera_names when
    they are these features (a policy trained on this kind of dataset), else the dataset's order."""
    if card.camera_names and set(card.camera_names) == set(reader.camera_keys):
        return list(card.camera_names)
    return list(reader.camera_keys)


def _warn_if_the_node_cannot_measure_the_joints(reader: LeRobotDatasetReader, card: ModelCard,
                                                state_topic: str | None) -> None:
    """A joint card's node (joint_state mode, ros_side._action_mode) starts a chunk only from the measured
    joints, which it takes from the JointState by the card's action names; where the replayed state does
    not name them the node holds: chunks still come back, but its own camera-to-action is not measured."""
    space = card.action_space
    if space.kind != "joint":
        return
    arm = [name for i, name in enumerate(space.names) if i != space.gripper_index]
    published = set(reader.state_names) if state_topic else set()
    missing = [name for name in arm if name not in published]
    if missing:
        where = f"the dataset's state names {reader.state_names}" if state_topic else "no JointState (the policy takes no state)"
        log.warning("dataset %s: the node (joint_state mode) starts a chunk from the measured joints %s, read from "
                    "the JointState by name, and the replay publishes %s: it holds, so its own camera-to-action "
                    "(node_camera_to_action) is not measured",
                    reader.root.name, missing, where)


def plan_dataset_episodes(root: Path, episodes: list[int], cards: list[tuple[Path, ModelCard]],
                          topics: TopicConfig, camera_topics: list[str] | None, origin_ns: int) -> list[DatasetEpisodePlan]:
    """Check dataset ``root`` against every policy (``(weights, card)``, the evaluated one first) and plan
    its ``episodes``; ``topics`` gives the command and state topics, ``camera_topics`` (``--camera-topic``)
    the camera topics in the policy's order (None: /<name>/image_raw). Bad input raises one line."""
    reader = LeRobotDatasetReader(root)
    for weights, card in cards:
        reader.check_policy_inputs(str(weights), card.num_cameras, card.action_space.dim, card.state_dim)
    check_comparable([card for _, card in cards])
    card = cards[0][1]
    keys = policy_camera_keys(reader, card)
    for weights, other in cards[1:]:  # one node at a time, each given the same camera topics in one order
        if policy_camera_keys(reader, other) != keys:
            raise ValueError(f"{weights} takes the cameras of dataset {root} in the order "
                             f"{policy_camera_keys(reader, other)}, {cards[0][0]} in {keys}: replay them in separate runs")
    if camera_topics is None:
        camera_topics = [camera_topic(key) for key in keys]
    elif len(camera_topics) != len(keys):
        raise ValueError(f"--camera-topic {camera_topics}: {len(camera_topics)} topic(s), dataset {root} has "
                         f"{len(keys)} camera(s) {keys}; give one per camera, in the order {keys}")
    if len(set(camera_topics)) != len(camera_topics):
        raise ValueError(f"camera topics {camera_topics} of dataset {root}: expected one topic per camera")
    state_topic = topics.state_topic if card.state_dim > 0 else None
    if card.state_dim > 0 and not state_topic:
        raise ValueError(f"{cards[0][0]} takes the robot state ({card.state_dim} values) but no --state-topic is given")
    for index in episodes:
        reader.episode(index)  # every index exists before any frame is decoded
    _warn_if_the_node_cannot_measure_the_joints(reader, card, state_topic)
    source_hw = {topic: reader.features[key].image_hw for topic, key in zip(camera_topics, keys)}
    resized = [f"{topic} {w}x{h}" for topic, (h, w) in source_hw.items() if (h, w) != (card.image_size,) * 2]
    if resized:
        log.info("dataset %s: cameras %s; the node resizes every frame to %dx%d, as it does a live camera's",
                 reader.root.name, ", ".join(resized), card.image_size, card.image_size)
    plans = []
    offset_ns = 0
    for index in episodes:
        entry = reader.episode(index)
        # Decodes every frame (at the policy's size, nothing kept): a damaged video fails here, not mid-replay.
        episode = reader.read_episode(index, image_size=card.image_size)
        actions = recorded_in_policy_order(episode.actions, episode.action_names, card, lambda what: DatasetError(
            f"{reader.info_path}: feature {ACTION_KEY!r}: {what}"))
        stamps = origin_ns + offset_ns + episode.stamps_ns
        offset_ns = int(stamps[-1] - origin_ns) + EPISODE_GAP_NS
        commands = 1 + sum(a != b for a, b in zip(episode.instructions, episode.instructions[1:]))
        plans.append(DatasetEpisodePlan(
            path=reader.root, camera_topics=list(camera_topics), camera_types=dict.fromkeys(camera_topics, IMAGE_TYPE),
            command_topic=topics.command_topic, state_topic=state_topic, action_topic=ACTION_KEY,
            action_type=reader.action_feature.dtype, camera_stamps={c: stamps.tolist() for c in camera_topics},
            message_count=len(stamps) * (len(camera_topics) + bool(state_topic)) + commands, source_hw=source_hw,
            encoding=dict.fromkeys(camera_topics, ENCODING),
            storage=f"LeRobotDataset {reader.info.get('codebase_version')}",
            recorded=RecordedActions(episode_name(reader.root, index), stamps, actions), alignment_drops={},
            reader=reader, entry=entry, camera_keys=keys,
            timestamps=reader.read_rows(entry)["timestamps"], stamps_ns=stamps,
            instructions=list(episode.instructions), states=episode.states, state_names=reader.state_names))
    return plans
