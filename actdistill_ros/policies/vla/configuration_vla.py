"""Configuration of the reference VLA (the teacher family we can train and test on CPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGE_ENCODERS = ("patch", "mobilenet_v2", "keypoints")


@dataclass
class VLAConfig:
    """Architecture of :class:`ReferenceVLA`. Token counts follow from these fields."""

    image_size: int = 64  # square input resolution; every camera image is resized to it
    num_cameras: int = 1  # images per observation, in the card's camera order
    patch_size: int = 8  # with a MobileNetV2 encoder: its stride (8 for blocks 7, 16 for blocks 14)
    # "patch": a linear patch embedding trained with the model; "mobilenet_v2": ImageNet MobileNetV2
    # features[:encoder_blocks] (mobilenet_v2.py), a 1x1 projection to the width per output cell;
    # "keypoints": a conv encoder trained from scratch, num_keypoints spatial soft-argmax keypoints
    # (keypoints.py), one token each (patch_size is then unused).
    image_encoder: str = "patch"
    encoder_blocks: int = 14
    num_keypoints: int = 32
    encoder_channels: int = 32
    width: int = 128
    num_layers: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_vocab_size: int = 4096  # hashed word buckets (see tokenizer.py)
    max_text_tokens: int = 16
    state_dim: int = 4  # 0 = no robot-state token
    action_dim: int = 4
    chunk_size: int = 8  # H: actions predicted per observation
    head_hidden: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        positive = ("image_size", "num_cameras", "patch_size", "num_keypoints", "encoder_channels", "width",
                    "num_layers", "num_heads",
                    "text_vocab_size", "max_text_tokens", "action_dim", "chunk_size", "head_hidden")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VLAConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.state_dim, int) or self.state_dim < 0:
            raise ValueError(f"VLAConfig.state_dim must be an integer >= 0, got {self.state_dim!r}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"VLAConfig.image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        if self.image_encoder == "mobilenet_v2":
            stride = self.encoder_geometry[1]
            if self.patch_size != stride:
                raise ValueError(f"VLAConfig.patch_size ({self.patch_size}) must be the stride of MobileNetV2 "
                                 f"features[:{self.encoder_blocks}], {stride}")
        if self.image_encoder != "keypoints" and self.image_size % self.patch_size:
            raise ValueError(f"VLAConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.width % self.num_heads:
            raise ValueError(f"VLAConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"VLAConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VLAConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def encoder_geometry(self) -> tuple[int, int]:
        """(channels, stride) of the MobileNetV2 encoder's output."""
        from actdistill_ros.policies.vla.mobilenet_v2 import encoder_geometry
        return encoder_geometry(self.encoder_blocks)

    @property
    def num_patches(self) -> int:
        """Image tokens of one camera: patches, the MobileNetV2 encoder's output cells, or keypoints."""
        if self.image_encoder == "keypoints":
            return self.num_keypoints
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visual_tokens(self) -> int:
        return self.num_cameras * self.num_patches

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        """Backbone sequence length: visual (every camera) + language + (state) + action query."""
        return self.num_visual_tokens + self.max_text_tokens + (1 if self.state_dim else 0) + 1

    @classmethod
    def tiny(cls, **overrides) -> "VLAConfig":
        """Seconds to train: unit tests and CI."""
        base = dict(image_size=32, patch_size=8, width=64, num_layers=4, num_heads=4,
                    max_text_tokens=8, chunk_size=4, head_hidden=128)
        return cls(**{**base, **overrides})

    @classmethod
    def bench(cls, **overrides) -> "VLAConfig":
        """Benchmark size: 12 layers of width 384 (about 21M backbone parameters)."""
        base = dict(image_size=96, patch_size=16, width=384, num_layers=12, num_heads=6,
                    max_text_tokens=16, chunk_size=8, head_hidden=512)
        return cls(**{**base, **overrides})

    @classmethod
    def sized(cls, size: str, **overrides) -> "VLAConfig":
        presets = {"tiny": cls.tiny, "bench": cls.bench, "default": cls}
        if size not in presets:
            raise ValueError(f"unknown model size {size!r}; expected one of {sorted(presets)}")
        return presets[size](**overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VLAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VLAConfig fields {unknown}")
        return cls(**data)
