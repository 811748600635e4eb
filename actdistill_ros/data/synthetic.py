"""Generated demonstrations: a learnable, language-conditioned toy task written as real rosbag2
files. Used by the tests and by `actdistill bench-distill`; also a quick smoke test of a setup
without any recordings.

A bright square sits on a dark background; the instruction names a direction ("move left",
...). The action is that direction as a unit step plus a gripper value that depends on the
square's position, so the policy must read both the image and the instruction. Extra cameras
see the same scene mirrored, on another background and at another resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from actdistill_ros.data.bag_writer import write_episode_bag
from actdistill_ros.data.config import TopicConfig

DIRECTIONS = {"move left": (-1.0, 0.0), "move right": (1.0, 0.0), "move up": (0.0, -1.0), "move down": (0.0, 1.0)}
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_opening"]


def synthetic_episode(seed: int, length: int = 12, size: int = 32):
    rng = np.random.default_rng(seed)
    instruction = list(DIRECTIONS)[seed % len(DIRECTIONS)]
    dx, dy = DIRECTIONS[instruction]
    x, y = rng.uniform(0.3, 0.7, size=2)
    images, states, actions = [], [], []
    for _ in range(length):
        image = np.full((size, size, 3), 20, np.uint8)
        cx, cy = int(x * (size - 6)), int(y * (size - 6))
        image[cy: cy + 6, cx: cx + 6] = (250, 200, 40)
        images.append(image)
        states.append([x, y, 0.0, 1.0])
        actions.append([dx, dy, 0.0, 1.0 if x > 0.5 else -1.0])
        x, y = np.clip(x + 0.02 * dx, 0, 1), np.clip(y + 0.02 * dy, 0, 1)
    return (np.stack(images), instruction, np.asarray(states, np.float32), np.asarray(actions, np.float32))


def camera_view(images: np.ndarray, camera: int) -> np.ndarray:
    """What camera ``camera`` (0 = the scene camera of synthetic_episode) sees of those frames:
    camera k >= 1 sees them mirrored left-right, on a background shifted by 30 grey levels, at
    (16 k) px more resolution."""
    if camera == 0:
        return images
    size = images.shape[1] + 16 * camera
    views = []
    for frame in images:
        view = frame[:, ::-1].astype(np.int16)
        view[(frame == 20).all(axis=2)[:, ::-1]] = 20 + 30 * camera
        views.append(cv2.resize(np.clip(view, 0, 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST))
    return np.stack(views)


def synthetic_camera_frames(seed: int, length: int, size: int, num_cameras: int):
    """synthetic_episode's frames as ``num_cameras`` cameras see them: a list of per-camera
    (T, h, w, 3) arrays, plus the instruction, states and actions."""
    images, instruction, states, actions = synthetic_episode(seed, length, size)
    return [camera_view(images, k) for k in range(num_cameras)], instruction, states, actions


def write_synthetic_demos(out_dir: Path, episodes: int = 8, length: int = 12, storage: str = "mcap",
                          size: int = 32, seed: int = 0, cameras: Sequence[str] | None = None) -> Path:
    """``episodes`` bags in ``out_dir``; ``cameras`` names the camera topics (default: one camera
    on the default topic), each written as `camera_view` renders it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topics = TopicConfig(cameras=list(cameras) if cameras else None)
    for i in range(episodes):
        views, instruction, states, actions = synthetic_camera_frames(seed + i, length, size, topics.num_cameras)
        write_episode_bag(out_dir / f"episode_{seed + i:04d}", images=views[0] if len(views) == 1 else views,
                          instruction=instruction, states=states, actions=actions, fps=10.0, topics=topics,
                          storage=storage, state_names=STATE_NAMES, action_names=ACTION_NAMES)
    return out_dir
