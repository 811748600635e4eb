"""What a VLA must provide to be distilled by ActDistill and served by the routed runtime.

Kept narrow on purpose: an adapter for another VLA family (LLaMA-based OpenVLA, a diffusion-head
policy, ...) implements these members around its own modules.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from actdistill_ros.policies.vla.modeling_vla import EncodedObservation


@runtime_checkable
class DistillableVLA(Protocol):
    num_layers: int

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
