"""Generated demonstrations: a learnable, language-conditioned toy task written as real rosbag2
files. Used by the tests and by `actdistill bench-distill`; also a quick smoke test of a setup
without any recordings.

A bright square sits on a dark background; the instruction names a direction ("move left",
...). The action is that direction as a unit step plus a gripper value that depends on the
square's position, so the policy must read both the image and the instruction.
"""

from __future__ import annotations

from pathlib import Path

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


def write_synthetic_demos(out_dir: Path, episodes: int = 8, length: int = 12, storage: str = "mcap",
                          size: int = 32, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(episodes):
        images, instruction, states, actions = synthetic_episode(seed + i, length, size)
        write_episode_bag(out_dir / f"episode_{seed + i:04d}", images=images, instruction=instruction,
                          states=states, actions=actions, fps=10.0, topics=TopicConfig(), storage=storage,
                          state_names=STATE_NAMES, action_names=ACTION_NAMES)
    return out_dir
