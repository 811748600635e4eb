"""Test helper: a tiny LeRobot SmolVLA (or pi0: case "pi0/pi0") teacher directory for a generated
LeRobotDataset.

Takes a LeRobot-made fixture policy (test/fixtures/lerobot/) and points its features at the
dataset's (cameras, state and action widths): SmolVLA's and pi0's weights do not depend on them
(state and actions are padded to max_state_dim / max_action_dim), only config.json and the normalizer
statistics do, which are rewritten from the dataset's meta/stats.json in LeRobot's layout.
Also the parity check of a predicted action chunk against a fixture's LeRobot output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
STATS = ("mean", "std", "min", "max")


def _stats_tensors(stats: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": torch.tensor(stats[key][name], dtype=torch.float32) for key in keys for name in STATS}


def make_smolvla_teacher(out: Path, dataset_root: Path, case: str = "cross_attn") -> Path:
    """Copy fixture ``case``'s policy to ``out`` with the features of the dataset at ``dataset_root``."""
    source = FIXTURES / case / "policy"
    shutil.copytree(source, out)
    info = json.loads((dataset_root / "meta" / "info.json").read_text())
    stats = json.loads((dataset_root / "meta" / "stats.json").read_text())
    features = info["features"]
    cameras = [k for k, f in features.items() if f["dtype"] == "video"]
    config = json.loads((out / "config.json").read_text())
    config["input_features"] = {k: {"type": "VISUAL", "shape": [3, *features[k]["shape"][:2]]} for k in cameras}
    config["input_features"]["observation.state"] = {"type": "STATE", "shape": features["observation.state"]["shape"]}
    config["output_features"] = {"action": {"type": "ACTION", "shape": features["action"]["shape"]}}
    (out / "config.json").write_text(json.dumps(config, indent=4))
    for pipeline, keys in (("policy_preprocessor.json", ["observation.state", "action"]),
                           ("policy_postprocessor.json", ["action"])):
        data = json.loads((out / pipeline).read_text())
        for step in data["steps"]:
            if step.get("registry_name") in ("normalizer_processor", "unnormalizer_processor"):
                kept = {k: v for k, v in step["config"]["features"].items() if k in keys}
                kept.update({k: config["input_features"].get(k) or config["output_features"][k] for k in keys})
                if step["registry_name"] == "normalizer_processor":
                    kept.update({k: config["input_features"][k] for k in cameras})
                step["config"]["features"] = kept
                save_file(_stats_tensors(stats, keys), str(out / step["state_file"]))
        (out / pipeline).write_text(json.dumps(data, indent=2))
    return out


def assert_actions_match_lerobot(case: str, actions_file: Path, expected_file: Path, tolerance: float) -> None:
    """``predict``'s action chunk equals LeRobot's (expected_file) within ``tolerance``."""
    expected = load_file(str(expected_file))["action"]
    actions = load_file(str(actions_file))["action"]
    assert actions.dtype == torch.float32 and actions.shape == expected.shape
    error = (actions - expected).abs().max().item()
    print(f"{case}: max abs error vs LeRobot {error:.3g} over {tuple(expected.shape)} (|a| <= "
          f"{expected.abs().max():.2f})")
    assert error < tolerance
    # The fixtures' actions span several units: a wrong normalisation or layout cannot hide under 1e-4.
    assert expected.std() > 0.5
