"""Torch dataset over aligned episodes: one item per camera frame with its raw action chunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .bags import Episode
from .stats import NormStats, compute_norm_stats

__all__ = ["DemoDataset", "collate_samples", "compute_norm_stats", "split_episodes", "NormStats"]


class DemoDataset(Dataset):
    """Items: key, image uint8 (C, h, w, 3) (one frame per camera, in the episode's camera order),
    instruction, state float32 (S,) (zeros(0) without state), actions float32 (H, D)
    un-normalised, chunk_valid bool (H,). A collated batch's image is (B, C, h, w, 3).

    Images are shared with the episodes (no copy); normalisation is the model's job.
    """

    def __init__(self, episodes: Sequence[Episode], chunk_size: int) -> None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        if not episodes:
            raise ValueError("DemoDataset: expected at least one episode, got 0")
        dims = {(ep.action_dim, ep.state_dim, ep.images.shape[1:], tuple(ep.camera_topics)) for ep in episodes}
        if len(dims) != 1:
            raise ValueError("DemoDataset: episodes disagree on (action dim, state dim, image shape, cameras): "
                             f"{sorted(map(str, dims))}")
        self.episodes = list(episodes)
        self.chunk_size = int(chunk_size)
        lengths = np.array([len(ep) for ep in self.episodes], dtype=np.int64)
        self._episode_of = np.repeat(np.arange(len(self.episodes)), lengths)
        self._frame_of = np.concatenate([np.arange(n) for n in lengths])

    def __len__(self) -> int:
        return int(self._episode_of.shape[0])

    def locate(self, index: int) -> tuple[int, int]:
        """(episode index, frame index) of a dataset index."""
        return int(self._episode_of[index]), int(self._frame_of[index])

    def key(self, index: int) -> str:
        episode, frame = self.locate(index)
        return self.episodes[episode].sample_key(frame)

    def keys(self) -> list[str]:
        return [key for ep in self.episodes for key in ep.sample_keys()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        episode_index, t = self.locate(index)
        episode = self.episodes[episode_index]
        actions, valid = episode.action_chunk(t, self.chunk_size)
        state = episode.states[t] if episode.states is not None else np.zeros(0, np.float32)
        return {
            "key": episode.sample_key(t),
            "image": torch.from_numpy(episode.images[t]),
            "instruction": episode.instructions[t],
            "state": torch.from_numpy(np.array(state, dtype=np.float32)),
            "actions": torch.from_numpy(actions),
            "chunk_valid": torch.from_numpy(valid),
        }


def collate_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into a batch; keys and instructions stay lists of str."""
    return {
        "key": [item["key"] for item in items],
        "image": torch.stack([item["image"] for item in items]),
        "instruction": [item["instruction"] for item in items],
        "state": torch.stack([item["state"] for item in items]),
        "actions": torch.stack([item["actions"] for item in items]),
        "chunk_valid": torch.stack([item["chunk_valid"] for item in items]),
    }


def split_episodes(episodes: Sequence[Episode], val_fraction: float, seed: int = 0) -> tuple[list[Episode], list[Episode]]:
    """Split by episode (never frames of one episode on both sides); same result for any input order.

    n_val = round(val_fraction * n), at least 1 when val_fraction > 0 and n >= 2, and never all.
    Both lists come back sorted by key.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected 0 <= val_fraction < 1, got {val_fraction}")
    ordered = sorted(episodes, key=lambda ep: ep.key)
    keys = [ep.key for ep in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError("split_episodes: episode keys must be unique")
    n = len(ordered)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    val_set = set(perm[:n_val].tolist())
    train = [ep for i, ep in enumerate(ordered) if i not in val_set]
    val = [ep for i, ep in enumerate(ordered) if i in val_set]
    return train, val
