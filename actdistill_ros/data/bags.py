"""Read demonstration rosbag2 directories (mcap or sqlite3) into aligned episodes.

One bag directory = one episode. A path given to `list_bags`/`read_episodes` is either a bag
directory (it holds metadata.yaml) or a directory whose immediate sub-directories are bags
(one level, sorted by name). Frames are the messages of the first camera; each keeps the nearest
frame of every other camera, the nearest state and the nearest action within
`TopicConfig.sync_tolerance_ms` of its stamp (header stamp, or bag receive time when the header
stamp is zero), else it is dropped and counted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader
from tqdm import tqdm

from .bag_writer import jazzy_typestore
from .config import (
    CAMERA_TYPES,
    COMPRESSED_IMAGE_TYPE,
    JOINT_STATE_TYPE,
    POSE_ACTION_NAMES,
    STRING_TYPE,
    TWIST_ACTION_NAMES,
    TWIST_STAMPED_TYPE,
    BagDataError,
    TopicConfig,
)
from .images import ImageDecodeError, compressed_msg_to_rgb, image_msg_to_rgb, resize_rgb

log = logging.getLogger(__name__)

STORAGE_SUFFIXES = (".mcap", ".db3")
DROP_REASONS = ("duplicate_stamp", "no_camera_within_tolerance", "no_action_within_tolerance",
                "no_state_within_tolerance")


@dataclass
class Episode:
    """One demonstration, aligned on the first camera's frames (T frames after drops).

    `instructions` holds the instruction in force at each frame (T strings; usually all the
    same object). Arrays: images uint8 (T, C, h, w, 3) RGB with C = len(camera_topics), in that
    order; actions float32 (T, D), states float32 (T, S) or None, stamps_ns int64 (T,) (the first
    camera's stamps). `source_image_sizes` is each camera's (height, width) in the bag.
    `dropped_frames` counts first-camera frames left out, by reason.
    """

    key: str
    camera_topics: list[str]
    images: np.ndarray
    instructions: list[str]
    actions: np.ndarray
    states: np.ndarray | None
    stamps_ns: np.ndarray
    action_names: list[str]
    state_names: list[str]
    source_image_sizes: list[tuple[int, int]]
    dropped_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bag_path: Path | None = None

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])

    @property
    def camera_topic(self) -> str:
        """The first camera: its frames are the samples."""
        return self.camera_topics[0]

    @property
    def source_image_size(self) -> tuple[int, int]:
        """(height, width) of the first camera's frames in the bag."""
        return self.source_image_sizes[0]

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped_frames.values())

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def state_dim(self) -> int:
        return 0 if self.states is None else int(self.states.shape[1])

    def sample_key(self, t: int) -> str:
        """Stable across runs and machines: bag name, first camera topic and the frame's stamp."""
        return f"{self.key}/{self.camera_topic}@{int(self.stamps_ns[t])}"

    def sample_keys(self) -> list[str]:
        return [self.sample_key(t) for t in range(len(self))]

    def action_chunk(self, t: int, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Actions of frames t..t+H-1 (H, D), padded by repeating the last one; mask (H,) True where real."""
        if not 0 <= t < len(self):
            raise IndexError(f"frame {t} out of range for episode {self.key!r} with {len(self)} frames")
        end = min(t + chunk_size, len(self))
        chunk = self.actions[t:end]
        valid = np.zeros(chunk_size, dtype=bool)
        valid[: end - t] = True
        if end - t < chunk_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - (end - t), axis=0)])
        return np.ascontiguousarray(chunk, dtype=np.float32), valid


def _is_bag_dir(path: Path) -> bool:
    """A bag directory, or what is left of one (storage file without metadata.yaml)."""
    if not path.is_dir():
        return False
    if (path / "metadata.yaml").exists():
        return True
    return any(p.suffix in STORAGE_SUFFIXES for p in path.iterdir())


def list_bags(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Bag directories named by `paths`: each is a bag, or a directory of bags (one level, sorted).

    Hidden directories and unfinished writes (`*.partial`) are skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    bags: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise BagDataError(f"bag {str(path)!r}: path does not exist, expected a rosbag2 directory or a directory of them")
        if _is_bag_dir(path):
            bags.append(path)
            continue
        if not path.is_dir():
            raise BagDataError(f"bag {str(path)!r}: not a directory, expected a rosbag2 directory (metadata.yaml + .mcap/.db3)")
        children = sorted(
            child for child in path.iterdir()
            if not child.name.startswith(".") and not child.name.endswith(".partial") and _is_bag_dir(child)
        )
        if not children:
            raise BagDataError(f"bag {str(path)!r}: no rosbag2 directories in it (expected metadata.yaml here or in sub-directories)")
        bags.extend(children)
    return bags


def _header_stamp(msg: Any, receive_ns: int) -> int:
    stamp = msg.header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return ns if ns != 0 else int(receive_ns)


def _action_vector(msg: Any, action_type: str) -> np.ndarray:
    if action_type == JOINT_STATE_TYPE:
        return np.asarray(msg.position, dtype=np.float64)
    if action_type == TWIST_STAMPED_TYPE:
        lin, ang = msg.twist.linear, msg.twist.angular
        return np.array([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z], dtype=np.float64)
    pos, ori = msg.pose.position, msg.pose.orientation
    return np.array([pos.x, pos.y, pos.z, ori.x, ori.y, ori.z, ori.w], dtype=np.float64)


def _nearest(sorted_stamps: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest stamp for each query (earlier one on ties) and its absolute distance."""
    n = sorted_stamps.shape[0]
    pos = np.searchsorted(sorted_stamps, query)
    left = np.clip(pos - 1, 0, n - 1)
    right = np.clip(pos, 0, n - 1)
    d_left = np.abs(query - sorted_stamps[left])
    d_right = np.abs(sorted_stamps[right] - query)
    idx = np.where(d_right < d_left, right, left)
    return idx, np.minimum(d_left, d_right)


class _BagContext:
    """Formats one-line errors for a bag."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, topic: str | None, what: str) -> BagDataError:
        where = f"bag {str(self.path)!r}" + (f" topic {topic!r}" if topic else "")
        return BagDataError(f"{where}: {what}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _iter_messages(reader: Reader, connections: list, ctx: _BagContext, topics: list[str]) -> Iterator[tuple[Any, int, bytes]]:
    """reader.messages() with storage failures (truncated mcap, garbage sqlite) turned into BagDataError."""
    gen = reader.messages(connections=connections)
    while True:
        try:
            item = next(gen)
        except StopIteration:
            return
        except Exception as err:  # rosbags raises ReaderError, sqlite3/struct/OS errors on damaged storage
            raise ctx.error(None, f"storage is truncated or corrupt while reading topics {topics} ({_first_line(err)}); expected an intact rosbag2 bag") from None
        yield item


def read_episode(
    bag_path: str | Path,
    topics: TopicConfig | None = None,
    image_size: int | None = None,
    *,
    _target_hw: tuple[int, int] | None = None,
) -> Episode:
    """Read one bag into an aligned Episode; every camera's frames are resized at load to
    (image_size, image_size) with `resize_rgb`, the resize the Policy applies at run time.

    `image_size=None` keeps the first camera's first frame size. Raises BagDataError on unusable data.
    """
    topics = topics or TopicConfig()
    path = Path(bag_path)
    ctx = _BagContext(path)
    if image_size is not None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size: expected a positive int or None, got {image_size}")
        _target_hw = (int(image_size), int(image_size))
    if not path.exists():
        raise ctx.error(None, "path does not exist, expected a rosbag2 directory")
    if not path.is_dir():
        raise ctx.error(None, "not a directory, expected a rosbag2 directory (metadata.yaml + .mcap/.db3)")
    if not (path / "metadata.yaml").is_file():
        raise ctx.error(None, "metadata.yaml is missing (truncated copy or not a rosbag2 directory), expected a rosbag2 directory")

    try:
        reader = Reader(path)
        reader.open()
    except Exception as err:  # any storage/metadata damage surfaces here as a rosbags or sqlite error
        raise ctx.error(None, f"cannot open ({_first_line(err)}); expected an intact rosbag2 mcap/sqlite3 bag") from None
    try:
        return _read_open_bag(reader, path, ctx, topics, _target_hw)
    finally:
        try:
            reader.close()
        except Exception:  # closing a damaged storage must not hide the real error
            pass


def _check_size(ctx: _BagContext, topic: str, stamp: int, source_hw: tuple[int, int],
                first_hw: tuple[int, int] | None, policy: str) -> None:
    if policy == "error" and first_hw is not None and source_hw != first_hw:
        raise ctx.error(topic, f"frame at {stamp} ns is {source_hw[1]}x{source_hw[0]}, expected "
                               f"{first_hw[1]}x{first_hw[0]} like the first frame (on_size_mismatch='error')")


class _CameraFrames:
    """Decoded frames of one camera topic, in bag order."""

    def __init__(self, topic: str, msgtype: str) -> None:
        self.topic, self.msgtype = topic, msgtype
        self.stamps: list[int] = []
        self.images: list[np.ndarray] = []
        self.first_source_hw: tuple[int, int] | None = None

    def add(self, ctx: _BagContext, msg: Any, stamp: int, target_hw: tuple[int, int] | None, size_policy: str) -> None:
        # Frames after the first are brought to the first frame's size unless a size is fixed.
        frame_target = target_hw if target_hw is not None else self.first_source_hw
        try:
            if self.msgtype == COMPRESSED_IMAGE_TYPE:
                image = compressed_msg_to_rgb(msg)
                source_hw = (int(image.shape[0]), int(image.shape[1]))
            else:
                source_hw = (int(msg.height), int(msg.width))
                _check_size(ctx, self.topic, stamp, source_hw, self.first_source_hw, size_policy)  # before decoding
                image = image_msg_to_rgb(msg)
            image = np.ascontiguousarray(image if frame_target is None else resize_rgb(image, frame_target))
        except ImageDecodeError as err:
            raise ctx.error(self.topic, f"frame at {stamp} ns: {err}") from None
        _check_size(ctx, self.topic, stamp, source_hw, self.first_source_hw, size_policy)
        self.first_source_hw = self.first_source_hw or source_hw
        self.stamps.append(stamp)
        self.images.append(image)


def _match(stamps: list[int], frame_stamps: np.ndarray, tolerance_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """For each frame stamp: index (in `stamps`) of the nearest message, and whether it is within tolerance."""
    sorted_stamps = np.asarray(stamps, dtype=np.int64)
    order = np.argsort(sorted_stamps, kind="stable")
    idx, dist = _nearest(sorted_stamps[order], frame_stamps)
    return order[idx], dist <= tolerance_ns


def _read_open_bag(reader: Reader, path: Path, ctx: _BagContext, topics: TopicConfig,
                   target_hw: tuple[int, int] | None) -> Episode:
    present = {topic: info.msgtype for topic, info in reader.topics.items()}
    present_text = ", ".join(f"{t} ({present[t]})" for t in sorted(present)) or "none"
    wanted: dict[str, tuple[str, ...]] = {camera: CAMERA_TYPES for camera in topics.cameras}
    wanted[topics.command_topic] = (STRING_TYPE,)
    wanted[topics.action_topic] = (topics.action_type,)
    if topics.state_topic is not None:
        wanted[topics.state_topic] = (JOINT_STATE_TYPE,)
    for topic, types in wanted.items():
        expected = " or ".join(types)
        if topic not in present:
            raise ctx.error(topic, f"not in bag, expected {expected}; topics present: {present_text}")
        if present[topic] not in types:
            raise ctx.error(topic, f"has type {present[topic]}, expected {expected}")

    store = jazzy_typestore()
    connections = [c for c in reader.connections if c.topic in wanted]
    cameras = {camera: _CameraFrames(camera, present[camera]) for camera in topics.cameras}
    commands: list[tuple[int, str]] = []
    state_stamps: list[int] = []
    state_values: list[np.ndarray] = []
    state_names: list[str] = []
    action_stamps: list[int] = []
    action_values: list[np.ndarray] = []
    action_names: list[str] = []

    for conn, receive_ns, raw in _iter_messages(reader, connections, ctx, sorted(wanted)):
        topic = conn.topic
        try:
            msg = store.deserialize_cdr(raw, conn.msgtype)
        except Exception as err:  # a cut or garbage CDR payload
            raise ctx.error(topic, f"message at {receive_ns} ns does not deserialize as {conn.msgtype} ({_first_line(err)})") from None
        if topic in cameras:
            cameras[topic].add(ctx, msg, _header_stamp(msg, receive_ns), target_hw, topics.on_size_mismatch)
        elif topic == topics.command_topic:
            commands.append((int(receive_ns), str(msg.data)))
        elif topic == topics.state_topic:
            stamp = _header_stamp(msg, receive_ns)
            values = np.asarray(msg.position, dtype=np.float64)
            if not state_values:
                if values.size == 0:
                    raise ctx.error(topic, f"message at {stamp} ns has an empty position, expected the robot state vector")
                state_names = [str(n) for n in msg.name] if len(msg.name) == values.size else [f"state_{i}" for i in range(values.size)]
            elif values.size != state_values[0].size:
                raise ctx.error(topic, f"message at {stamp} ns has {values.size} positions, expected {state_values[0].size} like the first")
            if not np.isfinite(values).all():
                raise ctx.error(topic, f"message at {stamp} ns has NaN/inf in position, expected finite states")
            state_stamps.append(stamp)
            state_values.append(values)
        else:
            stamp = _header_stamp(msg, receive_ns)
            values = _action_vector(msg, topics.action_type)
            if not action_values:
                if values.size == 0:
                    raise ctx.error(topic, f"message at {stamp} ns has an empty position, expected the action vector")
                if topics.action_type == JOINT_STATE_TYPE:
                    action_names = [str(n) for n in msg.name] if len(msg.name) == values.size else [f"action_{i}" for i in range(values.size)]
                else:
                    action_names = list(TWIST_ACTION_NAMES if topics.action_type == TWIST_STAMPED_TYPE else POSE_ACTION_NAMES)
            elif values.size != action_values[0].size:
                raise ctx.error(topic, f"message at {stamp} ns has {values.size} values, expected {action_values[0].size} like the first")
            if not np.isfinite(values).all():
                raise ctx.error(topic, f"message at {stamp} ns has NaN/inf, expected finite actions")
            action_stamps.append(stamp)
            action_values.append(values)

    counts = {camera: len(frames.images) for camera, frames in cameras.items()}
    counts.update({topics.command_topic: len(commands), topics.action_topic: len(action_values)})
    if topics.state_topic is not None:
        counts[topics.state_topic] = len(state_values)
    declared = {topic: 0 for topic in counts}
    for conn in connections:
        declared[conn.topic] += int(conn.msgcount or 0)
    for topic, count in counts.items():
        if count == 0:
            raise ctx.error(topic, f"has no messages (empty bag or topic), expected {' or '.join(wanted[topic])} messages")
        if count < declared[topic]:
            raise ctx.error(topic, f"storage holds {count} messages but metadata.yaml lists {declared[topic]} "
                                   "(truncated bag), expected an intact rosbag2 bag")

    # The first camera's frames in stamp order; a repeated stamp would give two samples the same key.
    first = cameras[topics.cameras[0]]
    cam_stamps = np.asarray(first.stamps, dtype=np.int64)
    order = np.argsort(cam_stamps, kind="stable")
    cam_stamps = cam_stamps[order]
    keep = np.ones(cam_stamps.shape[0], dtype=bool)
    keep[1:] = cam_stamps[1:] != cam_stamps[:-1]
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["duplicate_stamp"] = int((~keep).sum())

    # Every other source is matched to those frames; a frame missing any of them is dropped.
    sources = [(camera, cameras[camera].stamps, "no_camera_within_tolerance") for camera in topics.cameras[1:]]
    sources.append((topics.action_topic, action_stamps, "no_action_within_tolerance"))
    if topics.state_topic is not None:
        sources.append((topics.state_topic, state_stamps, "no_state_within_tolerance"))
    matched: dict[str, np.ndarray] = {}
    for topic, stamps, reason in sources:
        matched[topic], within = _match(stamps, cam_stamps, topics.sync_tolerance_ns)
        if not (keep & within).any():
            raise ctx.error(topic, f"no frame of camera {first.topic!r} has a message of this topic within "
                                   f"{topics.sync_tolerance_ms:g} ms of its stamp ({len(first.images)} frames), "
                                   "expected overlapping stamps")
        dropped[reason] += int((keep & ~within).sum())
        keep &= within

    kept = np.flatnonzero(keep)
    frame_stamps = cam_stamps[kept]
    # Without a fixed size, every camera is brought to the first camera's frame size.
    frame_hw = target_hw or first.first_source_hw
    per_camera = [[first.images[i] for i in order[kept]]]
    for camera in topics.cameras[1:]:
        images = cameras[camera].images
        per_camera.append([resize_rgb(images[i], frame_hw) for i in matched[camera][kept]])
    image_array = np.stack([np.stack(frames) for frames in zip(*per_camera)])
    action_array = np.stack(action_values)[matched[topics.action_topic][kept]].astype(np.float32)
    state_array = None
    if topics.state_topic is not None:
        state_array = np.stack(state_values)[matched[topics.state_topic][kept]].astype(np.float32)

    # Instruction in force at a frame: newest command at or before it, else the first one.
    commands.sort(key=lambda c: c[0])
    command_times = np.asarray([c[0] for c in commands], dtype=np.int64)
    command_idx = np.maximum(np.searchsorted(command_times, frame_stamps, side="right") - 1, 0)
    instructions = [commands[i][1] for i in command_idx]

    return Episode(
        key=path.name, camera_topics=list(topics.cameras), images=image_array, instructions=instructions,
        actions=action_array, states=state_array, stamps_ns=frame_stamps, action_names=action_names,
        state_names=state_names if topics.state_topic is not None else [],
        source_image_sizes=[cameras[camera].first_source_hw for camera in topics.cameras],
        dropped_frames=dropped, bag_path=path,
    )


def read_episodes(
    paths: str | Path | Iterable[str | Path],
    topics: TopicConfig | None = None,
    image_size: int | None = None,
    *,
    progress: bool = True,
) -> list[Episode]:
    """Read every bag under `paths` (see `list_bags`) with a progress bar on stderr.

    All episodes must agree on action names/dims and state dims; keys (bag names) must be
    unique. With `image_size=None` every episode is brought to the first episode's (first camera's)
    frame size (or refused when `on_size_mismatch='error'`). Dropped frames are logged per bag.
    """
    topics = topics or TopicConfig()
    bags = list_bags(paths)
    episodes: list[Episode] = []
    seen: dict[str, Path] = {}
    target_hw = (int(image_size), int(image_size)) if image_size is not None else None
    for bag in tqdm(bags, desc="reading bags", unit="bag", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        if bag.name in seen:
            raise BagDataError(f"bag {str(bag)!r}: name {bag.name!r} repeats {str(seen[bag.name])!r}, expected unique bag names (they key the samples)")
        seen[bag.name] = bag
        episode = read_episode(bag, topics, image_size, _target_hw=target_hw)
        if episodes:
            first = episodes[0]
            if episode.action_names != first.action_names:
                raise BagDataError(f"bag {str(bag)!r} topic {topics.action_topic!r}: action names {episode.action_names}, "
                                   f"expected {first.action_names} like bag {first.key!r}")
            if episode.state_dim != first.state_dim:
                raise BagDataError(f"bag {str(bag)!r} topic {topics.state_topic!r}: state has {episode.state_dim} dims, "
                                   f"expected {first.state_dim} like bag {first.key!r}")
            for camera, (h, w), (first_h, first_w) in zip(topics.cameras, episode.source_image_sizes,
                                                          first.source_image_sizes):
                if topics.on_size_mismatch == "error" and (h, w) != (first_h, first_w):
                    raise BagDataError(f"bag {str(bag)!r} topic {camera!r}: frames are {w}x{h}, expected "
                                       f"{first_w}x{first_h} like bag {first.key!r} (on_size_mismatch='error')")
        else:
            target_hw = target_hw or episode.source_image_size
        if episode.num_dropped:
            log.warning("bag %s: dropped %d of %d camera frames (%s)", bag.name, episode.num_dropped,
                        episode.num_dropped + len(episode),
                        ", ".join(f"{k}={v}" for k, v in episode.dropped_frames.items() if v))
        episodes.append(episode)
    return episodes


def summarize_drops(episodes: Sequence[Episode]) -> dict[str, int]:
    """Total dropped frames by reason over `episodes` (for reports)."""
    total = dict.fromkeys(DROP_REASONS, 0)
    for episode in episodes:
        for reason, count in episode.dropped_frames.items():
            total[reason] = total.get(reason, 0) + count
    return total
