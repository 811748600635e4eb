"""Demonstrations for training: rosbags or LeRobotDataset v3 roots -> episodes (train / held-out) ->
datasets, plus the action space a trained policy's card declares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actdistill_ros.data import Episode, NormStats, TopicConfig, compute_norm_stats, read_episodes
from actdistill_ros.data.config import JOINT_STATE_TYPE
from actdistill_ros.data.dataset import DemoDataset, split_episodes
from actdistill_ros.data.lerobot_dataset import LeRobotDatasetReader, is_lerobot_dataset, read_lerobot_episodes
from actdistill_ros.weights import ActionSpace

log = logging.getLogger(__name__)


@dataclass
class Demonstrations:
    train: DemoDataset
    val: DemoDataset | None
    stats: NormStats
    action_names: list[str]
    state_names: list[str]
    camera_names: list[str]  # camera topics (LeRobotDataset: camera feature keys), in the order of each sample's images
    bags: list[str]  # episode keys: bag names, or a LeRobotDataset's episode_NNNNNN


def load_demonstrations(paths: list[str | Path], topics: TopicConfig, image_size: int, chunk_size: int,
                        val_fraction: float, seed: int, progress: bool = True) -> Demonstrations:
    roots = lerobot_roots(paths)
    episodes: list[Episode] = (read_lerobot_episodes(roots, image_size, progress=progress) if roots
                               else read_episodes(paths, topics, image_size, progress=progress))
    if not episodes:
        raise ValueError(f"no rosbag2 directories found under {[str(p) for p in paths]}")
    train, val = split_episodes(episodes, val_fraction, seed)
    stats = compute_norm_stats(train)
    log.info("demonstrations: %d episodes (%d frames) for training, %d held out", len(train),
             sum(len(e) for e in train), len(val))
    return Demonstrations(
        train=DemoDataset(train, chunk_size), val=DemoDataset(val, chunk_size) if val else None, stats=stats,
        action_names=list(episodes[0].action_names), state_names=list(episodes[0].state_names),
        camera_names=list(episodes[0].camera_topics), bags=sorted(e.key for e in episodes))


def lerobot_roots(paths: list[str | Path]) -> list[Path] | None:
    """The LeRobotDataset v3 roots (directories holding meta/info.json) that `paths` name, or None
    when they name rosbags. One run reads one kind."""
    paths = [Path(p) for p in paths]
    roots = [p for p in paths if is_lerobot_dataset(p)]
    if not roots:
        return None
    if len(roots) != len(paths):
        other = next(p for p in paths if not is_lerobot_dataset(p))
        raise ValueError(f"--data: {roots[0]} is a LeRobotDataset root (meta/info.json) but {other} is not; "
                         "expected LeRobotDataset roots only or rosbags only")
    return roots


def demo_cameras(paths: list[str | Path], topics: TopicConfig) -> list[str]:
    """The cameras the demonstrations give, in the model's order, known before any frame is read:
    a LeRobotDataset's camera features (observation.images.*), else the topic config's cameras."""
    roots = lerobot_roots(paths)
    return list(LeRobotDatasetReader(roots[0]).camera_keys) if roots else list(topics.cameras)


def check_policy_takes_demos(paths: list[str | Path], topics: TopicConfig, policy: str, num_cameras: int,
                             action_dim: int, state_dim: int, camera_names: list[str] | None = None) -> None:
    """Refuse, before any frame is read, demonstrations whose inputs the policy does not take: the
    number of cameras (rosbags: the topic config's), and for a LeRobotDataset the action and state
    shapes meta/info.json declares."""
    roots = lerobot_roots(paths)
    if roots is None:
        if topics.num_cameras != num_cameras:
            raise ValueError(f"{policy}: the teacher takes {num_cameras} camera(s) {camera_names or []}, "
                             f"the topics name {topics.num_cameras} {topics.cameras}; give --camera-topic once per camera")
        return
    for root in roots:
        LeRobotDatasetReader(root).check_policy_inputs(str(policy), num_cameras, action_dim, state_dim)


def infer_action_space(preset: str, topics: TopicConfig, names: list[str], stats: NormStats) -> ActionSpace:
    """The card's action space: a named preset, or inferred from the demonstrations.

    Inferred limits are the demonstrated range widened by 10% on each side: the node clamps
    to them, so a policy never commands far outside what it was shown.
    """
    if preset == "metaworld":
        space = ActionSpace.metaworld()
        if len(names) != space.dim:
            raise ValueError(f"--action-space metaworld expects {space.dim} action dims, the demos have {len(names)}")
        return space
    if preset != "auto":
        raise ValueError(f"--action-space must be 'auto' or 'metaworld', got {preset!r}")
    low, high = np.asarray(stats.action_min), np.asarray(stats.action_max)
    margin = 0.1 * np.maximum(high - low, 1e-3)
    kind = "joint" if topics.action_type == JOINT_STATE_TYPE else "end_effector"
    gripper = next((i for i, n in enumerate(names) if "gripper" in n.lower()), None)
    units = ["rad" if kind == "joint" else "m"] * len(names)
    return ActionSpace(kind=kind, names=list(names), units=units, low=(low - margin).tolist(),
                       high=(high + margin).tolist(), gripper_index=gripper)


def add_data_arguments(parser) -> None:
    parser.add_argument("--data", nargs="+", required=True, type=Path,
                        help="rosbag2 directories (one per episode) or directories holding them, or LeRobotDataset "
                             "v3 roots (meta/info.json; the topic flags below apply to rosbags only)")
    parser.add_argument("--topics", type=Path, help="topic config YAML (default: config/topics.yaml defaults)")
    parser.add_argument("--camera-topic", action="append", metavar="TOPIC",
                        help="camera topic; repeat once per camera, in the order the model takes them")
    parser.add_argument("--command-topic")
    parser.add_argument("--state-topic")
    parser.add_argument("--action-topic")
    parser.add_argument("--action-type", help="sensor_msgs/msg/JointState | geometry_msgs/msg/TwistStamped | "
                                              "geometry_msgs/msg/PoseStamped")


BAG_ONLY_FLAGS = ("topics", "camera_topic", "command_topic", "state_topic", "action_topic", "action_type")


def topics_from_args(args) -> TopicConfig:
    given = [f"--{name.replace('_', '-')}" for name in BAG_ONLY_FLAGS if getattr(args, name, None) is not None]
    roots = lerobot_roots(args.data) if given else None
    if roots:
        raise ValueError(f"{', '.join(given)}: name rosbag topics, but --data {roots[0]} is a LeRobotDataset root; its "
                         "cameras, state and actions are its features (see actdistill dataset-info)")
    return TopicConfig.from_yaml(args.topics, cameras=args.camera_topic, command_topic=args.command_topic,
                                 state_topic=args.state_topic, action_topic=args.action_topic,
                                 action_type=args.action_type)
