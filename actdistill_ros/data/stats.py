"""Normalisation statistics over training episodes (JSON-friendly, torch-free)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .bags import Episode

# Absolute floor on every std. A dimension that never moves in the demos (e.g. a gripper held
# open) would otherwise divide by ~0 and blow tiny noise up; 1e-3 is far below any meaningful
# variation of the units used here (normalised deltas, rad, m) and keeps normalised values bounded.
STD_FLOOR = 1e-3


@dataclass
class NormStats:
    """Per-dimension action and state statistics; the model normalises with mean/std.

    std values are already floored at `std_floor`. State lists are empty when demos have no state.
    """

    action_mean: list[float]
    action_std: list[float]
    action_min: list[float]
    action_max: list[float]
    state_mean: list[float] = field(default_factory=list)
    state_std: list[float] = field(default_factory=list)
    num_frames: int = 0
    num_episodes: int = 0
    std_floor: float = STD_FLOOR

    def __post_init__(self) -> None:
        dim = len(self.action_mean)
        if dim == 0:
            raise ValueError("NormStats: expected at least one action dimension, got 0")
        for name in ("action_std", "action_min", "action_max"):
            if len(getattr(self, name)) != dim:
                raise ValueError(f"NormStats.{name}: expected {dim} values, got {len(getattr(self, name))}")
        if len(self.state_mean) != len(self.state_std):
            raise ValueError(f"NormStats: state_mean has {len(self.state_mean)} values but state_std {len(self.state_std)}")
        for name in ("action_mean", "action_std", "action_min", "action_max", "state_mean", "state_std"):
            values = [float(v) for v in getattr(self, name)]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"NormStats.{name}: expected finite values, got {values}")
            setattr(self, name, values)
        if any(s <= 0 for s in self.action_std + self.state_std):
            raise ValueError("NormStats: expected std > 0 in every dimension")

    @property
    def action_dim(self) -> int:
        return len(self.action_mean)

    @property
    def state_dim(self) -> int:
        return len(self.state_mean)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return ((np.asarray(actions, np.float32) - np.float32(self.action_mean)) / np.float32(self.action_std)).astype(np.float32)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return (np.asarray(actions, np.float32) * np.float32(self.action_std) + np.float32(self.action_mean)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action_mean": list(self.action_mean), "action_std": list(self.action_std),
            "action_min": list(self.action_min), "action_max": list(self.action_max),
            "state_mean": list(self.state_mean), "state_std": list(self.state_std),
            "num_frames": int(self.num_frames), "num_episodes": int(self.num_episodes),
            "std_floor": float(self.std_floor),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormStats":
        if not isinstance(data, dict):
            raise ValueError(f"NormStats: expected a mapping, got {type(data).__name__}")
        known = {"action_mean", "action_std", "action_min", "action_max", "state_mean", "state_std",
                 "num_frames", "num_episodes", "std_floor"}
        unknown = sorted(set(data) - known)
        missing = sorted({"action_mean", "action_std", "action_min", "action_max"} - set(data))
        if unknown or missing:
            raise ValueError(f"NormStats: unknown keys {unknown}, missing keys {missing}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"NormStats: {err}") from None


def compute_norm_stats(episodes: Sequence["Episode"], std_floor: float = STD_FLOOR) -> NormStats:
    """Statistics over every aligned frame of `episodes` (the training split only)."""
    if not episodes:
        raise ValueError("compute_norm_stats: expected at least one episode, got 0")
    action_dims = {ep.actions.shape[1] for ep in episodes}
    state_dims = {0 if ep.states is None else ep.states.shape[1] for ep in episodes}
    if len(action_dims) != 1 or len(state_dims) != 1:
        raise ValueError(f"compute_norm_stats: episodes disagree on dims (action {sorted(action_dims)}, state {sorted(state_dims)})")
    actions = np.concatenate([ep.actions for ep in episodes]).astype(np.float64)
    stats: dict[str, Any] = {
        "action_mean": actions.mean(0).tolist(),
        "action_std": np.maximum(actions.std(0), std_floor).tolist(),
        "action_min": actions.min(0).tolist(),
        "action_max": actions.max(0).tolist(),
    }
    if state_dims != {0}:
        states = np.concatenate([ep.states for ep in episodes]).astype(np.float64)
        stats["state_mean"] = states.mean(0).tolist()
        stats["state_std"] = np.maximum(states.std(0), std_floor).tolist()
    return NormStats(**stats, num_frames=int(actions.shape[0]), num_episodes=len(episodes), std_floor=float(std_floor))
