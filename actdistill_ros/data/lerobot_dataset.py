"""Read LeRobotDataset v3 roots as demonstrations, with pyarrow and PyAV (LeRobot is not needed).

A v3 root, as LeRobot 0.4.x writes it:

    meta/info.json                           fps, features (dtype, shape, names), path templates
    meta/stats.json                          per-feature statistics (optional for reading)
    meta/tasks.parquet                       task strings and their task_index
    meta/episodes/chunk-*/file-*.parquet     one row per episode: length, tasks, where its rows and
                                             video frames are (data/chunk_index, data/file_index,
                                             dataset_from_index, dataset_to_index,
                                             videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp})
    data/chunk-*/file-*.parquet              one row per frame of many episodes: action,
                                             observation.state, timestamp, frame_index,
                                             episode_index, index, task_index (and images stored
                                             as PNG/JPEG bytes for features of dtype "image")
    videos/<key>/chunk-*/file-*.mp4          the frames of many episodes of one camera, one after
                                             the other; an episode's frame at timestamp t is the
                                             video frame at from_timestamp + t

Each episode becomes the `Episode` the rosbag reader produces (data.bags), so training and
distillation have one code path downstream: every camera's frames as uint8 RGB at the policy's
image size (resized with `resize_rgb`, the resize the Policy applies at run time), the state, the
actions, the episode's task as the instruction at every frame, the camera feature keys
(observation.images.*) as camera names and the features' `names` as action/state names.

Anything unusable raises `DatasetError`: one line naming the file and what is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .bags import DROP_REASONS, Episode, _nearest
from .images import resize_rgb

log = logging.getLogger(__name__)

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
ACTION_KEY = "action"
STATE_KEY = "observation.state"
CAMERA_DTYPES = ("video", "image")
# Columns every v3 data file holds besides the features the user recorded.
FRAME_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


class DatasetError(ValueError):
    """A LeRobotDataset root is unusable; the message names the file and what is wrong."""


def is_lerobot_dataset(path: str | Path) -> bool:
    """A LeRobotDataset root: a directory holding meta/info.json."""
    return (Path(path) / INFO_PATH).is_file()


@dataclass(frozen=True)
class Feature:
    """One entry of info.json's `features`."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    names: list[str] | None
    info: dict[str, Any]

    @property
    def is_camera(self) -> bool:
        return self.dtype in CAMERA_DTYPES

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of a camera feature (shape [H, W, C], or [C, H, W] when its names say so)."""
        if self.names is not None and list(self.names)[:1] == ["channels"]:
            return int(self.shape[1]), int(self.shape[2])
        return int(self.shape[0]), int(self.shape[1])

    @property
    def channels(self) -> int:
        if self.names is not None and list(self.names)[:1] == ["channels"]:
            return int(self.shape[0])
        return int(self.shape[-1])

    @property
    def codec(self) -> str | None:
        return self.info.get("video.codec")


@dataclass(frozen=True)
class VideoSpan:
    """Where one episode's frames of one camera are: a file and a time range in it (seconds)."""

    chunk_index: int
    file_index: int
    from_timestamp: float
    to_timestamp: float


@dataclass(frozen=True)
class EpisodeEntry:
    """One row of meta/episodes: an episode and where its rows and frames are."""

    index: int
    length: int
    tasks: list[str]
    data_chunk_index: int
    data_file_index: int
    from_index: int | None
    to_index: int | None
    videos: dict[str, VideoSpan]
    source: Path  # the meta/episodes parquet file this row came from


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _feature_names(raw: Any) -> list[str] | None:
    """info.json `names`: a list, or (older datasets) a mapping holding one list (e.g. {"motors": [...]})."""
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        return list(raw)
    if isinstance(raw, dict) and len(raw) == 1:
        (inner,) = raw.values()
        if isinstance(inner, list) and all(isinstance(n, str) for n in inner):
            return list(inner)
    return None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; expected a LeRobotDataset v3 file here")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ({_first_line(err)})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; expected a LeRobotDataset v3 parquet file here")
    try:
        schema = pq.read_schema(path)
        if columns is not None:
            absent = [c for c in columns if c not in schema.names]
            if absent:
                raise DatasetError(f"{path}: no column {absent[0]!r}; columns present: {', '.join(schema.names)}")
        return pq.read_table(path, columns=columns)
    except DatasetError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{path}: not a readable parquet file ({_first_line(err)})") from None


def _int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if column.null_count or not pa.types.is_integer(column.type):
        raise DatasetError(f"{path}: column {name!r} has type {column.type}"
                           f"{' with nulls' if column.null_count else ''}, expected integers")
    return column.to_numpy().astype(np.int64)


def _float_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if column.null_count or not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise DatasetError(f"{path}: column {name!r} has type {column.type}"
                           f"{' with nulls' if column.null_count else ''}, expected numbers")
    return column.to_numpy().astype(np.float64)


def _vector_column(table: pa.Table, feature: Feature, path: Path) -> np.ndarray:
    """A fixed-size or variable list column (or a scalar one for shape [1]) as float32 (rows, D)."""
    dim = int(feature.shape[0])
    column = table.column(feature.key).combine_chunks()
    rows = len(column)
    if column.null_count:
        raise DatasetError(f"{path}: column {feature.key!r} has {column.null_count} null rows, expected a value per frame")
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values = column.flatten()
        if len(values) != rows * dim or values.null_count:
            raise DatasetError(f"{path}: column {feature.key!r} holds {len(values)} values for {rows} rows, expected "
                               f"{dim} per row (info.json shape [{dim}])")
    elif dim == 1 and (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        values = column
    else:
        raise DatasetError(f"{path}: column {feature.key!r} has type {column.type}, expected a list of {dim} numbers per row")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DatasetError(f"{path}: column {feature.key!r} holds {values.type}, expected numbers")
    array = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(rows, dim)
    if not np.isfinite(array).all():
        raise DatasetError(f"{path}: column {feature.key!r} has NaN/inf, expected finite values")
    return array


def _task_table(path: Path) -> dict[int, str]:
    """meta/tasks.parquet: task_index -> task. LeRobot writes a pandas frame indexed by the task
    string, so the strings are in its index column (named in the pandas metadata) or in `task`."""
    table = _read_parquet(path)
    if "task_index" not in table.column_names:
        raise DatasetError(f"{path}: no column 'task_index'; columns present: {', '.join(table.column_names)}")
    text_column = "task" if "task" in table.column_names else None
    if text_column is None and table.schema.metadata and b"pandas" in table.schema.metadata:
        try:
            index_columns = json.loads(table.schema.metadata[b"pandas"]).get("index_columns", [])
        except ValueError:
            index_columns = []
        text_column = next((c for c in index_columns if isinstance(c, str) and c in table.column_names), None)
    if text_column is None:
        strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        text_column = strings[0] if len(strings) == 1 else None
    if text_column is None:
        raise DatasetError(f"{path}: no task strings (expected a 'task' column or the pandas index of task strings); "
                           f"columns present: {', '.join(table.column_names)}")
    indices = _int_column(table, "task_index", path)
    texts = table.column(text_column).to_pylist()
    if any(not isinstance(t, str) for t in texts):
        raise DatasetError(f"{path}: column {text_column!r} has non-string tasks, expected one string per task")
    return {int(i): t for i, t in zip(indices, texts)}


class LeRobotDatasetReader:
    """The metadata of a LeRobotDataset v3 root, read at construction; frames are read per episode.

    `camera_keys` are the features of dtype video or image, in info.json order (the order a
    LeRobot policy's config lists them, and the order of `Episode.images`' camera axis).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory, expected a LeRobotDataset v3 root (meta/info.json)")
        self.info_path = self.root / INFO_PATH
        self.info = _read_json(self.info_path)
        if not isinstance(self.info, dict):
            raise DatasetError(f"{self.info_path}: expected a JSON object, got {type(self.info).__name__}")
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetError(f"{self.info_path}: codebase_version {version or 'missing'!r}, expected v3.0 "
                               "(convert older datasets with LeRobot's v2.1 -> v3.0 converter)")
        fps = self.info.get("fps")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise DatasetError(f"{self.info_path}: fps {fps!r}, expected a positive number")
        self.fps = float(fps)
        self.features = self._parse_features()
        self.camera_keys = [key for key, f in self.features.items() if f.is_camera]
        self._check_features()
        self.data_path_template = self._template("data_path", ("chunk_index", "file_index"))
        self.video_path_template = (self._template("video_path", ("video_key", "chunk_index", "file_index"))
                                    if any(f.dtype == "video" for f in self.features.values()) else None)
        self.tasks = _task_table(self.root / TASKS_PATH)
        self.stats = self._read_stats()
        self.episodes = self._read_episodes()
        self._data_cache: tuple[Path, pa.Table] | None = None

    # ---- metadata ---------------------------------------------------------------------------
    def _parse_features(self) -> dict[str, Feature]:
        raw = self.info.get("features")
        if not isinstance(raw, dict) or not raw:
            raise DatasetError(f"{self.info_path}: 'features' is {'missing' if raw is None else type(raw).__name__}, "
                               "expected a mapping of feature name -> {dtype, shape, names}")
        features: dict[str, Feature] = {}
        for key, spec in raw.items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if (not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) or not isinstance(shape, list)
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
                raise DatasetError(f"{self.info_path}: feature {key!r} is {spec!r}, expected "
                                   "{dtype: str, shape: [positive ints], names: ...}")
            info = spec.get("info") or {}
            features[key] = Feature(key=key, dtype=spec["dtype"], shape=tuple(shape),
                                    names=_feature_names(spec.get("names")), info=info if isinstance(info, dict) else {})
        return features

    def _check_features(self) -> None:
        """The shapes a policy takes: a vector action, an optional vector state, RGB cameras."""
        action = self.features.get(ACTION_KEY)
        if action is None:
            raise DatasetError(f"{self.info_path}: no feature {ACTION_KEY!r}; features present: {', '.join(self.features)}")
        for feature in filter(None, (action, self.features.get(STATE_KEY))):
            if len(feature.shape) != 1:
                raise DatasetError(f"{self.info_path}: feature {feature.key!r} has shape {list(feature.shape)}, "
                                   "the policy takes a vector [D] per frame")
            if feature.dtype not in ("float32", "float64", "float16", "int32", "int64"):
                raise DatasetError(f"{self.info_path}: feature {feature.key!r} has dtype {feature.dtype!r}, expected numbers (float32)")
        if not self.camera_keys:
            raise DatasetError(f"{self.info_path}: no camera feature (dtype video or image); features present: "
                               f"{', '.join(self.features)}; the policy takes at least one camera")
        for key in self.camera_keys:
            feature = self.features[key]
            if len(feature.shape) != 3 or feature.channels != 3 or feature.info.get("video.is_depth_map"):
                raise DatasetError(f"{self.info_path}: camera feature {key!r} has shape {list(feature.shape)}"
                                   f"{' (a depth map)' if feature.info.get('video.is_depth_map') else ''}, "
                                   "the policy takes RGB frames [height, width, 3]")

    def _template(self, name: str, fields: tuple[str, ...]) -> str:
        template = self.info.get(name)
        if not isinstance(template, str) or not template:
            raise DatasetError(f"{self.info_path}: {name!r} is {template!r}, expected a path template with "
                               f"{', '.join('{' + f + '}' for f in fields)}")
        try:
            template.format(**{f: 0 if f != "video_key" else "k" for f in fields})
        except (KeyError, IndexError, ValueError) as err:
            raise DatasetError(f"{self.info_path}: {name!r} {template!r} is not a path template of "
                               f"{', '.join(fields)} ({_first_line(err)})") from None
        return template

    def _read_stats(self) -> dict[str, dict[str, Any]] | None:
        """meta/stats.json when present (the policy's own statistics come from the training split)."""
        path = self.root / STATS_PATH
        if not path.exists():
            return None
        stats = _read_json(path)
        if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
            raise DatasetError(f"{path}: expected a mapping of feature -> {{stat: values}}")
        return stats

    def _read_episodes(self) -> list[EpisodeEntry]:
        directory = self.root / EPISODES_DIR
        files = sorted(directory.glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{directory}: no chunk-*/file-*.parquet episode files, expected the v3 episode table")
        video_keys = [k for k in self.camera_keys if self.features[k].dtype == "video"]
        columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        for key in video_keys:
            columns += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
        entries: dict[int, EpisodeEntry] = {}
        for path in files:
            schema_names = self._schema_names(path)
            optional = [c for c in ("tasks", "dataset_from_index", "dataset_to_index") if c in schema_names]
            table = _read_parquet(path, columns + optional)
            ints = {c: _int_column(table, c, path) for c in columns if not c.endswith("_timestamp")}
            for c in optional:
                if c != "tasks":
                    ints[c] = _int_column(table, c, path)
            floats = {c: _float_column(table, c, path) for c in columns if c.endswith("_timestamp")}
            tasks = table.column("tasks").to_pylist() if "tasks" in optional else [None] * table.num_rows
            for row in range(table.num_rows):
                index = int(ints["episode_index"][row])
                if index in entries:
                    raise DatasetError(f"{path}: episode {index} is listed twice (also in {entries[index].source})")
                length = int(ints["length"][row])
                if length <= 0:
                    raise DatasetError(f"{path}: episode {index} has length {length}, expected at least one frame")
                videos = {key: VideoSpan(int(ints[f"videos/{key}/chunk_index"][row]),
                                         int(ints[f"videos/{key}/file_index"][row]),
                                         float(floats[f"videos/{key}/from_timestamp"][row]),
                                         float(floats[f"videos/{key}/to_timestamp"][row])) for key in video_keys}
                entries[index] = EpisodeEntry(
                    index=index, length=length, tasks=[str(t) for t in (tasks[row] or [])],
                    data_chunk_index=int(ints["data/chunk_index"][row]), data_file_index=int(ints["data/file_index"][row]),
                    from_index=int(ints["dataset_from_index"][row]) if "dataset_from_index" in ints else None,
                    to_index=int(ints["dataset_to_index"][row]) if "dataset_to_index" in ints else None,
                    videos=videos, source=path)
        if not entries:
            raise DatasetError(f"{files[0]}: no episodes (0 rows in {len(files)} episode file(s)), expected at least one")
        return [entries[i] for i in sorted(entries)]

    @staticmethod
    def _schema_names(path: Path) -> list[str]:
        if not path.is_file():
            raise DatasetError(f"{path}: missing; expected a LeRobotDataset v3 parquet file here")
        try:
            return pq.read_schema(path).names
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{path}: not a readable parquet file ({_first_line(err)})") from None

    # ---- paths ------------------------------------------------------------------------------
    @property
    def action_feature(self) -> Feature:
        return self.features[ACTION_KEY]

    @property
    def state_feature(self) -> Feature | None:
        return self.features.get(STATE_KEY)

    @property
    def action_names(self) -> list[str]:
        return self._names(self.action_feature, "action")

    @property
    def state_names(self) -> list[str]:
        return self._names(self.state_feature, "state") if self.state_feature is not None else []

    @staticmethod
    def _names(feature: Feature, fallback: str) -> list[str]:
        if feature.names is not None and len(feature.names) == feature.shape[0]:
            return list(feature.names)
        return [f"{fallback}_{i}" for i in range(feature.shape[0])]

    @property
    def num_frames(self) -> int:
        return sum(e.length for e in self.episodes)

    def episode(self, index: int) -> EpisodeEntry:
        for entry in self.episodes:
            if entry.index == index:
                return entry
        raise DatasetError(f"dataset {self.root}: no episode {index}; {self.episode_range()}")

    def episode_range(self) -> str:
        """The valid episode indices, in words: ``36 episode(s), indices 0..35`` (or the indices listed,
        where some are absent)."""
        indices = [e.index for e in self.episodes]
        if indices == list(range(indices[0], indices[-1] + 1)):
            return f"{len(indices)} episode(s), indices {indices[0]}..{indices[-1]}"
        known = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        return f"{len(indices)} episode(s), indices {known}"

    def data_file(self, entry: EpisodeEntry) -> Path:
        return self.root / self.data_path_template.format(chunk_index=entry.data_chunk_index,
                                                          file_index=entry.data_file_index)

    def video_file(self, key: str, entry: EpisodeEntry) -> Path:
        span = entry.videos[key]
        return self.root / self.video_path_template.format(video_key=key, chunk_index=span.chunk_index,
                                                           file_index=span.file_index)

    def referenced_files(self) -> list[Path]:
        """Every data and video file the episode table points to (each once, in order)."""
        files: dict[Path, None] = {}
        for entry in self.episodes:
            files[self.data_file(entry)] = None
            for key in entry.videos:
                files[self.video_file(key, entry)] = None
        return list(files)

    def check_files(self) -> None:
        """Every referenced data and video file exists (no decoding)."""
        for path in self.referenced_files():
            if not path.is_file():
                raise DatasetError(f"{path}: missing; {self.root / EPISODES_DIR} lists episodes in it")

    def check_policy_inputs(self, policy: str, num_cameras: int, action_dim: int, state_dim: int) -> None:
        """The features' shapes are what `policy` takes: its camera count, action dim and (when it
        takes a state) state dim."""
        state = self.state_feature
        if self.action_feature.shape[0] != action_dim:
            raise DatasetError(f"{self.info_path}: feature {ACTION_KEY!r} has shape {list(self.action_feature.shape)}, "
                               f"{policy} predicts [{action_dim}]")
        if state_dim and (state is None or state.shape[0] != state_dim):
            have = f"has shape {list(state.shape)}" if state is not None else "is missing"
            raise DatasetError(f"{self.info_path}: feature {STATE_KEY!r} {have}, {policy} takes [{state_dim}]")
        if len(self.camera_keys) != num_cameras:
            raise DatasetError(f"{self.info_path}: {len(self.camera_keys)} camera feature(s) {self.camera_keys}, "
                               f"{policy} takes {num_cameras}")

    # ---- frames -----------------------------------------------------------------------------
    def _data_table(self, path: Path) -> pa.Table:
        # Episodes of one file are read one after the other: keep the last file's table.
        if self._data_cache is None or self._data_cache[0] != path:
            columns = [c for c in FRAME_COLUMNS if c != "index"] + [ACTION_KEY]
            columns += [STATE_KEY] if self.state_feature is not None else []
            columns += [k for k in self.camera_keys if self.features[k].dtype == "image"]
            optional = ["index"] if "index" in self._schema_names(path) else []
            self._data_cache = (path, _read_parquet(path, columns + optional))
        return self._data_cache[1]

    def read_rows(self, entry: EpisodeEntry) -> dict[str, Any]:
        """An episode's rows of its data file, in frame order: timestamps (s), task_index, action,
        state, and the table itself (for image features)."""
        path = self.data_file(entry)
        table = self._data_table(path)
        mask = _int_column(table, "episode_index", path) == entry.index
        rows = table.filter(pa.array(mask))
        if rows.num_rows != entry.length:
            raise DatasetError(f"{path}: holds {rows.num_rows} rows of episode {entry.index}, {entry.source.name} "
                               f"says its length is {entry.length}")
        frame_index = _int_column(rows, "frame_index", path)
        order = np.argsort(frame_index, kind="stable")
        if not np.array_equal(frame_index[order], np.arange(entry.length)):
            raise DatasetError(f"{path}: episode {entry.index} has frame_index values {frame_index[order][:5].tolist()}..., "
                               f"expected 0..{entry.length - 1}")
        rows = rows.take(pa.array(order))
        if "index" in rows.column_names and entry.from_index is not None:
            index = _int_column(rows, "index", path)
            if index[0] != entry.from_index or (entry.to_index is not None and index[-1] != entry.to_index - 1):
                raise DatasetError(f"{path}: episode {entry.index} has rows index {index[0]}..{index[-1]}, "
                                   f"{entry.source.name} says dataset_from_index {entry.from_index} to {entry.to_index}")
        timestamps = _float_column(rows, "timestamp", path)
        if entry.length > 1 and not (np.diff(timestamps) > 0).all():
            raise DatasetError(f"{path}: episode {entry.index} timestamps do not increase with frame_index, "
                               "expected one timestamp per frame")
        task_index = _int_column(rows, "task_index", path)
        unknown = sorted(set(task_index.tolist()) - set(self.tasks))
        if unknown:
            raise DatasetError(f"{path}: episode {entry.index} uses task_index {unknown[0]}, which "
                               f"{self.root / TASKS_PATH} does not list")
        return {
            "timestamps": timestamps, "task_index": task_index,
            "action": _vector_column(rows, self.action_feature, path),
            "state": _vector_column(rows, self.state_feature, path) if self.state_feature is not None else None,
            "table": rows,
        }

    def decode_video(self, key: str, entry: EpisodeEntry, timestamps: np.ndarray,
                     target_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Frames of camera `key` at the episode's `timestamps` (s from its start): uint8 (T, h, w, 3) RGB,
        resized to `target_hw` with `resize_rgb`. Each timestamp takes the nearest video frame,
        which must lie within half a frame period of it."""
        path = self.video_file(key, entry)
        span = entry.videos[key]
        codec = self.features[key].codec
        query = span.from_timestamp + np.asarray(timestamps, dtype=np.float64)
        tolerance = 0.5 / self.fps
        if not path.is_file():
            raise DatasetError(f"{path}: missing; {entry.source.name} puts episode {entry.index}'s {key!r} frames in it")
        try:
            container = av.open(str(path))
        except av.FFmpegError as err:
            raise DatasetError(f"{path}: not a readable video ({_first_line(err)})") from None
        try:
            return self._decode_open(container, path, key, entry, query, tolerance, codec, target_hw)
        except av.FFmpegError as err:
            raise DatasetError(f"{path}: cannot decode the {codec or 'video'} stream of episode {entry.index} "
                               f"({_first_line(err)}); expected an intact video") from None
        finally:
            container.close()

    def _decode_open(self, container, path: Path, key: str, entry: EpisodeEntry, query: np.ndarray,
                     tolerance: float, codec: str | None, target_hw: tuple[int, int] | None) -> np.ndarray:
        if not container.streams.video:
            raise DatasetError(f"{path}: no video stream, expected the {key!r} frames")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            # FFmpeg found a stream whose codec it does not know (no decoder here at all).
            raise DatasetError(f"{path}: the video codec is unknown to the FFmpeg in PyAV {av.__version__}"
                               f"{f' (info.json says {codec!r})' if codec else ''}; expected one it decodes "
                               "(av1, h264, hevc, vp9, mpeg4, ...)")
        stream.thread_type = "AUTO"
        start, end = float(query[0]) - tolerance, float(query[-1]) + tolerance
        if stream.time_base is not None and start > 0:
            # Lands on the last keyframe before `start`; the frames up to `start` are decoded and skipped.
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        times: list[float] = []
        frames: list[np.ndarray] = []
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base)
            if t < start:
                continue
            if t > end:
                break
            image = frame.to_ndarray(format="rgb24")
            frames.append(image if target_hw is None else resize_rgb(image, target_hw))
            times.append(t)
        decoded = np.asarray(times)
        if decoded.size == 0:
            raise DatasetError(f"{path}: no frame between {start:.3f} s and {end:.3f} s, episode {entry.index} "
                               f"needs {len(query)} frames from {query[0]:.3f} s ({entry.source.name} "
                               f"from_timestamp); the video is shorter than its episode")
        # Nearest decoded frame of each query, by binary search (an episode may hold many thousand frames).
        order = np.argsort(decoded, kind="stable")
        pick, distance = _nearest(decoded[order], query)
        nearest = order[pick]
        late = np.flatnonzero(distance > tolerance)
        if late.size:
            first = int(late[0])
            shorter = query[first] > decoded[-1]
            raise DatasetError(
                f"{path}: episode {entry.index} frame {first} is at {query[first]:.3f} s but the nearest video frame "
                f"is at {decoded[nearest[first]]:.3f} s (decoded {decoded.size} frames from {decoded[0]:.3f} to "
                f"{decoded[-1]:.3f} s); " + ("the video is shorter than its episode" if shorter else
                                             f"expected a frame every {1 / self.fps:.3f} s"))
        return np.stack([frames[i] for i in nearest])

    def decode_images(self, key: str, entry: EpisodeEntry, table: pa.Table,
                      target_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Frames of an image-dtype camera: PNG/JPEG bytes in the data file's column `key`."""
        path = self.data_file(entry)
        column = table.column(key).combine_chunks()
        if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
            raise DatasetError(f"{path}: column {key!r} has type {column.type}, expected images as struct<bytes, path>")
        frames = []
        for t, data in enumerate(column.field("bytes").to_pylist()):
            image = None if data is None else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise DatasetError(f"{path}: column {key!r} row {t} of episode {entry.index} is not an encoded image "
                                   "(expected PNG/JPEG bytes)")
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            frames.append(image if target_hw is None else resize_rgb(image, target_hw))
        return np.stack(frames)

    def read_episode(self, index: int, image_size: int | None = None, *, key_prefix: str = "",
                     _target_hw: tuple[int, int] | None = None) -> Episode:
        """Episode `index` as the rosbag reader's Episode: every camera's frames at
        (image_size, image_size) (None: the first camera's size), actions, state, tasks."""
        entry = self.episode(index)
        if image_size is not None:
            if int(image_size) <= 0:
                raise ValueError(f"image_size: expected a positive int or None, got {image_size}")
            _target_hw = (int(image_size), int(image_size))
        target_hw = _target_hw or self.features[self.camera_keys[0]].image_hw
        rows = self.read_rows(entry)
        per_camera = []
        for key in self.camera_keys:
            if self.features[key].dtype == "video":
                per_camera.append(self.decode_video(key, entry, rows["timestamps"], target_hw))
            else:
                per_camera.append(self.decode_images(key, entry, rows["table"], target_hw))
        images = np.ascontiguousarray(np.stack(per_camera, axis=1))
        instructions = [self.tasks[int(i)] for i in rows["task_index"]]
        return Episode(
            key=f"{key_prefix}episode_{entry.index:06d}", camera_topics=list(self.camera_keys), images=images,
            instructions=instructions, actions=rows["action"], states=rows["state"],
            # float32 seconds hold no more than microseconds: 0.1 s is 100000000 ns, not 100000001.
            stamps_ns=np.round(rows["timestamps"] * 1e6).astype(np.int64) * 1000,
            action_names=self.action_names, state_names=self.state_names,
            source_image_sizes=[self.features[k].image_hw for k in self.camera_keys],
            dropped_frames=dict.fromkeys(DROP_REASONS, 0), bag_path=None)

    # ---- summary ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What `actdistill dataset-info --json` prints."""
        return {
            "root": str(self.root),
            "codebase_version": self.info.get("codebase_version"),
            "robot_type": self.info.get("robot_type"),
            "fps": self.fps,
            "num_episodes": len(self.episodes),
            "num_frames": self.num_frames,
            "cameras": list(self.camera_keys),
            "action_names": self.action_names,
            "state_names": self.state_names,
            "features": {key: {"dtype": f.dtype, "shape": list(f.shape), "names": f.names,
                               **({"codec": f.codec} if f.codec else {})} for key, f in self.features.items()},
            "tasks": [{"task_index": i, "task": t} for i, t in sorted(self.tasks.items())],
            "episodes": [{"episode_index": e.index, "length": e.length, "duration_s": round(e.length / self.fps, 6),
                          "tasks": e.tasks} for e in self.episodes],
            "stats": {key: sorted(values) for key, values in (self.stats or {}).items()},
        }


def read_lerobot_episodes(roots: str | Path | Iterable[str | Path], image_size: int | None = None,
                          episodes: Sequence[int] | None = None, *, progress: bool = True) -> list[Episode]:
    """Episodes of one or more LeRobotDataset v3 roots, like `bags.read_episodes` reads bags.

    With several roots their episodes are keyed `<root name>/episode_NNNNNN` and must agree on
    cameras and action/state names. `episodes` picks episode indices (of every root).
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    readers = [LeRobotDatasetReader(root) for root in roots]
    names = [r.root.name for r in readers]
    if len(set(names)) != len(names):
        raise DatasetError(f"{readers[0].root}: dataset names repeat ({names}), expected distinct root names (they key the samples)")
    first = readers[0]
    for reader in readers[1:]:
        for what in ("camera_keys", "action_names", "state_names"):
            if getattr(reader, what) != getattr(first, what):
                raise DatasetError(f"{reader.info_path}: {what} {getattr(reader, what)}, expected "
                                   f"{getattr(first, what)} like {first.info_path}")
    target_hw = (int(image_size), int(image_size)) if image_size is not None else \
        first.features[first.camera_keys[0]].image_hw
    jobs = [(reader, index) for reader in readers
            for index in (episodes if episodes is not None else [e.index for e in reader.episodes])]
    out: list[Episode] = []
    for reader, index in tqdm(jobs, desc="reading episodes", unit="episode", file=sys.stderr,
                              disable=not progress, dynamic_ncols=True):
        prefix = f"{reader.root.name}/" if len(readers) > 1 else ""
        out.append(reader.read_episode(index, key_prefix=prefix, _target_hw=target_hw))
    return out


# ---- `actdistill dataset-info` -----------------------------------------------------------------
def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"LeRobotDataset {summary['codebase_version']} at {summary['root']}: {summary['num_episodes']} episodes, "
             f"{summary['num_frames']} frames at {summary['fps']:g} fps"
             + (f", robot {summary['robot_type']}" if summary.get("robot_type") else "")]
    lines.append("features:")
    width = max(len(k) for k in summary["features"])
    for key, f in summary["features"].items():
        extra = f"  codec {f['codec']}" if f.get("codec") else ""
        names = f"  names {', '.join(f['names'])}" if f.get("names") else ""
        lines.append(f"  {key:<{width}}  {f['dtype']:<8} {str(f['shape']):<14}{extra}{names}")
    lines.append("tasks:")
    lines += [f"  {t['task_index']:>4}  {t['task']}" for t in summary["tasks"]]
    lines.append("episodes:")
    for e in summary["episodes"]:
        lines.append(f"  {e['episode_index']:>6}  {e['length']:>6} frames  {e['duration_s']:8.2f} s  "
                     f"{'; '.join(e['tasks'])}")
    if summary["stats"]:
        lines.append("stats (meta/stats.json): " + ", ".join(summary["stats"]))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dataset-info", help="episodes, frame counts, fps, features and tasks of a LeRobotDataset v3 root")
    p.add_argument("root", type=Path, help="LeRobotDataset v3 root (holds meta/info.json)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_dataset_info)


def run_dataset_info(args: argparse.Namespace) -> int:
    if not is_lerobot_dataset(args.root):
        raise DatasetError(f"{Path(args.root) / INFO_PATH}: missing; expected a LeRobotDataset v3 root")
    reader = LeRobotDatasetReader(args.root)
    reader.check_files()
    summary = reader.summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
