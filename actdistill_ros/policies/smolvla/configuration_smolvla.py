"""Configuration of a LeRobot SmolVLA policy, read from the config.json that LeRobot 0.4.x saves.

The fields and their defaults are LeRobot's (``SmolVLAConfig``), so a policy trained there means
the same thing here. Training-only fields (optimizer, scheduler, freezing, compilation, hub
upload) are accepted and ignored: they do not change what the policy computes. A field this
implementation does not know, or a value it does not reproduce, fails with one line naming it,
rather than silently running a different model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from actdistill_ros.policies.lerobot_config import (  # noqa: F401 - re-exported
    FEATURE_TYPES, IMAGE_PREFIX, STATE_KEY, Feature, check_features, check_normalization_mapping,
    read_config_json, read_features)
from actdistill_ros.policies.lerobot_processor import ACTION_KEY, NORMALIZATION_MODES  # noqa: F401 - re-exported

ATTENTION_MODES = ("cross_attn", "self_attn")
PAD_LANGUAGE = ("longest", "max_length")

# Fields that only steer training, hub upload or compilation: accepted, never used at inference.
TRAINING_ONLY = frozenset({
    "device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path",
    "freeze_vision_encoder", "train_expert_only", "train_state_proj", "optimizer_lr", "optimizer_betas",
    "optimizer_eps", "optimizer_weight_decay", "optimizer_grad_clip_norm", "scheduler_warmup_steps",
    "scheduler_decay_steps", "scheduler_decay_lr", "compile_model", "compile_mode",
})


class SmolVLAConfigError(ValueError):
    """One line naming the config.json field and what was expected."""


@dataclass
class SmolVLAConfig:
    input_features: dict[str, Feature] = field(default_factory=dict)
    output_features: dict[str, Feature] = field(default_factory=dict)
    n_obs_steps: int = 1
    chunk_size: int = 50
    n_action_steps: int = 50
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: tuple[int, int] | None = (512, 512)  # (width, height), as LeRobot passes it
    empty_cameras: int = 0
    adapt_to_pi_aloha: bool = False
    use_delta_joint_actions_aloha: bool = False
    tokenizer_max_length: int = 48
    num_steps: int = 10
    use_cache: bool = True
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    # True in policies fine-tuned from smolvla_base: LeRobot then loads (and runs) the VLM in bfloat16.
    load_vlm_weights: bool = False
    add_image_special_tokens: bool = False
    attention_mode: str = "cross_attn"
    prefix_length: int = -1
    pad_language_to: str = "longest"
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    rtc_config: dict | None = None
    source: str = "config.json"  # where it was read from, for error messages (not a LeRobot field)

    def __post_init__(self) -> None:
        where = self.source
        for name in ("chunk_size", "n_action_steps", "max_state_dim", "max_action_dim", "tokenizer_max_length",
                     "num_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SmolVLAConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        for name in ("num_vlm_layers", "num_expert_layers", "self_attn_every_n_layers", "prefix_length"):
            value = getattr(self, name)  # <= 0 means "all layers" / "off", as in LeRobot
            if not isinstance(value, int) or isinstance(value, bool):
                raise SmolVLAConfigError(f"{where}: {name} must be an integer, got {value!r}")
        for name in ("empty_cameras",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SmolVLAConfigError(f"{where}: {name} must be an integer >= 0, got {value!r}")
        if self.n_action_steps > self.chunk_size:
            raise SmolVLAConfigError(f"{where}: n_action_steps {self.n_action_steps} exceeds chunk_size "
                                     f"{self.chunk_size}")
        # Values whose behaviour is not reproduced here: refuse them instead of computing something else.
        if self.n_obs_steps != 1:
            raise SmolVLAConfigError(f"{where}: n_obs_steps={self.n_obs_steps} is not supported (SmolVLA uses 1)")
        if self.adapt_to_pi_aloha:
            raise SmolVLAConfigError(f"{where}: adapt_to_pi_aloha=true (Aloha joint/gripper conversion) is not supported")
        if self.use_delta_joint_actions_aloha:
            raise SmolVLAConfigError(f"{where}: use_delta_joint_actions_aloha=true is not supported")
        if self.use_cache is not True:
            raise SmolVLAConfigError(f"{where}: use_cache={self.use_cache!r} is not supported (LeRobot's SmolVLA "
                                     f"samples with the prefix key/value cache)")
        if self.rtc_config is not None and (not isinstance(self.rtc_config, dict) or self.rtc_config.get("enabled")):
            raise SmolVLAConfigError(f"{where}: rtc_config (real-time chunking) is not supported; set it to null")
        if self.attention_mode not in ATTENTION_MODES:
            raise SmolVLAConfigError(f"{where}: attention_mode must be one of {list(ATTENTION_MODES)}, "
                                     f"got {self.attention_mode!r}")
        if self.pad_language_to not in PAD_LANGUAGE:
            raise SmolVLAConfigError(f"{where}: pad_language_to must be one of {list(PAD_LANGUAGE)}, "
                                     f"got {self.pad_language_to!r}")
        if not isinstance(self.vlm_model_name, str) or not self.vlm_model_name:
            raise SmolVLAConfigError(f"{where}: vlm_model_name must name the VLM (e.g. a hub id), "
                                     f"got {self.vlm_model_name!r}")
        if not self.expert_width_multiplier > 0:
            raise SmolVLAConfigError(f"{where}: expert_width_multiplier must be > 0, got {self.expert_width_multiplier!r}")
        if not 0 < self.min_period < self.max_period:
            raise SmolVLAConfigError(f"{where}: need 0 < min_period < max_period, got {self.min_period!r}, "
                                     f"{self.max_period!r}")
        if self.resize_imgs_with_padding is not None:
            size = self.resize_imgs_with_padding
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and v > 0 for v in size)):
                raise SmolVLAConfigError(f"{where}: resize_imgs_with_padding must be [width, height] or null, "
                                         f"got {size!r}")
            self.resize_imgs_with_padding = (int(size[0]), int(size[1]))
        check_normalization_mapping(self.normalization_mapping, where, SmolVLAConfigError)
        check_features(self.input_features, self.output_features, self.max_state_dim, self.max_action_dim, where,
                       "SmolVLA", SmolVLAConfigError)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def image_features(self) -> dict[str, Feature]:
        """Cameras in config order: the order their tokens take in the prefix."""
        return {k: f for k, f in self.input_features.items() if f.type == "VISUAL"}

    @property
    def state_dim(self) -> int:
        return self.input_features[STATE_KEY].shape[0]

    @property
    def action_dim(self) -> int:
        return self.output_features[ACTION_KEY].shape[0]

    def is_self_attention_layer(self, index: int) -> bool:
        """Whether expert layer ``index`` attends jointly over prefix and suffix (else it
        cross-attends to keys/values projected from its VLM layer's)."""
        if "cross" not in self.attention_mode:
            return True
        return self.self_attn_every_n_layers > 0 and index % self.self_attn_every_n_layers == 0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        for group in ("input_features", "output_features"):
            data[group] = {k: {"type": f["type"], "shape": list(f["shape"])} for k, f in data[group].items()}
        return {"type": "smolvla", **data}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "SmolVLAConfig":
        if not isinstance(data, dict):
            raise SmolVLAConfigError(f"{source}: expected a JSON object")
        if data.get("type") != "smolvla":
            raise SmolVLAConfigError(f"{source}: \"type\" is {data.get('type')!r}, expected \"smolvla\"")
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known - TRAINING_ONLY - {"type"})
        if unknown:
            raise SmolVLAConfigError(f"{source}: unsupported SmolVLA field(s) {unknown}")
        values = {k: v for k, v in data.items() if k in known}
        read_features(values, source, SmolVLAConfigError)
        try:
            return cls(**values, source=source)
        except TypeError as err:
            raise SmolVLAConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "SmolVLAConfig":
        path = Path(path)
        return cls.from_dict(read_config_json(path, SmolVLAConfigError), str(path))
