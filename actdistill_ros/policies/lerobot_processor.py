"""LeRobot's saved pre- and post-processor pipelines, read without lerobot: what every LeRobot
policy family here (SmolVLA, pi0, pi0.5) shares.

LeRobot saves each pipeline as ``policy_preprocessor.json`` / ``policy_postprocessor.json``: a list
of steps by registry name with their config, and a safetensors state file for the stateful ones
(the normalizer's statistics, flat ``<feature>.<stat>`` keys). This module parses the steps every
family writes (normalizer, unnormalizer, tokenizer, device) and resolves the tokenizer offline;
each family's processor module reads its own step list and fails with one line on a step it does
not reproduce, because skipping a step would silently feed the model something else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
TASK_KEY = "task"
ACTION_KEY = "action"
NORMALIZATION_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
# Steps that move data between devices or rename nothing: no effect on a float32 CPU/GPU batch.
PASS_THROUGH_STEPS = ("device_processor",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ProcessorError(ValueError):
    """One line naming the processor file (or VLM directory) and what is wrong."""


# ---- normalization -------------------------------------------------------------------------------
@dataclass
class Normalizer:
    """LeRobot's NormalizerProcessorStep / UnnormalizerProcessorStep, per feature.

    ``modes`` maps a feature type (VISUAL, STATE, ACTION) to its mode; ``feature_types`` maps each
    feature key to its type; ``stats`` holds the tensors of each feature. A feature without stats,
    or of an IDENTITY type, passes through unchanged (as in LeRobot).
    """

    modes: dict[str, str]
    feature_types: dict[str, str]
    stats: dict[str, dict[str, Tensor]]
    eps: float = 1e-8
    only_keys: frozenset[str] | None = None  # normalize_observation_keys
    source: str = ""

    def mode_of(self, key: str) -> str:
        return self.modes.get(self.feature_types.get(key, ""), "IDENTITY")

    def _stat(self, key: str, name: str, like: Tensor) -> Tensor:
        try:
            value = self.stats[key][name]
        except KeyError:
            raise ProcessorError(f"{self.source}: {self.mode_of(key)} normalization of {key!r} needs the "
                                 f"statistic {name!r}, which its state file lacks") from None
        return value.to(device=like.device, dtype=like.dtype)

    def apply(self, key: str, tensor: Tensor, inverse: bool = False) -> Tensor:
        mode = self.mode_of(key)
        if mode == "IDENTITY" or key not in self.stats:
            return tensor
        if mode == "MEAN_STD":
            mean, std = self._stat(key, "mean", tensor), self._stat(key, "std", tensor)
            return tensor * std + mean if inverse else (tensor - mean) / (std + self.eps)
        low_name, high_name = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
                               "QUANTILE10": ("q10", "q90")}[mode]
        low, high = self._stat(key, low_name, tensor), self._stat(key, high_name, tensor)
        span = high - low
        span = torch.where(span == 0, torch.tensor(self.eps, device=tensor.device, dtype=tensor.dtype), span)
        return (tensor + 1) / 2 * span + low if inverse else 2 * (tensor - low) / span - 1

    def normalize_observation(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(batch)
        for key, kind in self.feature_types.items():
            if self.only_keys is not None and key not in self.only_keys:
                continue
            if kind != "ACTION" and key in out:
                out[key] = self.apply(key, out[key])
        return out


# ---- steps every family writes --------------------------------------------------------------
@dataclass
class TokenizerSettings:
    max_length: int = 512
    padding: str = "max_length"
    padding_side: str = "right"
    truncation: bool = True
    task_key: str = TASK_KEY
    tokenizer_name: str | None = None


@dataclass
class Postprocessor:
    unnormalizer: Normalizer | None = None


def read_pipeline(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProcessorError(f"{path}: missing (a LeRobot policy directory has {PREPROCESSOR_FILE} and "
                             f"{POSTPROCESSOR_FILE}, written by the processors' save_pretrained)") from None
    except OSError as err:
        raise ProcessorError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise ProcessorError(f"{path}: not valid JSON ({err})") from None
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ProcessorError(f"{path}: expected an object with a \"steps\" list")
    return steps


def step_name(step: dict, path: Path, index: int) -> str:
    name = step.get("registry_name")
    if not name:
        raise ProcessorError(f"{path}: step {index} is the custom class {step.get('class')!r}; only LeRobot's "
                             f"registered steps are supported")
    return str(name)


def read_normalizer(step: dict, directory: Path, path: Path, index: int) -> Normalizer:
    config = step.get("config") or {}
    name = step["registry_name"]
    try:
        types = {str(k): str(v["type"]) for k, v in config.get("features", {}).items()}
        modes = {str(k): str(v) for k, v in config.get("norm_map", {}).items()}
        eps = float(config.get("eps", 1e-8))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ProcessorError(f"{path}: step {index} ({name}): malformed features/norm_map/eps") from None
    bad = sorted(m for m in modes.values() if m not in NORMALIZATION_MODES)
    if bad:
        raise ProcessorError(f"{path}: step {index} ({name}): unsupported normalization mode(s) {bad}; "
                             f"expected {list(NORMALIZATION_MODES)}")
    if config.get("stats"):
        raise ProcessorError(f"{path}: step {index} ({name}): inline \"stats\" are not supported; LeRobot keeps "
                             f"them in the step's state_file")
    stats: dict[str, dict[str, Tensor]] = {}
    state_file = step.get("state_file")
    if state_file:
        state_path = directory / state_file
        if state_path.suffix != ".safetensors":
            raise ProcessorError(f"{path}: step {index} ({name}): state_file {state_file!r} is not .safetensors")
        try:
            flat = load_file(str(state_path))
        except FileNotFoundError:
            raise ProcessorError(f"{state_path}: missing (the normalization statistics of {path.name})") from None
        except (SafetensorError, OSError) as err:
            raise ProcessorError(f"{state_path}: not a readable safetensors file ({err})") from None
        for flat_key, tensor in flat.items():
            key, _, stat = flat_key.rpartition(".")
            stats.setdefault(key, {})[stat] = tensor.to(torch.float32)
    only = config.get("normalize_observation_keys")
    return Normalizer(modes, types, stats, eps, frozenset(only) if only is not None else None, str(path))


def read_tokenizer_step(config: dict, path: Path, index: int, name: str) -> TokenizerSettings:
    """LeRobot's tokenizer_processor step."""
    known = {"max_length", "padding", "padding_side", "truncation", "task_key", "tokenizer_name"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ProcessorError(f"{path}: step {index} ({name}): unsupported field(s) {unknown}")
    settings = TokenizerSettings(**config)
    if settings.padding not in ("longest", "max_length"):
        raise ProcessorError(f"{path}: step {index} ({name}): padding {settings.padding!r} is not "
                             f"supported (longest or max_length)")
    return settings


def tokenize(tokenizer, settings: TokenizerSettings, tasks: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids and bool mask (B, L) of the task strings, as LeRobot's tokenizer_processor makes them."""
    encoded = tokenizer(tasks, max_length=settings.max_length, truncation=settings.truncation,
                        padding=settings.padding, padding_side=settings.padding_side, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device, torch.bool)


def read_postprocessor(directory: Path) -> Postprocessor:
    path = directory / POSTPROCESSOR_FILE
    post = Postprocessor()
    for index, step in enumerate(read_pipeline(path)):
        name = step_name(step, path, index)
        config = step.get("config") or {}
        if name == "unnormalizer_processor":
            post.unnormalizer = read_normalizer(step, directory, path, index)
        elif name in PASS_THROUGH_STEPS:
            check_device_step(config, path, index, name)
        else:
            raise ProcessorError(f"{path}: step {index}: unsupported processor step {name!r}")
    return post


def check_device_step(config: dict, path: Path, index: int, name: str) -> None:
    dtype = config.get("float_dtype")
    if dtype not in (None, "float32", "torch.float32"):
        raise ProcessorError(f"{path}: step {index} ({name}): float_dtype {dtype!r} is not supported (float32 only)")


def unnormalize_actions(post: Postprocessor, actions: Tensor) -> Tensor:
    return actions if post.unnormalizer is None else post.unnormalizer.apply(ACTION_KEY, actions, inverse=True)


# ---- the VLM's tokenizer and config --------------------------------------------------------------
def resolve_vlm_dir(vlm_model_name: str, vlm_processor: str | Path | None = None, need_config: bool = True) -> Path:
    """The directory holding the VLM's tokenizer (and, with ``need_config``, its config.json):
    ``vlm_processor`` if given, else ``vlm_model_name`` when it is a local directory, else its
    snapshot in the Hugging Face cache (offline). Raises ProcessorError with one line saying what is
    missing and how to provide it."""
    files = "config.json and tokenizer files" if need_config else "tokenizer files"
    how = (f"pass --vlm-processor DIR holding the {files} of {vlm_model_name} (not its weights: those are in "
           f"model.safetensors), or download that repository into the Hugging Face cache once while online")
    if vlm_processor is not None:
        directory = Path(vlm_processor)
        if not directory.is_dir():
            raise ProcessorError(f"--vlm-processor {directory}: not a directory; {how}")
        return _check_vlm_dir(directory, f"--vlm-processor {directory}", how, need_config)
    if Path(vlm_model_name).is_dir():
        return _check_vlm_dir(Path(vlm_model_name), f"{vlm_model_name}", how, need_config)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        directory = Path(snapshot_download(repo_id=vlm_model_name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure to find it offline reads the same to the user
        raise ProcessorError(f"the {files} of {vlm_model_name!r} are not in the Hugging Face cache "
                             f"({os.environ.get('HF_HUB_CACHE', HF_HUB_CACHE)}); {how}") from None
    return _check_vlm_dir(directory, f"{vlm_model_name!r} in the Hugging Face cache ({directory})", how, need_config)


def _check_vlm_dir(directory: Path, label: str, how: str, need_config: bool) -> Path:
    if need_config and not (directory / "config.json").is_file():
        raise ProcessorError(f"{label}: no config.json (the VLM's sizes: heads, head_dim, widths); {how}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ProcessorError(f"{label}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {how}")
    return directory


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, read offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProcessorError(f"{directory}: cannot load the tokenizer ({_first_line(err)})") from None


def load_vlm_config_and_tokenizer(directory: Path):
    """The VLM's transformers config and tokenizer, read offline from ``directory``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ProcessorError(f"{directory}/config.json: not a transformers VLM config ({_first_line(err)})") from None
    return config, load_tokenizer(directory)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
