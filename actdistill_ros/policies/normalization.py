"""Action and state normalisation shared by every teacher family.

The statistics live in the model card, not in the weights file: they are non-persistent buffers
that :func:`actdistill_ros.policy.build_model` fills from the card.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NormalizationMixin:
    """For an ``nn.Module``: ``action_mean/std`` and ``state_mean/std`` buffers and their use."""

    def register_normalization(self: nn.Module, action_dim: int, state_dim: int) -> None:
        self.register_buffer("action_mean", torch.zeros(action_dim), persistent=False)
        self.register_buffer("action_std", torch.ones(action_dim), persistent=False)
        self.register_buffer("state_mean", torch.zeros(state_dim), persistent=False)
        self.register_buffer("state_std", torch.ones(state_dim), persistent=False)

    def set_normalization(self, stats: dict) -> None:
        """Load action/state mean and std (lists, as stored in the card)."""
        for name in ("action_mean", "action_std", "state_mean", "state_std"):
            buffer = getattr(self, name)
            value = torch.as_tensor(stats.get(name, buffer.tolist()), dtype=torch.float32)
            if value.shape != buffer.shape:
                raise ValueError(f"normalisation {name} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value)

    def normalize_actions(self, actions: Tensor) -> Tensor:
        return (actions - self.action_mean) / self.action_std

    def unnormalize_actions(self, actions: Tensor) -> Tensor:
        return actions * self.action_std + self.action_mean

    def normalize_states(self, states: Tensor) -> Tensor:
        """Float32 arithmetic whatever the compute dtype (the statistics stay float32)."""
        return (states.to(device=self.state_mean.device, dtype=torch.float32) - self.state_mean) / self.state_std
