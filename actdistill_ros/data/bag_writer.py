"""Write one demonstration episode as a rosbag2 directory (mcap or sqlite3), atomically."""

from __future__ import annotations

import heapq
import os
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from .config import (
    COMPRESSED_IMAGE_TYPE,
    IMAGE_TYPE,
    JOINT_STATE_TYPE,
    POSE_STAMPED_TYPE,
    STRING_TYPE,
    TWIST_STAMPED_TYPE,
    TopicConfig,
)
from .images import RAW_ENCODINGS, rgb_to_compressed, rgb_to_raw

IMAGE_FORMATS = (*RAW_ENCODINGS, "jpeg", "png")
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
# A recorder starting at an arbitrary wall-clock epoch; keeps generated stamps realistic and positive.
DEFAULT_START_NS = 1_700_000_000_000_000_000
CAMERA_FRAME_ID = "camera"
ROBOT_FRAME_ID = "base"


@lru_cache(maxsize=1)
def jazzy_typestore():
    """The ROS 2 Jazzy message definitions used to (de)serialise every bag."""
    return get_typestore(Stores.ROS2_JAZZY)


def _qos(durability: QosDurability, reliability: QosReliability = QosReliability.RELIABLE) -> Qos:
    zero = QosTime(sec=0, nsec=0)
    return Qos(
        history=QosHistory.KEEP_LAST, depth=1 if durability == QosDurability.TRANSIENT_LOCAL else 10,
        reliability=reliability, durability=durability, deadline=zero, lifespan=zero,
        liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
        avoid_ros_namespace_conventions=False,
    )


def _check_finite_2d(name: str, values: np.ndarray, length: int) -> np.ndarray:
    if values.ndim != 2 or values.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length}, dims), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: expected finite values, found NaN/inf at row {int(np.argwhere(~np.isfinite(values))[0, 0])}")
    return values


def write_episode_bag(
    path: str | Path,
    *,
    images: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]],
    instruction: str,
    states: np.ndarray | None,
    actions: np.ndarray,
    stamps_ns: Sequence[int] | np.ndarray | None = None,
    fps: float = 10.0,
    topics: TopicConfig | None = None,
    storage: str = "mcap",
    image_format: str = "rgb8",
    state_names: Sequence[str] | None = None,
    action_names: Sequence[str] | None = None,
    command_repeat_hz: float | None = None,
    jpeg_quality: int = 95,
    camera_offsets_ns: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one episode (T frames) as a rosbag2 directory at `path`; returns `path`.

    images: RGB uint8 (T, h, w, 3) (or T frames) for one camera; with several cameras
    (topics.cameras), one such sequence per camera in that order (sizes may differ between
    cameras). states: (T, S) or None (requires topics.state_topic set
    iff given). actions: (T, D); for TwistStamped D=6 [lin xyz, ang xyz], PoseStamped D=7
    [pos xyz, quat xyzw]. stamps_ns: per-frame header stamps (default: `fps` spacing from a
    fixed epoch); cameras, state and action share the frame stamp, bag receive time = stamp.
    camera_offsets_ns: added to each camera's stamps (one value per camera, default 0), as
    unsynchronised cameras would stamp their frames.
    instruction: published once (latched, transient-local QoS) at the first stamp, or every
    1/command_repeat_hz seconds. Written into the hidden `.<name>.partial/` next to `path`
    and renamed when complete;
    an existing `path` is replaced only with overwrite=True.
    """
    topics = topics or TopicConfig()
    path = Path(path)
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: expected one of {list(STORAGES)}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: expected one of {list(IMAGE_FORMATS)}")
    if not isinstance(instruction, str):
        raise ValueError(f"instruction: expected a str, got {type(instruction).__name__}")
    if not fps > 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    if command_repeat_hz is not None and not command_repeat_hz > 0:
        raise ValueError(f"command_repeat_hz: expected > 0 or None, got {command_repeat_hz}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: bag already exists; pass overwrite=True to replace it")

    cameras = topics.cameras
    per_camera = [images] if len(cameras) == 1 else list(images)
    if len(per_camera) != len(cameras):
        raise ValueError(f"images: expected one frame sequence per camera ({len(cameras)}: {cameras}), got {len(per_camera)}")
    num_frames = len(per_camera[0])
    if num_frames == 0:
        raise ValueError("images: expected at least one frame, got 0")
    for camera, frames in zip(cameras, per_camera):
        if len(frames) != num_frames:
            raise ValueError(f"images for {camera}: expected {num_frames} frames like {cameras[0]}, got {len(frames)}")
        for i, image in enumerate(frames):
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
                raise ValueError(f"images[{i}] of {camera}: expected RGB uint8 (h, w, 3), got "
                                 f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    offsets = [0] * len(cameras) if camera_offsets_ns is None else [int(o) for o in camera_offsets_ns]
    if len(offsets) != len(cameras):
        raise ValueError(f"camera_offsets_ns: expected {len(cameras)} values (one per camera), got {len(offsets)}")
    actions = _check_finite_2d("actions", np.asarray(actions, dtype=np.float64), num_frames)
    action_dim = actions.shape[1]
    if topics.action_type == TWIST_STAMPED_TYPE and action_dim != 6:
        raise ValueError(f"actions: TwistStamped needs 6 dims [lin xyz, ang xyz], got {action_dim}")
    if topics.action_type == POSE_STAMPED_TYPE and action_dim != 7:
        raise ValueError(f"actions: PoseStamped needs 7 dims [pos xyz, quat xyzw], got {action_dim}")
    if (states is None) != (topics.state_topic is None):
        raise ValueError("states: expected states exactly when topics.state_topic is set "
                         f"(state_topic={topics.state_topic!r}, states {'None' if states is None else 'given'})")
    if states is not None:
        states = _check_finite_2d("states", np.asarray(states, dtype=np.float64), num_frames)
    action_names = list(action_names) if action_names is not None else [f"action_{i}" for i in range(action_dim)]
    if topics.action_type == JOINT_STATE_TYPE and len(action_names) != action_dim:
        raise ValueError(f"action_names: expected {action_dim} names, got {len(action_names)}")
    if states is not None:
        state_names = list(state_names) if state_names is not None else [f"state_{i}" for i in range(states.shape[1])]
        if len(state_names) != states.shape[1]:
            raise ValueError(f"state_names: expected {states.shape[1]} names, got {len(state_names)}")

    if stamps_ns is None:
        stamps = DEFAULT_START_NS + np.round(np.arange(num_frames) * (1e9 / fps)).astype(np.int64)
    else:
        stamps = np.asarray(stamps_ns, dtype=np.int64)
        if stamps.shape != (num_frames,):
            raise ValueError(f"stamps_ns: expected shape ({num_frames},), got {stamps.shape}")
        if (stamps <= 0).any() or (np.diff(stamps) <= 0).any():
            raise ValueError("stamps_ns: expected positive, strictly increasing stamps")
    if int(stamps[0]) + min(offsets) <= 0:
        raise ValueError(f"camera_offsets_ns: {min(offsets)} would stamp a frame at or before 0")

    store = jazzy_typestore()
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]

    def header(stamp: int, frame_id: str):
        return Header(stamp=Time(sec=int(stamp // 1_000_000_000), nanosec=int(stamp % 1_000_000_000)), frame_id=frame_id)

    if command_repeat_hz is None:
        command_stamps = [int(stamps[0])]
    else:
        period = max(int(round(1e9 / command_repeat_hz)), 1)
        command_stamps = list(range(int(stamps[0]), int(stamps[-1]) + 1, period))
    String = store.types[STRING_TYPE]
    camera_type = IMAGE_TYPE if image_format in RAW_ENCODINGS else COMPRESSED_IMAGE_TYPE
    Image, CompressedImage = store.types[IMAGE_TYPE], store.types[COMPRESSED_IMAGE_TYPE]
    JointState = store.types[JOINT_STATE_TYPE]
    empty = np.zeros(0, dtype=np.float64)

    def command_messages():
        for stamp in command_stamps:
            yield stamp, topics.command_topic, String(data=instruction)

    def camera_messages(index: int):
        topic, frames, frame_id = cameras[index], per_camera[index], CAMERA_FRAME_ID if index == 0 else f"camera_{index}"
        for t in range(num_frames):
            stamp, image = int(stamps[t]) + offsets[index], frames[t]
            if camera_type == IMAGE_TYPE:
                raw, step = rgb_to_raw(image, image_format)
                yield stamp, topic, Image(
                    header=header(stamp, frame_id), height=int(image.shape[0]), width=int(image.shape[1]),
                    encoding=image_format, is_bigendian=0, step=step, data=raw.reshape(-1))
            else:
                # image_transport's format string convention.
                yield stamp, topic, CompressedImage(
                    header=header(stamp, frame_id), format=f"rgb8; {image_format} compressed bgr8",
                    data=rgb_to_compressed(image, image_format, jpeg_quality))

    def robot_messages():
        for t in range(num_frames):
            stamp = int(stamps[t])
            if states is not None:
                yield stamp, topics.state_topic, JointState(
                    header=header(stamp, ROBOT_FRAME_ID), name=list(state_names), position=states[t].copy(),
                    velocity=empty, effort=empty)
            yield stamp, topics.action_topic, _action_msg(
                store, topics.action_type, header(stamp, ROBOT_FRAME_ID), actions[t], action_names)

    def messages():
        """(receive time, topic, message) in time order, built lazily; at equal times the command
        comes first, then the cameras in order, then state and action."""
        streams = [command_messages(), *(camera_messages(i) for i in range(len(cameras))), robot_messages()]
        return heapq.merge(*streams, key=lambda message: message[0])

    # Written as <parent>/.<name>.partial/<name> (storage files keep the bag's name), then renamed.
    staging = path.parent / f".{path.name}.partial"
    partial = staging / path.name
    if staging.exists():
        shutil.rmtree(staging)  # left over by a killed writer; never a finished bag
    staging.mkdir(parents=True)
    try:
        writer = Writer(partial, version=9, storage_plugin=STORAGES[storage])
        writer.set_custom_data("actdistill.fps", repr(float(fps)))
        writer.set_custom_data("actdistill.instruction", instruction)
        writer.open()
        try:
            msgtypes = {topics.command_topic: STRING_TYPE, **dict.fromkeys(cameras, camera_type),
                        topics.action_topic: topics.action_type}
            if states is not None:
                msgtypes[topics.state_topic] = JOINT_STATE_TYPE
            qos = {topic: _qos(QosDurability.VOLATILE) for topic in msgtypes}
            qos[topics.command_topic] = _qos(QosDurability.TRANSIENT_LOCAL)
            connections = {
                topic: writer.add_connection(topic, msgtype, typestore=store, offered_qos_profiles=[qos[topic]])
                for topic, msgtype in msgtypes.items()
            }
            for stamp, topic, msg in messages():
                writer.write(connections[topic], stamp, store.serialize_cdr(msg, msgtypes[topic]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if path.exists():  # overwrite=True: swap in the new bag, then drop the old one
            old = staging / f"{path.name}.old"
            os.replace(path, old)
            try:
                os.replace(partial, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(partial, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _action_msg(store, action_type: str, header, action: np.ndarray, names: list[str]):
    if action_type == JOINT_STATE_TYPE:
        empty = np.zeros(0, dtype=np.float64)
        return store.types[JOINT_STATE_TYPE](header=header, name=list(names), position=action.copy(), velocity=empty, effort=empty)
    Vector3 = store.types["geometry_msgs/msg/Vector3"]
    if action_type == TWIST_STAMPED_TYPE:
        Twist = store.types["geometry_msgs/msg/Twist"]
        twist = Twist(linear=Vector3(x=float(action[0]), y=float(action[1]), z=float(action[2])),
                      angular=Vector3(x=float(action[3]), y=float(action[4]), z=float(action[5])))
        return store.types[TWIST_STAMPED_TYPE](header=header, twist=twist)
    Point = store.types["geometry_msgs/msg/Point"]
    Quaternion = store.types["geometry_msgs/msg/Quaternion"]
    pose = store.types["geometry_msgs/msg/Pose"](
        position=Point(x=float(action[0]), y=float(action[1]), z=float(action[2])),
        orientation=Quaternion(x=float(action[3]), y=float(action[4]), z=float(action[5]), w=float(action[6])))
    return store.types[POSE_STAMPED_TYPE](header=header, pose=pose)
