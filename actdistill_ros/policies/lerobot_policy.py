"""What the LeRobot flow-matching policy classes (SmolVLA, pi0 / pi0.5) share: the loaded parts,
the safetensors-only weights file, and sampling an action chunk from the family's preprocess and
model. Each family's policy module loads its own config, model and tokenizer and embeds its prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from actdistill_ros.policies.lerobot_processor import Postprocessor, ProcessorError, unnormalize_actions

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_lerobot_dir(path: str | Path, config_types: tuple[str, ...]) -> bool:
    """Whether ``path`` is a directory whose config.json "type" is one of ``config_types``."""
    config = Path(path) / CONFIG_FILE
    try:
        return Path(path).is_dir() and json.loads(config.read_text()).get("type") in config_types
    except (OSError, ValueError, AttributeError):
        return False


def weights_file(directory: Path, label: str) -> Path:
    """The policy's model.safetensors; a directory with only pickle files says that they are never loaded."""
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" ({', '.join(pickled)} are pickle files, which are never loaded)" if pickled else ""
        raise ProcessorError(f"{weights}: missing; {label} weights are read from safetensors only{hint}")
    return weights


def read_weights(weights: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ProcessorError(f"{weights}: not a readable safetensors file ({err})") from None


class LeRobotFlowPolicy:
    """A loaded LeRobot flow-matching policy; subclasses give ``device``, ``preprocess`` and ``load``."""

    family = ""

    def __init__(self, model: torch.nn.Module, config, preprocessor, postprocessor: Postprocessor, tokenizer,
                 directory: Path | None = None):
        self.model = model.eval()
        self.config = config
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.tokenizer = tokenizer
        self.directory = directory

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device: str | torch.device):
        self.model.to(device)
        return self

    def preprocess(self, batch: dict[str, Tensor], tasks: list[str] | str):
        """Raw LeRobot batch + task text(s) -> (the model's embedded prefix, batch size)."""
        raise NotImplementedError

    # ---- inference -------------------------------------------------------------------------------
    def start_noise(self, size: int, generator: torch.Generator | None = None) -> Tensor:
        shape = (size, self.config.chunk_size, self.config.max_action_dim)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def check_noise(self, noise: Tensor, size: int) -> Tensor:
        shape = (size, self.config.chunk_size, self.config.max_action_dim)
        if tuple(noise.shape) != shape:
            raise ProcessorError(f"noise: expected shape {list(shape)} [B, chunk_size, max_action_dim], "
                                 f"got {list(noise.shape)}")
        return noise.to(self.device, torch.float32)

    @torch.inference_mode()
    def predict_action_chunk(self, batch: dict[str, Tensor], tasks: list[str] | str,
                             noise: Tensor | None = None) -> Tensor:
        """Un-normalised action chunk (B, chunk_size, action_dim), float32 on the CPU."""
        prefix, size = self.preprocess(batch, tasks)
        noise = self.start_noise(size) if noise is None else self.check_noise(noise, size)
        actions = self.model.sample_actions(prefix, noise)[:, :, :self.config.action_dim]
        return unnormalize_actions(self.postprocessor, actions).float().cpu()
