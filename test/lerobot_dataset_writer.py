"""Test helper: write a tiny LeRobotDataset v3 root the way LeRobot 0.4.x lays it out, with
pyarrow and PyAV only (LeRobot is not installed here).

Every episode's rows share one data parquet file and every camera's frames share one mp4 file,
one episode after the other, located by from/to timestamps, as LeRobot writes them once it
concatenates episodes. Frames are smooth colour ramps (what lossy 4:2:0 video keeps well) whose
blue level codes the frame's position in its video file, so a reader's frame timing can be
checked exactly through the codec: `frame_number(image)` reads the position back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CAMERAS = {"observation.images.top": (48, 64), "observation.images.wrist": (32, 40)}
ACTION_NAMES = ["x", "y", "z", "gripper"]
STATE_NAMES = ["joint_0", "joint_1", "joint_2"]
TASKS = ["pick up the red cube", "open the drawer"]
CODEC_NAMES = {"libsvtav1": "av1", "libx264": "h264"}  # encoder -> info.json video.codec
BLUE_BASE, BLUE_STEP = 16, 6  # frame n of a file has blue level 16 + 6 n: 40 frames fit in 8 bits


def video_codec() -> str:
    """LeRobot's default (AV1 via libsvtav1) when this PyAV encodes and decodes it, else H.264, else MPEG-4."""
    available = av.codecs_available
    if "libsvtav1" in available and ({"libdav1d", "libaom-av1"} & available):
        return "libsvtav1"
    return "libx264" if "libx264" in available else "mpeg4"


def camera_frame(height: int, width: int, number: int, camera: int) -> np.ndarray:
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    red = np.broadcast_to(40 + 150 * x + 10 * camera, (height, width))
    green = np.broadcast_to(40 + 150 * y, (height, width))
    blue = np.full((height, width), BLUE_BASE + BLUE_STEP * number, dtype=np.float64)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


def frame_number(image: np.ndarray) -> int:
    """The file position a `camera_frame` was made for, read back from its blue level."""
    return int(round((float(image[..., 2].mean()) - BLUE_BASE) / BLUE_STEP))


def encode_video(path: Path, frames: np.ndarray, fps: int, codec: str | None = None, gop: int = 2) -> None:
    """frames uint8 (T, H, W, 3) RGB -> mp4, a keyframe every `gop` frames (LeRobot's g=2 by default)."""
    codec = codec or video_codec()
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
    options = {"g": str(gop)}
    options.update({"libsvtav1": {"crf": "20", "preset": "12"}, "libx264": {"crf": "10"},
                    "mpeg4": {"b": "4M"}}.get(codec, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _vectors(values: np.ndarray) -> pa.Array:
    """(N, D) float32 -> fixed_size_list<float32>[D], the arrow type of a datasets Sequence(length=D)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])


def _stats(values: np.ndarray) -> dict[str, list]:
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [int(values.shape[0])]}


def write_lerobot_dataset(root: Path, lengths: tuple[int, ...] = (10, 12, 14), fps: int = 10,
                          cameras: dict[str, tuple[int, int]] | None = None, codec: str | None = None,
                          seed: int = 0, gop: int = 2, action_names: list[str] | None = None,
                          state_names: list[str] | None = None) -> dict[str, Any]:
    """Write the dataset; returns what was written: per-episode actions, states, frames per camera,
    task strings, and the codec used. ``action_names``/``state_names`` (default ACTION_NAMES,
    STATE_NAMES) name the features; LeRobot's arms record both with the same joint names."""
    cameras = dict(cameras or CAMERAS)
    action_names, state_names = list(action_names or ACTION_NAMES), list(state_names or STATE_NAMES)
    codec = codec or video_codec()
    rng = np.random.default_rng(seed)
    episode_tasks = [TASKS[i % 2] for i in range(len(lengths))]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(starts[-1])
    spread, offset = np.resize([1.0, 2.0, 0.5, 0.1], len(action_names)), np.resize([0, 1, -1, 0.5], len(action_names))
    actions = (rng.normal(0.0, 1.0, (total, len(action_names))).astype(np.float32) * spread + offset).astype(np.float32)
    states = np.cumsum(rng.normal(0.0, 0.1, (total, len(state_names))), axis=0).astype(np.float32)
    frames = {key: np.stack([camera_frame(h, w, n, c) for n in range(total)]) for c, (key, (h, w)) in enumerate(cameras.items())}

    features = {
        "action": {"dtype": "float32", "shape": [len(action_names)], "names": action_names},
        "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": state_names},
    }
    for key, (h, w) in cameras.items():
        features[key] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                         "info": {"video.height": h, "video.width": w,
                                  "video.codec": CODEC_NAMES.get(codec, codec),
                                  "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                  "video.channels": 3, "has_audio": False}}
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    info = {
        "codebase_version": "v3.0", "robot_type": "tiny_arm", "total_episodes": len(lengths), "total_frames": total,
        "total_tasks": len(set(episode_tasks)), "chunks_size": 1000, "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features,
    }
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))

    task_index = {task: i for i, task in enumerate(dict.fromkeys(episode_tasks))}
    stats = {"action": _stats(actions), "observation.state": _stats(states)}
    for key, video in frames.items():  # LeRobot keeps image stats per channel, shape (3, 1, 1), in [0, 1]
        pixels = video.reshape(-1, 3) / 255.0
        stats[key] = {s: np.asarray(v).reshape(3, 1, 1).tolist() if s != "count" else v
                      for s, v in _stats(pixels).items()}
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))

    # A pandas frame indexed by the task string, as LeRobot writes it (an unnamed index).
    tasks_table = pa.table({"task_index": pa.array(list(task_index.values()), pa.int64()),
                            "__index_level_0__": pa.array(list(task_index), pa.string())})
    pandas_meta = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": []}
    pq.write_table(tasks_table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()}),
                   root / "meta" / "tasks.parquet")

    episode_index = np.repeat(np.arange(len(lengths)), lengths)
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    data = pa.table({
        "action": _vectors(actions), "observation.state": _vectors(states),
        "timestamp": pa.array((frame_index / fps).astype(np.float32)), "frame_index": pa.array(frame_index),
        "episode_index": pa.array(episode_index), "index": pa.array(np.arange(total)),
        "task_index": pa.array([task_index[episode_tasks[e]] for e in episode_index], pa.int64()),
    })
    data_path = root / "data" / "chunk-000" / "file-000.parquet"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, data_path)

    for key, video in frames.items():
        encode_video(root / "videos" / key / "chunk-000" / "file-000.mp4", video, fps, codec, gop)

    columns: dict[str, list] = {"episode_index": list(range(len(lengths))), "tasks": [[t] for t in episode_tasks],
                                "length": list(lengths), "data/chunk_index": [0] * len(lengths),
                                "data/file_index": [0] * len(lengths),
                                "dataset_from_index": starts[:-1].tolist(), "dataset_to_index": starts[1:].tolist()}
    for key in cameras:
        columns[f"videos/{key}/chunk_index"] = [0] * len(lengths)
        columns[f"videos/{key}/file_index"] = [0] * len(lengths)
        columns[f"videos/{key}/from_timestamp"] = (starts[:-1] / fps).tolist()
        columns[f"videos/{key}/to_timestamp"] = (starts[1:] / fps).tolist()
    columns["meta/episodes/chunk_index"] = [0] * len(lengths)
    columns["meta/episodes/file_index"] = [0] * len(lengths)
    columns["stats/action/mean"] = [actions[a:b].mean(0).tolist() for a, b in zip(starts[:-1], starts[1:])]
    episodes_path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), episodes_path)

    def split(values: np.ndarray) -> list[np.ndarray]:
        return [values[a:b] for a, b in zip(starts[:-1], starts[1:])]

    return {"actions": split(actions), "states": split(states), "tasks": episode_tasks, "codec": codec,
            "frames": {key: split(video) for key, video in frames.items()}, "starts": starts[:-1].tolist(),
            "stats": stats, "fps": fps}
