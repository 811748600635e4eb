"""Policy weights on disk: a directory with ``model.safetensors`` and ``card.json``.

The card carries everything needed to rebuild and use the model: architecture, action space,
normalisation statistics, default router threshold, provenance and metrics. Loading never
unpickles anything: pickle checkpoints (.pt/.pth/.ckpt/.pkl/.bin) are refused by name and by
content.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
CARD_FORMAT = 1
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin"}
# Teacher families a card can describe (policy.build_model rebuilds each): our reference VLA, and a
# Hugging Face image-text-to-text backbone whose config and tokenizer live in the weights directory;
# a LeRobot SmolVLA directory (its card made from its files: actdistill_ros.lerobot_card).
FAMILIES = ("reference_vla", "hf_vla", "smolvla", "pi0")


class WeightsError(ValueError):
    """A weights directory or file that cannot be used; the message is one line."""


@dataclass
class ActionSpace:
    """What the action vector means on the robot."""

    kind: str  # "joint" or "end_effector"
    names: list[str]
    units: list[str]
    low: list[float]
    high: list[float]
    gripper_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("joint", "end_effector"):
            raise ValueError(f"ActionSpace.kind must be 'joint' or 'end_effector', got {self.kind!r}")
        n = len(self.names)
        if n == 0:
            raise ValueError("ActionSpace.names must not be empty")
        for name in ("units", "low", "high"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ActionSpace.{name} has {len(getattr(self, name))} entries, expected {n} (one per name)")
        self.low = [float(v) for v in self.low]
        self.high = [float(v) for v in self.high]
        if any(lo > hi for lo, hi in zip(self.low, self.high)):
            raise ValueError("ActionSpace.low must be <= high in every dimension")
        if self.gripper_index is not None and not 0 <= self.gripper_index < n:
            raise ValueError(f"ActionSpace.gripper_index {self.gripper_index} is outside 0..{n - 1}")

    @property
    def dim(self) -> int:
        return len(self.names)

    @classmethod
    def metaworld(cls) -> "ActionSpace":
        """Meta-World: end-effector position delta (scaled) plus gripper effort, all in [-1, 1]."""
        return cls(kind="end_effector", names=["delta_x", "delta_y", "delta_z", "gripper"],
                   units=["normalized", "normalized", "normalized", "normalized"],
                   low=[-1.0] * 4, high=[1.0] * 4, gripper_index=3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ActionSpace":
        return cls(**data)


def identity_norm_stats(action_dim: int, state_dim: int) -> dict:
    return {"action_mean": [0.0] * action_dim, "action_std": [1.0] * action_dim,
            "state_mean": [0.0] * state_dim, "state_std": [1.0] * state_dim}


@dataclass
class ModelCard:
    kind: str  # "teacher" or "student"
    vla_config: dict  # the family's configuration dataclass, as a dict
    action_space: ActionSpace
    norm_stats: dict  # action_mean/std, state_mean/std (lists of floats)
    router_config: dict | None = None  # students only
    default_threshold: float = 0.5
    # Keep routing by default: run the top max(1, round(keep * L)) layers by gate. 0.0 = threshold routing
    # (and what cards written before keep routing existed mean).
    default_keep_fraction: float = 0.0
    state_names: list[str] = field(default_factory=list)
    # Camera topics the model was trained on, in the order it takes their images; empty in cards
    # written before multi-camera support (one camera).
    camera_names: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    family: str = "reference_vla"  # one of FAMILIES; cards written before hf_vla have none
    format: int = CARD_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in ("teacher", "student"):
            raise ValueError(f"card kind must be 'teacher' or 'student', got {self.kind!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"card family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.kind == "student" and self.router_config is None:
            raise ValueError("a student card needs router_config")
        if not 0.0 <= float(self.default_threshold) <= 1.0:
            raise ValueError(f"default_threshold must be in [0, 1], got {self.default_threshold!r}")
        if not 0.0 <= float(self.default_keep_fraction) <= 1.0:
            raise ValueError(f"default_keep_fraction must be in [0, 1] (0 = threshold routing), "
                             f"got {self.default_keep_fraction!r}")
        for name, values in self.norm_stats.items():
            if isinstance(values, list) and not all(math.isfinite(v) for v in values):
                raise ValueError(f"norm_stats.{name} contains NaN or inf")
        if self.camera_names and len(self.camera_names) != self.num_cameras:
            raise ValueError(f"camera_names lists {len(self.camera_names)} cameras, the model takes {self.num_cameras}")

    @property
    def is_student(self) -> bool:
        return self.kind == "student"

    @property
    def image_size(self) -> int:
        return int(self.vla_config["image_size"])

    @property
    def num_cameras(self) -> int:
        return int(self.vla_config.get("num_cameras", 1))

    @property
    def chunk_size(self) -> int:
        return int(self.vla_config["chunk_size"])

    @property
    def action_dim(self) -> int:
        return int(self.vla_config["action_dim"])

    @property
    def state_dim(self) -> int:
        return int(self.vla_config["state_dim"])

    @property
    def num_layers(self) -> int:
        return int(self.vla_config["num_layers"])

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["action_space"] = self.action_space.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        data = dict(data)
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"card format {data.get('format')!r} is not supported (expected {CARD_FORMAT})")
        data["action_space"] = ActionSpace.from_dict(data["action_space"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown card fields {unknown}")
        return cls(**data)


def atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_policy(out_dir: str | Path, state_dict: dict[str, torch.Tensor], card: ModelCard,
                write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model.safetensors`` + ``card.json`` as one directory ``out_dir``; returns it.

    ``write_extra(directory)`` adds what else the family needs to rebuild the model offline (an
    hf_vla backbone's config and tokenizer, in ``backbone/``). Written with ``write_directory``, so
    a reader (or a crash) never sees new weights beside an old card.
    """
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            write_extra(staging)

    return write_directory(out_dir, write)


def write_directory(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(staging)`` fills a temporary sibling directory that then replaces ``out_dir`` whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        write(staging)
        if out_dir.exists():
            retired = staging.with_suffix(".old")
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def resolve_weights_path(path: str | Path) -> tuple[Path, Path]:
    """(weights file, card file) for a weights directory or the .safetensors file in one."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: is a pickle-format checkpoint; actdistill loads only safetensors "
                           f"(a directory with {WEIGHTS_FILE} and {CARD_FILE})")
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory (expected a directory with {WEIGHTS_FILE} and {CARD_FILE})")
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if path.is_file() and path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors file or a directory holding {WEIGHTS_FILE}")
    if not weights.is_file():
        raise WeightsError(f"{weights}: missing (expected {WEIGHTS_FILE} inside {path})")
    card = weights.parent / CARD_FILE
    if not card.is_file():
        raise WeightsError(f"{card}: missing (every weights file needs its {CARD_FILE} beside it)")
    return weights, card


def read_card(card_path: Path) -> ModelCard:
    try:
        data = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{card_path}: not a readable JSON model card ({err})") from None
    try:
        return ModelCard.from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"{card_path}: invalid model card: {err}") from None


def load_card(weights: str | Path) -> ModelCard:
    """The card of a weights directory (or of the .safetensors file in one); WeightsError names the path."""
    return read_card(resolve_weights_path(weights)[1])


def _check_safetensors_header(path: Path) -> None:
    """Refuse pickles and other formats by content, before any parser touches them.

    A safetensors file is an 8-byte little-endian header length, then a JSON header.
    """
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 0 < header_len <= size - 8:
            return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise WeightsError(f"{path}: is a pickle/zip checkpoint, not safetensors; refusing to unpickle it")
    if len(head) < 9:
        raise WeightsError(f"{path}: truncated file ({len(head)} bytes), expected safetensors")
    raise WeightsError(f"{path}: not a safetensors file (bad header)")


def read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_header(weights_path)
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{weights_path}: corrupt safetensors file ({str(err).splitlines()[0]})") from None


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Strict load with a one-line error naming the first mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{weights_path}: does not match the card's architecture "
                           f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                           f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise WeightsError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                               f"the card's architecture expects {tuple(expected[name].shape)}")
    module.load_state_dict(tensors, strict=True)
