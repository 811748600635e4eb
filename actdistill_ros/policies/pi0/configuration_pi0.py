"""Configuration of a LeRobot pi0 or pi0.5 policy, read from the config.json that LeRobot 0.4.x saves.

One dataclass for both: ``"type": "pi0"`` or ``"pi05"`` (``variant``). The fields and defaults are
LeRobot's ``PI0Config`` / ``PI05Config`` (they differ only in tokenizer_max_length and the default
normalization), so a policy trained there means the same thing here. Training-only fields are
accepted and ignored; a field this implementation does not know, or a value it does not reproduce,
fails with one line naming it.

The Gemma sizes are not in config.json: it names a variant (``gemma_2b``, ``gemma_300m``) and the
sizes come from the tensor shapes of model.safetensors (modeling_pi0.infer_sizes), so a checkpoint
whose variants were shrunk (test fixtures) loads like a published one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from actdistill_ros.policies.lerobot_config import (IMAGE_PREFIX, STATE_KEY, Feature, check_features,
                                                    check_normalization_mapping, read_config_json,
                                                    read_features)
from actdistill_ros.policies.lerobot_processor import ACTION_KEY

VARIANTS = ("pi0", "pi05")
GEMMA_VARIANTS = ("gemma_300m", "gemma_2b")
EMPTY_CAMERA_PREFIX = IMAGE_PREFIX + "empty_camera_"
TOKENIZER_MAX_LENGTH = {"pi0": 48, "pi05": 200}
DEFAULT_NORMALIZATION = {
    "pi0": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "pi05": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
}

# Fields that only steer training, hub upload or compilation: accepted, never used at inference.
TRAINING_ONLY = frozenset({
    "device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path",
    "gradient_checkpointing", "compile_model", "compile_mode", "freeze_vision_encoder", "train_expert_only",
    "optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay", "optimizer_grad_clip_norm",
    "scheduler_warmup_steps", "scheduler_decay_steps", "scheduler_decay_lr", "time_sampling_beta_alpha",
    "time_sampling_beta_beta", "time_sampling_scale", "time_sampling_offset",
})


class PI0ConfigError(ValueError):
    """One line naming the config.json field and what was expected."""


@dataclass
class PI0Config:
    variant: str = "pi0"  # config.json's "type": pi0 or pi05
    input_features: dict[str, Feature] = field(default_factory=dict)
    output_features: dict[str, Feature] = field(default_factory=dict)
    normalization_mapping: dict[str, str] | None = None  # None: the variant's default
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    dtype: str = "float32"
    n_obs_steps: int = 1
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0
    rtc_config: dict | None = None
    image_resolution: tuple[int, int] = (224, 224)
    empty_cameras: int = 0
    tokenizer_max_length: int | None = None  # None: the variant's default
    source: str = "config.json"

    def __post_init__(self) -> None:
        where = self.source
        if self.variant not in VARIANTS:
            raise PI0ConfigError(f"{where}: \"type\" is {self.variant!r}, expected one of {list(VARIANTS)}")
        if self.normalization_mapping is None:
            self.normalization_mapping = dict(DEFAULT_NORMALIZATION[self.variant])
        if self.tokenizer_max_length is None:
            self.tokenizer_max_length = TOKENIZER_MAX_LENGTH[self.variant]
        for name in ("paligemma_variant", "action_expert_variant"):
            if getattr(self, name) not in GEMMA_VARIANTS:
                raise PI0ConfigError(f"{where}: {name} must be one of {list(GEMMA_VARIANTS)}, "
                                     f"got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise PI0ConfigError(f"{where}: dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.n_obs_steps != 1:
            raise PI0ConfigError(f"{where}: n_obs_steps={self.n_obs_steps} is not supported (pi0 uses 1)")
        if self.rtc_config is not None and (not isinstance(self.rtc_config, dict) or self.rtc_config.get("enabled")):
            raise PI0ConfigError(f"{where}: rtc_config (real-time chunking) is not supported; set it to null")
        for name in ("chunk_size", "n_action_steps", "max_state_dim", "max_action_dim", "num_inference_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PI0ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.n_action_steps > self.chunk_size:
            raise PI0ConfigError(f"{where}: n_action_steps {self.n_action_steps} > chunk_size {self.chunk_size}")
        if not 0 < self.min_period < self.max_period:
            raise PI0ConfigError(f"{where}: need 0 < min_period < max_period, got {self.min_period!r}, "
                                 f"{self.max_period!r}")
        size = self.image_resolution
        if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)
                or size[0] != size[1]):
            raise PI0ConfigError(f"{where}: image_resolution must be a square [size, size], got {size!r}")
        self.image_resolution = (int(size[0]), int(size[1]))
        if not isinstance(self.empty_cameras, int) or self.empty_cameras < 0:
            raise PI0ConfigError(f"{where}: empty_cameras must be an integer >= 0, got {self.empty_cameras!r}")
        check_normalization_mapping(self.normalization_mapping, where, PI0ConfigError)
        check_features(self.input_features, self.output_features, self.max_state_dim, self.max_action_dim, where,
                       "pi0", PI0ConfigError)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def is_pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def image_features(self) -> dict[str, Feature]:
        """Cameras in config order (LeRobot's empty_camera_<i> placeholders included)."""
        return {k: f for k, f in self.input_features.items() if f.type == "VISUAL"}

    @property
    def num_steps(self) -> int:
        """SmolVLA's name for the denoising steps, so the shared flow-matching code reads either."""
        return self.num_inference_steps

    @property
    def state_dim(self) -> int:
        return self.input_features[STATE_KEY].shape[0]

    @property
    def action_dim(self) -> int:
        return self.output_features[ACTION_KEY].shape[0]

    def check_dtype(self, float32: bool) -> None:
        """LeRobot runs a dtype "bfloat16" policy's VLM and expert in bfloat16; that is not reproduced."""
        if self.dtype != "float32" and not float32:
            raise PI0ConfigError(f"{self.source}: dtype {self.dtype!r} (LeRobot then runs the VLM and expert in "
                                 f"bfloat16) is not reproduced; pass --float32 to run it in float32")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "PI0Config":
        if not isinstance(data, dict):
            raise PI0ConfigError(f"{source}: expected a JSON object")
        variant = data.get("type")
        if variant not in VARIANTS:
            raise PI0ConfigError(f"{source}: \"type\" is {variant!r}, expected one of {list(VARIANTS)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"source", "variant"}
        unknown = sorted(set(data) - known - TRAINING_ONLY - {"type"})
        if unknown:
            raise PI0ConfigError(f"{source}: unsupported {variant} field(s) {unknown}")
        values = {k: v for k, v in data.items() if k in known}
        read_features(values, source, PI0ConfigError)
        try:
            return cls(variant=variant, **values, source=source)
        except TypeError as err:
            raise PI0ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "PI0Config":
        path = Path(path)
        return cls.from_dict(read_config_json(path, PI0ConfigError), str(path))
