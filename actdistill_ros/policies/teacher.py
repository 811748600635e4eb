"""What a VLA must provide to be routed (policy.py), probed and distilled (distill/).

Kept narrow on purpose: an adapter for another VLA family (LLaMA-based OpenVLA, a diffusion-head
policy, ...) implements these members around its own modules. Beyond them, distillation reads the
sizes in ``config`` (width, layers, chunk, action dim) and ``freeze_vision: true`` freezes the
reference VLA's patch embedding; those two touch points are what an adapter must map as well.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from actdistill_ros.policies.vla.configuration_vla import VLAConfig
from actdistill_ros.policies.vla.modeling_vla import EncodedObservation


@runtime_checkable
class DistillableVLA(Protocol):
    num_layers: int
    config: VLAConfig

    def encode(self, images: Tensor, instructions: list[str], states: Tensor | None) -> EncodedObservation:
        """Observation -> layer-0 tokens, padding mask and modality segments."""

    def run_layer(self, index: int, hidden: Tensor, attn_mask: Tensor) -> Tensor:
        """Apply backbone layer ``index`` (the full residual block) to ``hidden``."""

    def predict_chunk(self, hidden: Tensor, encoded: EncodedObservation) -> Tensor:
        """Final hidden states -> normalised action chunk (B, H, D)."""

    def layer_flops(self, num_tokens: int) -> float:
        """Matmul FLOPs of one backbone layer for one sample."""

    def normalize_actions(self, actions: Tensor) -> Tensor: ...

    def unnormalize_actions(self, actions: Tensor) -> Tensor: ...
