"""Demonstration data: rosbag2 reading/writing (torch-free) and the torch dataset (data.dataset)."""

from .bag_writer import write_episode_bag
from .bags import Episode, list_bags, read_episode, read_episodes, summarize_drops
from .config import BagDataError, TopicConfig
from .stats import NormStats, compute_norm_stats

__all__ = [
    "BagDataError",
    "Episode",
    "NormStats",
    "TopicConfig",
    "compute_norm_stats",
    "list_bags",
    "read_episode",
    "read_episodes",
    "summarize_drops",
    "write_episode_bag",
]
