"""Read demonstration rosbag2 directories (mcap or sqlite3) into aligned episodes.

One bag directory = one episode. A path given to `list_bags`/`read_episodes` is either a bag
directory (it holds metadata.yaml) or a directory whose immediate sub-directories are bags
(one level, sorted by name). Frames are the camera messages; each keeps the nearest state and
nearest action within `TopicConfig.sync_tolerance_ms` of its stamp (header stamp, or bag
receive time when the header stamp is zero), else it is dropped and counted.
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
from .images import ImageDecodeError, compressed_msg_to_rgb, image_msg_to_rgb, resize_to

log = logging.getLogger(__name__)

STORAGE_SUFFIXES = (".mcap", ".db3")
DROP_REASONS = ("duplicate_stamp", "no_action_within_tolerance", "no_state_within_tolerance")


@dataclass
class Episode:
    """One demonstration, aligned on camera frames (T frames after drops).

    `instructions` holds the instruction in force at each frame (T strings; usually all the
    same object). Arrays: images uint8 (T, h, w, 3) RGB, actions float32 (T, D), states float32
    (T, S) or None, stamps_ns int64 (T,). `dropped_frames` counts camera frames left out, by reason.
    """

    key: str
    camera_topic: str
    images: np.ndarray
    instructions: list[str]
    actions: np.ndarray
    states: np.ndarray | None
    stamps_ns: np.ndarray
    action_names: list[str]
    state_names: list[str]
    source_image_size: tuple[int, int]
    dropped_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bag_path: Path | None = None

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])

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
        """Stable across runs and machines: bag name, camera topic and the frame's stamp."""
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
    """Read one bag into an aligned Episode; images resized to (image_size, image_size) at load.

    `image_size=None` keeps the first frame's size. Raises BagDataError on unusable data.
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


def _read_open_bag(reader: Reader, path: Path, ctx: _BagContext, topics: TopicConfig,
                   target_hw: tuple[int, int] | None) -> Episode:
    present = {topic: info.msgtype for topic, info in reader.topics.items()}
    present_text = ", ".join(f"{t} ({present[t]})" for t in sorted(present)) or "none"
    wanted: dict[str, tuple[str, ...]] = {
        topics.camera_topic: CAMERA_TYPES,
        topics.command_topic: (STRING_TYPE,),
        topics.action_topic: (topics.action_type,),
    }
    if topics.state_topic is not None:
        wanted[topics.state_topic] = (JOINT_STATE_TYPE,)
    for topic, types in wanted.items():
        expected = " or ".join(types)
        if topic not in present:
            raise ctx.error(topic, f"not in bag, expected {expected}; topics present: {present_text}")
        if present[topic] not in types:
            raise ctx.error(topic, f"has type {present[topic]}, expected {expected}")
    camera_type = present[topics.camera_topic]

    store = jazzy_typestore()
    connections = [c for c in reader.connections if c.topic in wanted]
    camera_stamps: list[int] = []
    images: list[np.ndarray] = []
    first_source_hw: tuple[int, int] | None = None
    commands: list[tuple[int, str]] = []
    state_stamps: list[int] = []
    state_values: list[np.ndarray] = []
    state_names: list[str] = []
    action_stamps: list[int] = []
    action_values: list[np.ndarray] = []
    action_names: list[str] = []
    size_policy = topics.on_size_mismatch

    for conn, receive_ns, raw in _iter_messages(reader, connections, ctx, sorted(wanted)):
        topic = conn.topic
        try:
            msg = store.deserialize_cdr(raw, conn.msgtype)
        except Exception as err:  # a cut or garbage CDR payload
            raise ctx.error(topic, f"message at {receive_ns} ns does not deserialize as {conn.msgtype} ({_first_line(err)})") from None
        if topic == topics.camera_topic:
            stamp = _header_stamp(msg, receive_ns)
            # Frames after the first are brought to the first frame's size unless a size is fixed.
            frame_target = target_hw if target_hw is not None else first_source_hw
            try:
                if camera_type == COMPRESSED_IMAGE_TYPE:
                    image = compressed_msg_to_rgb(msg)
                    source_hw = (int(image.shape[0]), int(image.shape[1]))
                else:
                    source_hw = (int(msg.height), int(msg.width))
                    _check_size(ctx, topic, stamp, source_hw, first_source_hw, size_policy)  # before decoding
                    image = image_msg_to_rgb(msg)
                image = np.ascontiguousarray(resize_to(image, frame_target))
            except ImageDecodeError as err:
                raise ctx.error(topic, f"frame at {stamp} ns: {err}") from None
            _check_size(ctx, topic, stamp, source_hw, first_source_hw, size_policy)
            first_source_hw = first_source_hw or source_hw
            camera_stamps.append(stamp)
            images.append(image)
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

    counts = {topics.camera_topic: len(images), topics.command_topic: len(commands), topics.action_topic: len(action_values)}
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

    # Frames in stamp order; a repeated stamp would give two samples the same key.
    cam_stamps = np.asarray(camera_stamps, dtype=np.int64)
    order = np.argsort(cam_stamps, kind="stable")
    cam_stamps = cam_stamps[order]
    unique = np.ones(cam_stamps.shape[0], dtype=bool)
    unique[1:] = cam_stamps[1:] != cam_stamps[:-1]
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["duplicate_stamp"] = int((~unique).sum())

    tolerance = topics.sync_tolerance_ns
    act_stamps = np.asarray(action_stamps, dtype=np.int64)
    act_order = np.argsort(act_stamps, kind="stable")
    act_stamps = act_stamps[act_order]
    act_idx, act_dist = _nearest(act_stamps, cam_stamps)
    has_action = act_dist <= tolerance
    keep = unique & has_action
    dropped["no_action_within_tolerance"] = int((unique & ~has_action).sum())
    if topics.state_topic is not None:
        st_stamps = np.asarray(state_stamps, dtype=np.int64)
        st_order = np.argsort(st_stamps, kind="stable")
        st_stamps = st_stamps[st_order]
        st_idx, st_dist = _nearest(st_stamps, cam_stamps)
        has_state = st_dist <= tolerance
        dropped["no_state_within_tolerance"] = int((keep & ~has_state).sum())
        keep &= has_state
    if not keep.any():
        missing = topics.action_topic if not (unique & has_action).any() else topics.state_topic
        raise ctx.error(missing, f"no camera frame on {topics.camera_topic} has a message within "
                                 f"{topics.sync_tolerance_ms:g} ms of its stamp ({len(images)} frames), expected overlapping stamps")

    kept = np.flatnonzero(keep)
    frame_stamps = cam_stamps[kept]
    image_array = np.stack([images[order[i]] for i in kept])
    action_array = np.stack(action_values)[act_order][act_idx[kept]].astype(np.float32)
    state_array = None
    if topics.state_topic is not None:
        state_array = np.stack(state_values)[st_order][st_idx[kept]].astype(np.float32)

    # Instruction in force at a frame: newest command at or before it, else the first one.
    commands.sort(key=lambda c: c[0])
    command_times = np.asarray([c[0] for c in commands], dtype=np.int64)
    command_idx = np.maximum(np.searchsorted(command_times, frame_stamps, side="right") - 1, 0)
    instructions = [commands[i][1] for i in command_idx]

    return Episode(
        key=path.name, camera_topic=topics.camera_topic, images=image_array, instructions=instructions,
        actions=action_array, states=state_array, stamps_ns=frame_stamps, action_names=action_names,
        state_names=state_names if topics.state_topic is not None else [], source_image_size=first_source_hw,
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
    unique. With `image_size=None` every episode is brought to the first episode's frame size
    (or refused when `on_size_mismatch='error'`). Dropped frames are logged per bag.
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
            if topics.on_size_mismatch == "error" and episode.source_image_size != first.source_image_size:
                h, w = episode.source_image_size
                raise BagDataError(f"bag {str(bag)!r} topic {topics.camera_topic!r}: frames are {w}x{h}, expected "
                                   f"{first.source_image_size[1]}x{first.source_image_size[0]} like bag {first.key!r} (on_size_mismatch='error')")
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
