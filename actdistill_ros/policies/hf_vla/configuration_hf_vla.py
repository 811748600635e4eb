"""Configuration of :class:`HFVLA`, a VLA teacher around a Hugging Face image-text-to-text model.

The backbone's own architecture is its transformers config (``backbone/config.json`` in a weights
directory). This dataclass holds what we add around it (cameras, text length, state, action chunk,
head) and the sizes read from the backbone. Those are recorded so that a card can be read without
loading the model, and are checked against the backbone whenever it is built: a card that does
not match its ``backbone/`` fails with one line instead of loading the wrong thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PREFIX_ATTENTION = ("bidirectional", "causal")


@dataclass
class HFVLAConfig:
    # What we add around the backbone.
    num_cameras: int = 1  # images per observation, in the card's camera order
    max_text_tokens: int = 16  # instructions are padded/truncated to this many tokens: a fixed layout
    state_dim: int = 4  # 0 = no robot-state token
    action_dim: int = 4
    chunk_size: int = 8  # H: one action-query token per predicted step (parallel decoding)
    head_hidden: int = 256
    # Read from the backbone when left at 0 / "" / empty (see HFVLA); checked when given.
    image_size: int = 0  # square input resolution (the vision tower's own size for fixed-size towers)
    backbone_type: str = ""  # the transformers model_type, e.g. "paligemma"
    adapter: str = ""  # how its parts are reached: paligemma | idefics3 | qwen2_5_vl | generic
    width: int = 0  # decoder hidden size
    num_layers: int = 0  # decoder layers: what the router routes
    image_tokens_per_camera: int = 0
    image_mean: list[float] = field(default_factory=list)  # RGB normalisation of the vision tower
    image_std: list[float] = field(default_factory=list)
    # How the image + instruction prefix attends within itself (state and action queries always see
    # every valid token, and the prefix never sees them). "" = the backbone's own pretraining pattern.
    prefix_attention: str = ""
    trust_remote_code: bool = False  # the backbone's code comes from its directory (opt-in only)

    def __post_init__(self) -> None:
        positive = ("num_cameras", "max_text_tokens", "action_dim", "chunk_size", "head_hidden")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HFVLAConfig.{name} must be a positive integer, got {value!r}")
        for name in ("state_dim", "image_size", "width", "num_layers", "image_tokens_per_camera"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"HFVLAConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) not in (0, 3):
                raise ValueError(f"HFVLAConfig.{name} must be 3 numbers (R, G, B) or empty, got {values!r}")
            setattr(self, name, [float(v) for v in values])
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"HFVLAConfig.image_std must be > 0, got {self.image_std!r}")
        if self.prefix_attention not in ("", *PREFIX_ATTENTION):
            raise ValueError(f"HFVLAConfig.prefix_attention must be one of {list(PREFIX_ATTENTION)} "
                             f"(or empty for the backbone's default), got {self.prefix_attention!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"HFVLAConfig.trust_remote_code must be true or false, got {self.trust_remote_code!r}")

    @property
    def num_image_tokens(self) -> int:
        return self.num_cameras * self.image_tokens_per_camera

    @property
    def num_tokens(self) -> int:
        """Backbone sequence length: images (every camera) + instruction + (state) + action queries."""
        return self.num_image_tokens + self.max_text_tokens + (1 if self.state_dim else 0) + self.chunk_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HFVLAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HFVLAConfig fields {unknown}")
        return cls(**data)
