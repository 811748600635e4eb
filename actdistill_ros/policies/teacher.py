"""What a VLA must provide to be routed (policy.py), probed and distilled (distill/).

Kept narrow on purpose: a teacher family implements these members around its own modules. Two
families do: the reference VLA (policies/vla) and a Hugging Face image-text-to-text backbone
(policies/hf_vla). Beyond these members, distillation and the runtime read the sizes in
``config`` (:class:`VLASizes`), and ``layers`` (the routed stack, sharded unit by unit under FSDP).
The protocol names no family: nothing here imports one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from actdistill_ros.policies.observation import EncodedObservation


class VLASizes(Protocol):
    """The part of a family's config that distillation, routing and the runtime read; each family's
    own config (e.g. VLAConfig, HFVLAConfig) has these and whatever else it needs."""

    width: int
    num_layers: int
    chunk_size: int
    action_dim: int
    state_dim: int
    image_size: int
    num_cameras: int

    @property
    def num_tokens(self) -> int: ...

    def to_dict(self) -> dict:
        """What the model card stores to rebuild the model."""


@runtime_checkable
class DistillableVLA(Protocol):
    num_layers: int
    config: VLASizes
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
