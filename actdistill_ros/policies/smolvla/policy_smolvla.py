"""A LeRobot SmolVLA policy directory, loaded and run without lerobot.

``SmolVLAPolicy.load(dir)`` reads config.json ("type": "smolvla"), model.safetensors (safetensors
only, never pickle), policy_preprocessor.json / policy_postprocessor.json with their normalizer
state files, and the VLM's config.json and tokenizer (``vlm_processor`` or the Hugging Face cache
of ``vlm_model_name``, offline). ``predict_action_chunk`` reproduces LeRobot's
``postprocessor(policy.predict_action_chunk(preprocessor(batch), noise=noise))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from actdistill_ros.policies.lerobot_policy import (CONFIG_FILE, WEIGHTS_FILE,  # noqa: F401 - re-exported
                                                    LeRobotFlowPolicy, is_lerobot_dir, read_weights, weights_file)
from actdistill_ros.policies.lerobot_processor import tokenize
from actdistill_ros.policies.smolvla.configuration_smolvla import (IMAGE_PREFIX, STATE_KEY, SmolVLAConfig,
                                                                   SmolVLAConfigError)
from actdistill_ros.policies.smolvla.modeling_smolvla import Prefix, SmolVLAModel, lerobot_dtypes, resize_with_pad
from actdistill_ros.policies.smolvla.processor_smolvla import (Preprocessor, ProcessorError,
                                                               load_vlm_config_and_tokenizer, read_postprocessor,
                                                               read_preprocessor, resolve_vlm_dir)

EMPTY_CAMERA_PREFIX = IMAGE_PREFIX + "empty_camera_"  # cameras LeRobot adds for empty_cameras > 0


def is_smolvla_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose config.json says "type": "smolvla"."""
    return is_lerobot_dir(path, ("smolvla",))


class SmolVLAPolicy(LeRobotFlowPolicy):
    family = "smolvla"
    model: SmolVLAModel
    config: SmolVLAConfig
    preprocessor: Preprocessor

    @property
    def device(self) -> torch.device:
        return self.model.state_proj.weight.device

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, vlm_processor: str | Path | None = None,
             device: str | torch.device = "cpu", float32: bool = False) -> "SmolVLAPolicy":
        """``float32`` runs every part in float32; by default each part runs in the dtype LeRobot
        runs it in (e.g. a bfloat16 VLM and expert for a policy with load_vlm_weights; see lerobot_dtypes)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ProcessorError(f"{directory}: not a directory (a LeRobot SmolVLA policy directory is expected)")
        config = SmolVLAConfig.from_file(directory / CONFIG_FILE)
        preprocessor, postprocessor = read_preprocessor(directory), read_postprocessor(directory)
        weights = weights_file(directory, "SmolVLA")
        vlm_dir = resolve_vlm_dir(config.vlm_model_name, vlm_processor)
        vlm_config, tokenizer = load_vlm_config_and_tokenizer(vlm_dir)
        special = None
        if config.add_image_special_tokens:
            special = tuple(_token_id(tokenizer, getattr(tokenizer, attribute, default), vlm_dir)
                            for attribute, default in (("fake_image_token", "<fake_token_around_image>"),
                                                       ("global_image_token", "<global-img>")))
        dtypes = None if float32 else lerobot_dtypes(config, json.loads((vlm_dir / "config.json").read_text()))
        model = SmolVLAModel(config, vlm_config, special, dtypes)
        tensors = read_weights(weights)
        model.load_lerobot_state({k: v.to(torch.float32) for k, v in tensors.items()}, str(weights))
        return cls(model.to(device), config, preprocessor, postprocessor, tokenizer, directory)

    # ---- LeRobot's preprocessing -----------------------------------------------------------------
    def tokenize(self, tasks: list[str]) -> tuple[Tensor, Tensor]:
        settings = self.preprocessor.tokenizer
        if self.preprocessor.newline:
            tasks = [t if t.endswith("\n") else f"{t}\n" for t in tasks]
        return tokenize(self.tokenizer, settings, tasks, self.device)

    def preprocess(self, batch: dict[str, Tensor], tasks: list[str] | str) -> tuple[Prefix, int]:
        """Raw LeRobot batch + task text(s) -> the embedded prefix and the batch size."""
        pre = self.preprocessor
        batch = {pre.rename_map.get(k, k): torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        if pre.add_batch_dim:  # LeRobot's to_batch_processor: single observations gain a batch axis
            batch = {k: v[None] if (k.startswith(IMAGE_PREFIX) and v.ndim == 3) or (k == STATE_KEY and v.ndim == 1)
                     else v for k, v in batch.items()}
        if STATE_KEY not in batch:
            raise ProcessorError(f"the batch has no {STATE_KEY!r} (the policy takes {self.config.state_dim} values)")
        state = batch[STATE_KEY].to(torch.float32)
        size = state.shape[0]
        if state.ndim not in (2, 3) or state.shape[-1] != self.config.state_dim:
            raise ProcessorError(f"{STATE_KEY}: expected [B, {self.config.state_dim}], got {list(state.shape)}")
        tasks = [tasks] * size if isinstance(tasks, str) else list(tasks)
        if len(tasks) != size:
            raise ProcessorError(f"got {len(tasks)} task strings for a batch of {size}")
        lang_tokens, lang_masks = self.tokenize(tasks)
        if pre.normalizer is not None:
            batch = pre.normalizer.normalize_observation(batch)
        images, masks = self._prepare_images(batch, size)
        state = batch[STATE_KEY].to(torch.float32)
        state = state[:, -1] if state.ndim > 2 else state
        state = torch.nn.functional.pad(state, (0, self.config.max_state_dim - state.shape[-1]))
        return self.model.embed_prefix(images, masks, lang_tokens, lang_masks, state), size

    def _prepare_images(self, batch: dict[str, Tensor], size: int) -> tuple[list[Tensor], list[Tensor]]:
        """Present cameras in config order, resized with padding and mapped to [-1, 1]; then up to
        ``empty_cameras`` missing placeholder cameras as all -1 images that are masked out."""
        config = self.config
        images, masks, missing = [], [], []
        for key in config.image_features:
            if key not in batch:
                missing.append(key)
                continue
            if not batch[key].is_floating_point():
                raise ProcessorError(f"{key}: expected float pixels in [0, 1] (LeRobot's convention), got "
                                     f"{str(batch[key].dtype).removeprefix('torch.')}")
            image = batch[key].to(torch.float32)
            image = image[:, -1] if image.ndim == 5 else image
            if image.ndim != 4 or image.shape[:2] != (size, 3):
                raise ProcessorError(f"{key}: expected float [B={size}, 3, H, W] in [0, 1], got {list(image.shape)}")
            if config.resize_imgs_with_padding is not None:
                image = resize_with_pad(image, *config.resize_imgs_with_padding, pad_value=0)
            images.append(image * 2.0 - 1.0)
            padding_key = f"{key}_padding_mask"
            masks.append(batch[padding_key].bool() if padding_key in batch
                         else torch.ones(size, dtype=torch.bool, device=image.device))
        real_missing = [k for k in missing if not k.startswith(EMPTY_CAMERA_PREFIX)]
        if real_missing:
            raise ProcessorError(f"the batch lacks camera(s) {real_missing}; the policy takes "
                                 f"{[k for k in config.image_features if not k.startswith(EMPTY_CAMERA_PREFIX)]}")
        for _ in missing[:config.empty_cameras]:
            images.append(torch.full_like(images[-1], -1.0))
            masks.append(torch.zeros_like(masks[-1]))
        return images, masks

def _token_id(tokenizer, token: str, directory: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SmolVLAConfigError(f"{directory}: the tokenizer has no {token!r} token, which "
                                 f"add_image_special_tokens needs")
    return int(token_id)
