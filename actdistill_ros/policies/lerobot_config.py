"""Checks of a LeRobot config.json that every policy family here (SmolVLA, pi0, pi0.5) shares.

The families read the same feature layout (``observation.images.<camera>`` VISUAL inputs, one
``observation.state`` and one ``action``) and the same normalization modes; each family's
configuration calls these with its name and error class, so a message names the family it came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from actdistill_ros.policies.lerobot_processor import ACTION_KEY, NORMALIZATION_MODES

FEATURE_TYPES = ("VISUAL", "STATE", "ACTION")
STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."


@dataclass(frozen=True)
class Feature:
    type: str  # VISUAL | STATE | ACTION
    shape: tuple[int, ...]


def read_config_json(path: Path, error: type[Exception]) -> dict:
    """A config.json's object; an unreadable file or bad JSON is one ``error`` line naming the file."""
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def read_features(values: dict, source: str, error: type[Exception]) -> None:
    """config.json's feature groups as :class:`Feature` s, in place in ``values``; the
    normalization mapping must be an object."""
    for group in ("input_features", "output_features"):
        raw = values.get(group, {})
        if not isinstance(raw, dict):
            raise error(f"{source}: {group} must be an object")
        try:
            values[group] = {k: Feature(str(f["type"]), tuple(int(s) for s in f["shape"])) for k, f in raw.items()}
        except (KeyError, TypeError, ValueError):
            raise error(f"{source}: {group} entries need \"type\" and an integer \"shape\"") from None
    if "normalization_mapping" in values and not isinstance(values["normalization_mapping"], dict):
        raise error(f"{source}: normalization_mapping must be an object")


def check_normalization_mapping(mapping: Mapping[str, str], where: str, error: type[Exception]) -> None:
    for kind, mode in mapping.items():
        if mode not in NORMALIZATION_MODES:
            raise error(f"{where}: normalization_mapping[{kind!r}] must be one of "
                        f"{list(NORMALIZATION_MODES)}, got {mode!r}")


def check_features(input_features: Mapping[str, Feature], output_features: Mapping[str, Feature],
                   max_state_dim: int, max_action_dim: int, where: str, family: str,
                   error: type[Exception]) -> None:
    """Cameras of shape [3, H, W], one state and one action vector within the padded sizes."""
    for group, features in (("input_features", input_features), ("output_features", output_features)):
        for key, feature in features.items():
            if feature.type not in FEATURE_TYPES:
                raise error(f"{where}: {group}[{key!r}] has type {feature.type!r}; {family} features are "
                            f"{list(FEATURE_TYPES)}")
    images = {k: f for k, f in input_features.items() if f.type == "VISUAL"}
    if not images:
        raise error(f"{where}: input_features has no VISUAL feature (observation.images.<camera>)")
    for key, feature in images.items():
        if len(feature.shape) != 3 or feature.shape[0] != 3:
            raise error(f"{where}: input_features[{key!r}] shape {list(feature.shape)}: expected [3, H, W]")
    state = input_features.get(STATE_KEY)
    if state is None or state.type != "STATE" or len(state.shape) != 1:
        raise error(f"{where}: input_features needs {STATE_KEY!r} of type STATE with shape [S]")
    if state.shape[0] > max_state_dim:
        raise error(f"{where}: {STATE_KEY} has {state.shape[0]} values, more than max_state_dim {max_state_dim}")
    other_inputs = sorted(k for k, f in input_features.items() if f.type != "VISUAL" and k != STATE_KEY)
    if other_inputs:
        raise error(f"{where}: unsupported input feature(s) {other_inputs}: {family} reads "
                    f"{IMAGE_PREFIX}<camera> and {STATE_KEY}")
    action = output_features.get(ACTION_KEY)
    if set(output_features) != {ACTION_KEY} or action.type != "ACTION" or len(action.shape) != 1:
        raise error(f"{where}: output_features must be exactly {ACTION_KEY!r} of type ACTION with shape [D], "
                    f"got {sorted(output_features)}")
    if action.shape[0] > max_action_dim:
        raise error(f"{where}: action has {action.shape[0]} values, more than max_action_dim {max_action_dim}")
