"""The LeRobot flow-matching families (SmolVLA; pi0 and pi0.5) as the shared code sees them.

One distillation driver (smolvla/distill_smolvla.py), one student directory layout and loader
(smolvla/routing_smolvla.py) and one serving adapter (smolvla/serving_smolvla.py) serve every
family; what differs is named here and implemented in the family's routing module, whose
``HOOKS`` (a :class:`FamilyHooks`) the shared code asks for. This module imports neither torch nor
a family, so that a launch process can tell a directory's family from its config.json alone.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class FlowFamily:
    name: str  # the card's "family"
    label: str  # for messages
    config_types: tuple[str, ...]  # config.json "type"s of the family's LeRobot directories
    routing_module: str  # defines HOOKS

    def hooks(self) -> "FamilyHooks":
        return importlib.import_module(self.routing_module).HOOKS


@dataclass(frozen=True)
class FamilyHooks:
    """What the shared flow-matching code calls per family (all take the family's own objects)."""

    policy: type  # the LeRobot policy class: .load(dir, vlm_processor, device, float32), .preprocess, ...
    routed: type  # the routed model (routing_smolvla.RoutedFlowStudent subclass)
    routed_policy: type  # the policy with the router (routing_smolvla.RoutedPolicyMixin + policy)
    gated_prefix: Callable  # (model, prefix, masks | None) -> (cache, hidden after each routed layer)
    freeze_prefix_embedding: Callable  # (model) -> None: the parts that embed the prefix stay the teacher's
    lerobot_state: Callable  # (model, teacher weights file | None) -> tensors under LeRobot's names
    vlm_dir: Callable  # (policy, vlm_processor | None) -> the directory of the VLM files a student copies
    image_size: Callable  # (config) -> the square size images are resized (with padding) to
    route_costs: Callable  # (model, prefix of batch 1, images per camera) -> .total(plan, kv_mode) dict
    bench_keep_fractions: Callable  # (model, keep_fractions, iters, warmup, device) -> bench's JSON


FAMILIES = (
    FlowFamily("smolvla", "SmolVLA", ("smolvla",), "actdistill_ros.policies.smolvla.routing_smolvla"),
    FlowFamily("pi0", "pi0 / pi0.5", ("pi0", "pi05"), "actdistill_ros.policies.pi0.routing_pi0"),
)


def config_type(directory: str | Path) -> Any:
    """config.json's "type" of a directory (None when there is none to read)."""
    try:
        return json.loads((Path(directory).expanduser() / CONFIG_FILE).read_text()).get("type")
    except (OSError, ValueError, AttributeError):
        return None


def family_of_dir(directory: str | Path) -> FlowFamily | None:
    """The family of a LeRobot policy directory (teacher or student) by its config.json, else None."""
    kind = config_type(directory)
    return next((f for f in FAMILIES if kind in f.config_types), None)


def family_named(name: str) -> FlowFamily | None:
    return next((f for f in FAMILIES if f.name == name), None)
