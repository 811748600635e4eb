"""LeRobot's pre-processor pipeline of a pi0 / pi0.5 policy directory, without lerobot.

The steps are run in the order they were saved (pi0.5 normalizes the state before it writes it
into the prompt; pi0 tokenizes first and normalizes last). The generic steps are parsed by
policies/lerobot_processor.py (shared with SmolVLA); the two pi-specific ones are:

- ``pi0_new_line_processor``: each task ends with "\\n" (PaliGemma's prompt format);
- ``pi05_prepare_state_tokenizer_processor_step``: the (normalised) state, zero-padded to the step's
  max_state_dim (32 when the saved config is empty, as LeRobot 0.4.4 saves it), discretised into 256
  bins over [-1, 1], and the prompt becomes ``"Task: <task>, State: <bins>;\\nAction: "``.

Any other step fails with one line naming it and its file. The tokenizer is the one the
tokenizer step names (google/paligemma-3b-pt-224), from ``--vlm-processor DIR`` or the Hugging
Face cache, offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from actdistill_ros.policies.lerobot_processor import (PASS_THROUGH_STEPS, PREPROCESSOR_FILE, TASK_KEY, Normalizer,
                                                       ProcessorError, TokenizerSettings, check_device_step,
                                                       read_normalizer, read_pipeline, read_tokenizer_step,
                                                       step_name)
from actdistill_ros.policies.smolvla.configuration_smolvla import STATE_KEY

NEW_LINE = "pi0_new_line_processor"
STATE_PROMPT = "pi05_prepare_state_tokenizer_processor_step"
STATE_BINS = 256
STATE_PROMPT_DIM = 32  # Pi05PrepareStateTokenizerProcessorStep's default max_state_dim


@dataclass
class StatePrompt:
    max_state_dim: int = STATE_PROMPT_DIM
    task_key: str = TASK_KEY


@dataclass
class PI0Preprocessor:
    """The saved steps, in order: (registry name, its parsed settings)."""

    steps: list[tuple[str, object]] = field(default_factory=list)

    def setting(self, name: str):
        return next((value for step, value in self.steps if step == name), None)

    @property
    def tokenizer(self) -> TokenizerSettings:
        return self.setting("tokenizer_processor")

    @property
    def normalizer(self) -> Normalizer | None:
        return self.setting("normalizer_processor")


def read_preprocessor(directory: Path, variant: str) -> PI0Preprocessor:
    path = directory / PREPROCESSOR_FILE
    pre = PI0Preprocessor()
    for index, step in enumerate(read_pipeline(path)):
        name = step_name(step, path, index)
        config = step.get("config") or {}
        if name == "rename_observations_processor":
            rename = config.get("rename_map") or {}
            if not isinstance(rename, dict):
                raise ProcessorError(f"{path}: step {index} ({name}): rename_map must be an object")
            value = {str(k): str(v) for k, v in rename.items()}
        elif name in ("to_batch_processor", NEW_LINE):
            value = None
        elif name == STATE_PROMPT:
            unknown = sorted(set(config) - {"max_state_dim", "task_key"})
            if unknown:
                raise ProcessorError(f"{path}: step {index} ({name}): unsupported field(s) {unknown}")
            value = StatePrompt(int(config.get("max_state_dim", STATE_PROMPT_DIM)),
                                str(config.get("task_key", TASK_KEY)))
        elif name == "tokenizer_processor":
            value = read_tokenizer_step(config, path, index, name)
        elif name == "normalizer_processor":
            value = read_normalizer(step, directory, path, index)
        elif name in PASS_THROUGH_STEPS:
            check_device_step(config, path, index, name)
            continue
        else:
            raise ProcessorError(f"{path}: step {index}: unsupported processor step {name!r} for a {variant} policy")
        pre.steps.append((name, value))
    if pre.tokenizer is None:
        raise ProcessorError(f"{path}: no tokenizer_processor step; {variant} needs the task tokenized")
    if variant == "pi05" and pre.setting(STATE_PROMPT) is None:
        raise ProcessorError(f"{path}: no {STATE_PROMPT} step; pi0.5 writes the state into the prompt")
    return pre


def state_prompts(tasks: list[str], state: Tensor, settings: StatePrompt) -> list[str]:
    """pi0.5's prompts: the task cleaned up, then the normalised state as 256-bin indices."""
    padded = torch.nn.functional.pad(state, (0, max(0, settings.max_state_dim - state.shape[-1])))
    bins = np.digitize(padded.cpu().numpy(), bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1
    prompts = []
    for task, row in zip(tasks, bins):
        cleaned = task.strip().replace("_", " ").replace("\n", " ")
        prompts.append(f"Task: {cleaned}, State: {' '.join(map(str, row))};\nAction: ")
    return prompts


def run_preprocessor(pre: PI0Preprocessor, batch: dict[str, Tensor], tasks: list[str], tokenize) -> tuple[
        dict[str, Tensor], Tensor, Tensor]:
    """The saved steps in order on a raw batch: the batch as the model reads it, token ids and mask.
    ``tokenize(settings, tasks)`` runs the tokenizer step."""
    tokens = mask = None
    for name, value in pre.steps:
        if name == "rename_observations_processor":
            batch = {value.get(k, k): v for k, v in batch.items()}
        elif name == "to_batch_processor":  # single observations gain a batch axis
            batch = {k: v[None] if (k.startswith("observation.images.") and v.ndim == 3)
                     or (k == STATE_KEY and v.ndim == 1) else v for k, v in batch.items()}
        elif name == NEW_LINE:
            tasks = [t if t.endswith("\n") else f"{t}\n" for t in tasks]
        elif name == STATE_PROMPT:
            tasks = state_prompts(tasks, batch[STATE_KEY], value)
        elif name == "tokenizer_processor":
            tokens, mask = tokenize(value, tasks)
        elif name == "normalizer_processor":
            batch = value.normalize_observation(batch)
    return batch, tokens, mask
