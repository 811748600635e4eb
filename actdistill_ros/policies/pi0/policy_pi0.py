"""A LeRobot pi0 / pi0.5 policy directory, loaded and run without lerobot.

``PI0Policy.load(dir)`` reads config.json ("type": "pi0" or "pi05"), model.safetensors (safetensors
only, never pickle), policy_preprocessor.json / policy_postprocessor.json with their normalizer
state files, and the PaliGemma tokenizer (``vlm_processor`` or the Hugging Face cache of the name
the tokenizer step saved, offline). ``predict_action_chunk`` reproduces LeRobot's
``postprocessor(policy.predict_action_chunk(preprocessor(batch), noise=noise))``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from actdistill_ros.policies.lerobot_policy import (CONFIG_FILE, LeRobotFlowPolicy, is_lerobot_dir, read_weights,
                                                    weights_file)
from actdistill_ros.policies.lerobot_processor import (ProcessorError, TokenizerSettings, load_tokenizer,
                                                       read_postprocessor, resolve_vlm_dir, tokenize)
from actdistill_ros.policies.pi0.configuration_pi0 import EMPTY_CAMERA_PREFIX, VARIANTS, PI0Config
from actdistill_ros.policies.pi0.modeling_pi0 import PI0Model, Prefix, infer_sizes, resize_with_pad
from actdistill_ros.policies.pi0.processor_pi0 import PI0Preprocessor, read_preprocessor, run_preprocessor
from actdistill_ros.policies.smolvla.configuration_smolvla import STATE_KEY


def is_pi0_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose config.json says "type": "pi0" or "pi05"."""
    return is_lerobot_dir(path, VARIANTS)


class PI0Policy(LeRobotFlowPolicy):
    family = "pi0"
    model: PI0Model
    config: PI0Config
    preprocessor: PI0Preprocessor

    @property
    def device(self) -> torch.device:
        return self.model.action_in_proj.weight.device

    @classmethod
    def load(cls, directory: str | Path, vlm_processor: str | Path | None = None,
             device: str | torch.device = "cpu", float32: bool = False) -> "PI0Policy":
        """Runs in float32 (a dtype "bfloat16" policy needs ``float32=True``, saying so)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ProcessorError(f"{directory}: not a directory (a LeRobot pi0 / pi0.5 policy directory is expected)")
        config = PI0Config.from_file(directory / CONFIG_FILE)
        config.check_dtype(float32)
        preprocessor = read_preprocessor(directory, config.variant)
        postprocessor = read_postprocessor(directory)
        weights = weights_file(directory, config.variant)
        tokenizer_name = preprocessor.tokenizer.tokenizer_name or "google/paligemma-3b-pt-224"
        tokenizer = load_tokenizer(resolve_vlm_dir(tokenizer_name, vlm_processor, need_config=False))
        tensors = {k: v.to(torch.float32) for k, v in read_weights(weights).items()}
        model = PI0Model(config, infer_sizes(tensors, config, str(weights)))
        model.load_lerobot_state(tensors, str(weights))
        if len(tokenizer) > model.sizes.vocab:
            raise ProcessorError(f"{tokenizer_name}: the tokenizer has {len(tokenizer)} tokens, the model's embedding "
                                 f"{model.sizes.vocab} rows (another tokenizer than the policy was trained with)")
        return cls(model.to(device), config, preprocessor, postprocessor, tokenizer, directory)

    # ---- LeRobot's preprocessing -----------------------------------------------------------------
    def tokenize(self, settings: TokenizerSettings, tasks: list[str]) -> tuple[Tensor, Tensor]:
        """The tokenizer step: token ids and bool mask (B, L)."""
        return tokenize(self.tokenizer, settings, tasks, self.device)

    def preprocess(self, batch: dict[str, Tensor], tasks: list[str] | str) -> tuple[Prefix, int]:
        """Raw LeRobot batch + task text(s) -> the embedded prefix (with pi0's padded state; pi0.5's
        state is in the prompt) and the batch size."""
        config = self.config
        batch = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        state = batch.get(STATE_KEY)
        if state is None:
            raise ProcessorError(f"the batch has no {STATE_KEY!r} (the policy takes {config.state_dim} values)")
        size = state.shape[0] if state.ndim == 2 else 1
        if state.ndim not in (1, 2) or state.shape[-1] != config.state_dim:
            raise ProcessorError(f"{STATE_KEY}: expected [B, {config.state_dim}], got {list(state.shape)}")
        tasks = [tasks] * size if isinstance(tasks, str) else list(tasks)
        if len(tasks) != size:
            raise ProcessorError(f"got {len(tasks)} task strings for a batch of {size}")
        batch[STATE_KEY] = state.to(torch.float32)
        batch, tokens, masks = run_preprocessor(self.preprocessor, batch, tasks, self.tokenize)
        images, image_masks = self._prepare_images(batch, size)
        state = None
        if not config.is_pi05:
            state = batch[STATE_KEY].to(torch.float32)
            state = torch.nn.functional.pad(state, (0, config.max_state_dim - state.shape[-1]))
        return self.model.embed_prefix(images, image_masks, tokens, masks, state), size

    def _prepare_images(self, batch: dict[str, Tensor], size: int) -> tuple[list[Tensor], list[Tensor]]:
        """Present cameras in config order, resized with padding and mapped to [-1, 1]; then one
        all -1, masked-out image per missing camera (LeRobot's empty_camera_<i> placeholders)."""
        resolution = self.config.image_resolution[0]
        images, masks, missing = [], [], []
        for key in self.config.image_features:
            if key not in batch:
                missing.append(key)
                continue
            if not batch[key].is_floating_point():
                raise ProcessorError(f"{key}: expected float pixels in [0, 1] (LeRobot's convention), got "
                                     f"{str(batch[key].dtype).removeprefix('torch.')}")
            image = batch[key].to(torch.float32)
            if image.ndim != 4 or image.shape[:2] != (size, 3):
                raise ProcessorError(f"{key}: expected float [B={size}, 3, H, W] in [0, 1], got {list(image.shape)}")
            if tuple(image.shape[2:]) != (resolution, resolution):
                image = resize_with_pad(image, resolution)
            images.append(image * 2.0 - 1.0)
            masks.append(torch.ones(size, dtype=torch.bool, device=image.device))
        real_missing = [k for k in missing if not k.startswith(EMPTY_CAMERA_PREFIX)]
        if real_missing:
            raise ProcessorError(f"the batch lacks camera(s) {real_missing}; the policy takes "
                                 f"{[k for k in self.config.image_features if not k.startswith(EMPTY_CAMERA_PREFIX)]}")
        for _ in missing:
            images.append(torch.full_like(images[-1], -1.0))
            masks.append(torch.zeros_like(masks[-1]))
        return images, masks
