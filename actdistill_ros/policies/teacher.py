"""What a VLA must provide to be routed (policy.py), probed and distilled (distill/).

Kept narrow on purpose: a teacher family implements these members around its own modules. Two
families do: the reference VLA (policies/vla) and a Hugging Face image-text-to-text backbone
(policies/hf_vla). Beyond these members, distillation and the runtime read the sizes in
``config`` (width, num_layers, chunk_size, action_dim, state_dim, image_size, num_cameras,
num_tokens), and ``layers`` (the routed stack, sharded unit by unit under FSDP).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from actdistill_ros.policies.hf_vla.configuration_hf_vla import HFVLAConfig
from actdistill_ros.policies.vla.configuration_vla import VLAConfig
from actdistill_ros.policies.vla.modeling_vla import EncodedObservation


@runtime_checkable
class DistillableVLA(Protocol):
    num_layers: int
    config: VLAConfig | HFVLAConfig
    layers: nn.ModuleList
    segment_spans: dict[int, slice]  # the positions of each modality (all encodings share the layout)

    def encode(self, images: Tensor, instructions: list[str], states: Tensor | None) -> EncodedObservation:
        """Observation (uint8 images (B, C, S, S, 3)) -> layer-0 tokens, padding mask and modality segments."""

    def run_layer(self, index: int, hidden: Tensor, attn_mask: Tensor, readout: slice | None = None) -> Tensor:
        """Apply backbone layer ``index`` (the full residual block) to ``hidden`` (B, N, W); with
        ``readout``, return only those positions (B, R, W): a sample's last layer only has to
        produce the tokens the head reads."""

    def predict_chunk(self, readout: Tensor) -> Tensor:
        """Final hidden states at the readout positions (``EncodedObservation.readout``) ->
        normalised action chunk (B, H, D)."""

    def layer_flops(self, num_tokens: int, readout_tokens: int | None = None) -> float:
        """Matmul FLOPs of one backbone layer for one sample, as ``run_layer`` computes it."""

    def freeze_vision(self) -> None:
        """Stop training the image encoder (``freeze_vision: true`` in distillation)."""

    def set_normalization(self, stats: dict) -> None: ...

    def normalize_actions(self, actions: Tensor) -> Tensor: ...

    def unnormalize_actions(self, actions: Tensor) -> Tensor: ...
