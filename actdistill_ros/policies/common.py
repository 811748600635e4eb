"""What every teacher family shares: the camera input contract and action/state normalisation.

The normalisation statistics live in the model card, not in the weights file: they are
non-persistent buffers that :func:`actdistill_ros.policy.build_model` fills from the card.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def camera_batch(images: Tensor, num_cameras: int, image_size: int) -> Tensor:
    """uint8 RGB (B, C, S, S, 3), or (B, S, S, 3) with one camera -> (B, C, S, S, 3), checked.

    Frames must already be S x S: resizing belongs to ``data.images.resize_rgb``, the one resize
    that training data and run-time frames both go through.
    """
    given = tuple(images.shape)
    if images.dim() == 4 and num_cameras == 1:
        images = images[:, None]
    expected = (num_cameras, image_size, image_size, 3)
    if images.dim() != 5 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images: expected RGB (B, {', '.join(map(str, expected))}) ({num_cameras} camera image(s) "
                         f"per sample, resized to {image_size} px with data.images.resize_rgb), got shape {given}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 RGB (0..255), got {images.dtype}")
    return images


def full_depth_forward(vla, images: Tensor, instructions: list[str], states: Tensor | None) -> Tensor:
    """Every backbone layer, no routing: a teacher's ``forward`` (behaviour cloning) -> normalised
    action chunk (B, H, D). Only protocol members are used, so every family shares it."""
    encoded = vla.encode(images, instructions, states)
    hidden, mask = encoded.tokens, encoded.attention_mask()
    for index in range(vla.num_layers - 1):
        hidden = vla.run_layer(index, hidden, mask)
    return vla.predict_chunk(vla.run_layer(vla.num_layers - 1, hidden, mask, encoded.readout_span))


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


def checked_threshold(value) -> float:
    """The router threshold a caller set (the run-time dial), checked: in [0, 1]."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"router threshold must be in [0, 1], got {value}")
    return value


def checked_keep_fraction(value) -> float:
    """The router keep fraction a caller set (None: 0.0, threshold routing), checked: in [0, 1]."""
    try:
        keep = 0.0 if value is None else float(value)
    except (TypeError, ValueError):
        keep = float("nan")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"router keep_fraction must be a number in [0, 1] (0 = threshold routing), got {value!r}")
    return keep
